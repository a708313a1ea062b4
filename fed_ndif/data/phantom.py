"""Random torso-to-head PET phantoms: activity in SUV, attenuation, organ labels, lesions.

Written by hand: no maintained library makes whole-body PET phantoms with lesions in Python
(XCAT and its kin are licensed binaries). In-plane sizes are in millimetres; the axial layout is
a fraction of the scanned length, so that any axial field of view holds every organ (a short
scan is an axially compressed body, which keeps tiny test volumes meaningful).

Coordinates are DICOM LPS millimetres: x to the patient's left, y posterior, z superior, with
the scanner axis at x = y = 0 and the first slice centre at z = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from scipy import ndimage

# Linear attenuation coefficients at 511 keV, 1/mm.
MU_SOFT_TISSUE = 0.0096
MU_LUNG = 0.0025
MU_BONE = 0.0130

# Largest lateral half-width a phantom body may have (mm); the scanner FOV must hold it.
MAX_BODY_HALF_WIDTH_MM = 175.0
MIN_FOV_MM = 2 * MAX_BODY_HALF_WIDTH_MM + 30.0


class Organ(IntEnum):
    """Labels of the organ map written beside each subject."""

    AIR = 0
    BODY = 1
    LIVER = 2
    SPLEEN = 3
    KIDNEY = 4
    HEART = 5
    BRAIN = 6
    BLADDER = 7
    LUNG = 8
    BONE = 9
    AORTA = 10


class LesionSite(IntEnum):
    LIVER = 1
    LUNG = 2
    LYMPH_NODE = 3


@dataclass(frozen=True)
class Grid:
    """A scanner's voxel grid in LPS millimetres (see module docstring)."""

    shape: tuple[int, int, int]  # (z, y, x)
    spacing: tuple[float, float, float]  # (z, y, x) mm

    @property
    def z(self) -> np.ndarray:
        return np.arange(self.shape[0]) * self.spacing[0]

    @property
    def y(self) -> np.ndarray:
        return (np.arange(self.shape[1]) - (self.shape[1] - 1) / 2) * self.spacing[1]

    @property
    def x(self) -> np.ndarray:
        return (np.arange(self.shape[2]) - (self.shape[2] - 1) / 2) * self.spacing[2]

    @property
    def length_mm(self) -> float:
        return max((self.shape[0] - 1) * self.spacing[0], self.spacing[0])


@dataclass
class Lesion:
    site: LesionSite
    center_mm: tuple[float, float, float]  # (z, y, x)
    radii_mm: tuple[float, float, float]  # (z, y, x)
    contrast: float  # lesion uptake / local background uptake


@dataclass
class Phantom:
    activity: np.ndarray  # SUV, (z, y, x) float32
    mu: np.ndarray  # 1/mm
    organs: np.ndarray  # uint8 Organ labels
    lesions: np.ndarray  # uint16, 0 = none, i = lesions_info[i-1]
    lesions_info: list[Lesion] = field(default_factory=list)


@dataclass
class _Ellipsoid:
    center: tuple[float, float, float]  # (z, y, x) mm
    radii: tuple[float, float, float]  # (z, y, x) mm

    def mask(self, grid: Grid) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        """Boolean mask inside the bounding box of the ellipsoid, and that box."""
        box = []
        axes = (grid.z, grid.y, grid.x)
        for c, r, coords in zip(self.center, self.radii, axes, strict=True):
            lo = int(np.searchsorted(coords, c - r, side="left"))
            hi = int(np.searchsorted(coords, c + r, side="right"))
            box.append(slice(lo, max(lo, hi)))
        zz, yy, xx = np.meshgrid(
            *(coords[b] for coords, b in zip(axes, box, strict=True)), indexing="ij"
        )
        inside = (
            ((zz - self.center[0]) / self.radii[0]) ** 2
            + ((yy - self.center[1]) / self.radii[1]) ** 2
            + ((xx - self.center[2]) / self.radii[2]) ** 2
        ) <= 1.0
        return tuple(box), inside


class _Painter:
    """Paints shapes into the activity, attenuation and label volumes."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.activity = np.zeros(grid.shape, np.float32)
        self.mu = np.zeros(grid.shape, np.float32)
        self.organs = np.zeros(grid.shape, np.uint8)

    def paint(
        self, shape: _Ellipsoid, *, organ: Organ, suv: float, mu: float,
        within: np.ndarray | None = None,
    ) -> None:
        box, inside = shape.mask(self.grid)
        if within is not None:
            inside &= within[box]
        self.activity[box][inside] = suv
        self.mu[box][inside] = mu
        self.organs[box][inside] = organ


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _body_half_axes(u: np.ndarray, width: float, depth: float) -> tuple[np.ndarray, np.ndarray]:
    """Lateral and AP half-axes of the trunk/neck outline along the axial fraction u."""
    knots = np.array([0.0, 0.15, 0.3, 0.45, 0.62, 0.72, 0.75, 0.80])
    lateral = np.array([0.95, 1.0, 0.9, 0.92, 1.0, 0.85, 0.32, 0.32]) * width
    ap = np.array([0.95, 1.0, 0.95, 1.0, 1.0, 0.8, 0.45, 0.45]) * depth
    return np.interp(u, knots, lateral), np.interp(u, knots, ap)


def make_phantom(grid: Grid, rng: np.random.Generator) -> Phantom:
    """One random subject on ``grid``: anatomy, uptake and 2–6 lesions."""
    length = grid.length_mm
    width = _uniform(rng, 125.0, MAX_BODY_HALF_WIDTH_MM - 5.0)  # lateral half-width
    depth = width * _uniform(rng, 0.62, 0.78)  # AP half-depth
    cx, cy = _uniform(rng, -12, 12), _uniform(rng, -10, 10)
    painter = _Painter(grid)

    # Body outline slice by slice (trunk and neck), then the head as an ellipsoid.
    u = grid.z / length
    half_x, half_y = _body_half_axes(u, width, depth)
    yy, xx = np.meshgrid(grid.y, grid.x, indexing="ij")
    soft_tissue_suv = _uniform(rng, 0.6, 1.1)
    for k in np.flatnonzero(u <= 0.80):
        inside = ((xx - cx) / half_x[k]) ** 2 + ((yy - cy) / half_y[k]) ** 2 <= 1.0
        painter.activity[k][inside] = soft_tissue_suv
        painter.mu[k][inside] = MU_SOFT_TISSUE
        painter.organs[k][inside] = Organ.BODY
    head_r = _uniform(rng, 70.0, 85.0)
    head = _Ellipsoid((0.895 * length, cy, cx), (0.105 * length, head_r * 1.15, head_r))
    painter.paint(head, organ=Organ.BONE, suv=_uniform(rng, 0.4, 0.8), mu=MU_BONE)
    brain = _Ellipsoid(head.center, tuple(r * 0.86 for r in head.radii))
    painter.paint(brain, organ=Organ.BRAIN, suv=_uniform(rng, 6.0, 10.0), mu=MU_SOFT_TISSUE)
    body = painter.organs > 0

    def at(fx: float, fy: float, fu: float) -> tuple[float, float, float]:
        return (fu * length, cy + fy * depth, cx + fx * width)

    def jitter(value: float, rel: float = 0.12) -> float:
        return value * _uniform(rng, 1 - rel, 1 + rel)

    lungs = []
    for side in (-1, 1):
        lung = _Ellipsoid(
            at(side * 0.45, 0.02, 0.61), (jitter(0.1 * length), jitter(0.62 * depth),
                                          jitter(0.36 * width)))
        painter.paint(lung, organ=Organ.LUNG, suv=_uniform(rng, 0.3, 0.6), mu=MU_LUNG,
                      within=body)
        lungs.append(lung)
    heart_center = at(0.12, -0.15, 0.57)
    heart_radii = (jitter(0.05 * length), jitter(48.0), jitter(55.0))
    painter.paint(_Ellipsoid(heart_center, heart_radii), organ=Organ.HEART,
                  suv=_uniform(rng, 2.0, 8.0), mu=MU_SOFT_TISSUE)
    painter.paint(_Ellipsoid(heart_center, tuple(r * 0.62 for r in heart_radii)),
                  organ=Organ.HEART, suv=_uniform(rng, 1.5, 2.2), mu=MU_SOFT_TISSUE)
    liver = _Ellipsoid(at(-0.38, -0.05, 0.45), (jitter(0.075 * length), jitter(0.62 * depth),
                                                jitter(0.42 * width)))
    liver_suv = _uniform(rng, 2.0, 3.0)
    painter.paint(liver, organ=Organ.LIVER, suv=liver_suv, mu=MU_SOFT_TISSUE, within=body)
    spleen = _Ellipsoid(at(0.52, 0.25, 0.47), (jitter(0.04 * length), jitter(45.0), jitter(32.0)))
    painter.paint(spleen, organ=Organ.SPLEEN, suv=_uniform(rng, 1.6, 2.4), mu=MU_SOFT_TISSUE,
                  within=body)
    kidney_suv = _uniform(rng, 3.0, 6.0)
    for side in (-1, 1):
        kidney = _Ellipsoid(at(side * 0.36, 0.45, 0.36),
                            (jitter(0.045 * length), jitter(32.0), jitter(26.0)))
        painter.paint(kidney, organ=Organ.KIDNEY, suv=kidney_suv, mu=MU_SOFT_TISSUE, within=body)
    bladder = _Ellipsoid(at(0.0, -0.15, 0.07), (jitter(0.035 * length), jitter(35.0), jitter(42.0)))
    bladder_suv = float(np.exp(rng.uniform(np.log(10), np.log(40))))
    painter.paint(bladder, organ=Organ.BLADDER, suv=bladder_suv, mu=MU_SOFT_TISSUE, within=body)
    # Spine and aorta as stacks of small discs; pelvic bones as ellipsoids.
    spine_suv, aorta_suv = _uniform(rng, 1.1, 1.8), _uniform(rng, 1.4, 2.0)
    for k in np.flatnonzero((u >= 0.1) & (u <= 0.78)):
        spine_y = cy + 0.72 * half_y[k]
        disc = (xx - cx) ** 2 + (yy - spine_y) ** 2 <= 15.0**2
        painter.activity[k][disc] = spine_suv
        painter.mu[k][disc] = MU_BONE
        painter.organs[k][disc] = Organ.BONE
        if 0.25 <= u[k] <= 0.62:
            vessel = (xx - cx - 18.0) ** 2 + (yy - spine_y + 30.0) ** 2 <= 11.0**2
            painter.activity[k][vessel] = aorta_suv
            painter.organs[k][vessel] = Organ.AORTA
    for side in (-1, 1):
        hip = _Ellipsoid(at(side * 0.6, 0.3, 0.12), (0.05 * length, 40.0, 24.0))
        painter.paint(hip, organ=Organ.BONE, suv=_uniform(rng, 1.0, 1.5), mu=MU_BONE, within=body)

    # Mild smooth heterogeneity inside every organ (real uptake is never flat).
    texture = ndimage.gaussian_filter(
        rng.standard_normal(grid.shape).astype(np.float32),
        sigma=[12.0 / s for s in grid.spacing],
    )
    texture *= 0.03 / max(float(texture.std()), 1e-6)
    painter.activity *= 1.0 + texture

    lesions_info = _sample_lesions(grid, rng, liver=liver, lungs=lungs, heart=heart_center,
                                   width=width, depth=depth, center=(cx, cy))
    lesion_mask = np.zeros(grid.shape, np.uint16)
    for index, lesion in enumerate(lesions_info, start=1):
        box, inside = _Ellipsoid(lesion.center_mm, lesion.radii_mm).mask(grid)
        inside &= painter.organs[box] > 0
        if not inside.any():  # smaller than a voxel: take the voxel holding its centre
            k, j, i = (int(np.argmin(np.abs(c - v))) for c, v in
                       zip((grid.z, grid.y, grid.x), lesion.center_mm, strict=True))
            box = (slice(k, k + 1), slice(j, j + 1), slice(i, i + 1))
            inside = np.ones((1, 1, 1), bool)
        region = painter.activity[box]
        background = float(np.median(region[inside]))
        region[inside] = background * lesion.contrast
        lesion_mask[box][inside] = index
    # A lesion painted over entirely by a later one is dropped; labels are renumbered 1..N so
    # that label i is always lesions_info[i - 1].
    present = [i for i in range(1, len(lesions_info) + 1) if (lesion_mask == i).any()]
    relabel = np.zeros(len(lesions_info) + 1, np.uint16)
    relabel[present] = np.arange(1, len(present) + 1)
    lesion_mask = relabel[lesion_mask]
    kept = [lesions_info[i - 1] for i in present]
    return Phantom(activity=np.clip(painter.activity, 0, None), mu=painter.mu,
                   organs=painter.organs, lesions=lesion_mask, lesions_info=kept)


def _sample_lesions(
    grid: Grid, rng: np.random.Generator, *, liver: _Ellipsoid, lungs: list[_Ellipsoid],
    heart: tuple[float, float, float], width: float, depth: float, center: tuple[float, float],
) -> list[Lesion]:
    length = grid.length_mm
    cx, cy = center
    min_inplane = max(3.0, 0.6 * max(grid.spacing[1:]))
    lesions: list[Lesion] = []
    for _ in range(int(rng.integers(2, 7))):
        site = LesionSite(int(rng.choice([1, 1, 2, 2, 3])))
        radius = float(np.clip(np.exp(rng.uniform(np.log(3.0), np.log(12.0))), min_inplane, None))
        radii = tuple(radius * _uniform(rng, 0.8, 1.25) for _ in range(3))
        if site is LesionSite.LYMPH_NODE:
            station = int(rng.integers(3))
            if station == 0:  # mediastinal, beside the heart
                c = (heart[0] + 0.05 * length, heart[1] + _uniform(rng, -20, 20),
                     heart[2] + _uniform(rng, -35, 35))
            elif station == 1:  # para-aortic
                c = (_uniform(rng, 0.3, 0.42) * length, cy + 0.35 * depth,
                     cx + _uniform(rng, -45, 45))
            else:  # axillary
                c = (0.68 * length, cy + _uniform(rng, -0.2, 0.2) * depth,
                     cx + float(rng.choice([-1, 1])) * 0.72 * width)
        else:
            organ = liver if site is LesionSite.LIVER else lungs[int(rng.integers(2))]
            # A point well inside the organ: a random direction at up to 60 % of its radii.
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            scale = 0.6 * rng.uniform() ** (1 / 3)
            c = tuple(float(o + scale * d * r) for o, d, r in
                      zip(organ.center, direction, organ.radii, strict=True))
        contrast = float(np.exp(rng.uniform(np.log(1.5), np.log(10.0))))
        lesions.append(Lesion(site=site, center_mm=c, radii_mm=radii, contrast=contrast))
    return lesions

"""Liver NSTD, the noise level the model is conditioned on: std / mean inside a liver VOI.

One function for training, evaluation and inference, so the embedding sees the same number.
"""

from __future__ import annotations

import logging

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from fed_ndif.data.volume import Volume
from fed_ndif.errors import FedNdifError

log = logging.getLogger(__name__)

MIN_LIVER_VOXELS = 20
# Automatic liver VOI (SUV body weight; see find_liver_voi).
LIVER_SUV_RANGE = (1.2, 4.0)
BODY_SUV = 0.2
SMOOTH_MM = 4.0
MAX_LOCAL_CV = 0.25
SIMILAR_UPTAKE = 0.3
VOI_MIN_RADIUS_MM = 15.0  # 3 cm diameter, the PERCIST liver VOI
VOI_MAX_RADIUS_MM = 60.0
# Plausibility of an automatic VOI before its NSTD is used (see check_liver_voi).
VOI_MIN_ML = 5.0
VOI_MEAN_SUV = (0.8, 4.5)  # liver SUVmean (body weight) in FDG PET, with margin
# The VOI's centre lies on the patient's right of the body's midline, or within this much of it
# (the liver crosses the midline; a coarse grid or a rotated body moves the estimate).
MIN_RIGHT_MM = -15.0
MAX_BELOW_LUNG_MM = 150.0  # the liver's centre below the base of the right lung, at most
LONG_BODY_MM = 700.0  # a field of view this long shows where the upper abdomen is
UPPER_FRACTION = 0.6  # ... and the liver lies in the upper 60 % of it
NSTD_RANGE = (0.005, 1.0)  # wide: only what no liver of full to 1 % count PET shows
OVERRIDE = "pass a liver mask (--liver-mask) or the noise level (--nstd)"


def liver_nstd(volume: np.ndarray, liver_mask: np.ndarray, *, erode: int = 1) -> float:
    """NSTD of ``volume`` inside ``liver_mask``, eroded by ``erode`` voxels in-plane.

    Erosion keeps partial-volume voxels at the liver edge out of the statistic (a standard
    practice for liver VOIs); it is skipped when it would leave too few voxels.
    """
    mask = np.asarray(liver_mask) > 0
    if mask.shape != volume.shape:
        raise FedNdifError(f"liver mask shape {mask.shape} does not match volume {volume.shape}")
    if erode:
        structure = np.zeros((3, 3, 3), bool)
        structure[1] = ndimage.generate_binary_structure(2, 1)
        eroded = ndimage.binary_erosion(mask, structure, iterations=erode)
        if eroded.sum() >= MIN_LIVER_VOXELS:
            mask = eroded
    if mask.sum() < MIN_LIVER_VOXELS:
        raise FedNdifError(f"liver mask holds {int(mask.sum())} voxels; at least "
                           f"{MIN_LIVER_VOXELS} are needed to measure NSTD")
    values = volume[mask].astype(np.float64)
    mean = values.mean()
    if mean <= 0:
        raise FedNdifError("mean uptake inside the liver mask is not positive; is the mask "
                           "on the liver?")
    return float(values.std() / mean)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def _around(mask: np.ndarray) -> tuple[slice, ...]:
    """The mask's bounding box grown by one voxel of background: hole filling and distances to
    the background give the same answers inside it as on the whole array, far faster when the
    mask (a body, a liver) fills a small part of a whole-body field of view."""
    box = ndimage.find_objects(mask.astype(np.uint8))
    if not box:
        return tuple(slice(0, n) for n in mask.shape)
    return tuple(slice(max(0, b.start - 1), min(n, b.stop + 1))
                 for b, n in zip(box[0], mask.shape, strict=True))


def _fill_axial(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (canonical array: axis 2 is superior)."""
    filled = np.zeros_like(mask)
    box = _around(mask)
    inside, out = mask[box], filled[box]
    for k in range(inside.shape[2]):
        out[:, :, k] = ndimage.binary_fill_holes(inside[:, :, k])
    return filled


def _depth(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) from each mask voxel to the nearest background voxel."""
    depth = np.zeros(mask.shape, np.float64)
    box = _around(mask)
    depth[box] = ndimage.distance_transform_edt(mask[box], sampling=spacing)
    return depth


def _right_lung(smooth: np.ndarray, body: np.ndarray, spacing: np.ndarray,
                body_center_x: float) -> np.ndarray | None:
    """The right lung as the largest low-uptake region inside the body, right of its centre.

    Canonical array: x index increases to the patient's right. None when nothing lung-like.
    """
    tissue = float(np.median(smooth[body]))
    # Keep away from the body surface, where partial volume also gives low values.
    radius = np.maximum(np.round(15.0 / spacing[:2]).astype(int), 1)
    structure = np.zeros((2 * radius[0] + 1, 2 * radius[1] + 1, 1), bool)
    yy, xx = np.meshgrid(np.arange(-radius[0], radius[0] + 1),
                         np.arange(-radius[1], radius[1] + 1), indexing="ij")
    structure[:, :, 0] = (yy / radius[0]) ** 2 + (xx / radius[1]) ** 2 <= 1.0
    inner = ndimage.binary_erosion(body, structure)
    low = inner & (smooth < 0.65 * tissue)
    labels, count = ndimage.label(low)
    if count == 0:
        return None
    voxel_ml = float(np.prod(spacing)) / 1000.0
    best, best_size = None, 0.0
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        component = labels[region] == index
        size = component.sum() * voxel_ml
        if size < 30.0:
            continue
        centroid_x = region[0].start + np.mean(np.nonzero(component)[0])
        if centroid_x > body_center_x and size > best_size:
            best, best_size = (region, component), size
    if best is None:
        return None
    mask = np.zeros_like(low)
    mask[best[0]] = best[1]
    return mask


def _ball(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    radius = np.maximum(np.round(radius_mm / spacing).astype(int), 1)
    grids = np.meshgrid(*(np.arange(-r, r + 1) for r in radius), indexing="ij")
    return sum((g / r) ** 2 for g, r in zip(grids, radius, strict=True)) <= 1.0


def find_liver_voi(volume: Volume) -> np.ndarray:
    """An automatic liver VOI (boolean, ``(z, y, x)``) for volumes without a liver mask.

    The liver is the large, homogeneous, moderate-uptake organ below the right lung: the body is
    thresholded, the right lung found as a low-uptake region inside it (patient right comes from
    the affine), and below the lung base the largest region with SUV 1.2–4 and low local
    variation is the liver core (eroded first, so bridges to the heart or a kidney break). The
    liver is then the voxels near that core with uptake within 25 % of its median, and the VOI a
    sphere (3 cm to 12 cm across) around its deepest point, clipped to the liver minus its edge
    voxels, so partial volume, lesions and neighbouring organs stay out.
    """
    affine = volume.affine
    ornt = io_orientation(affine)
    canon = apply_orientation(volume.array.transpose(2, 1, 0), ornt).astype(np.float32)
    back = ornt_transform(axcodes2ornt(("R", "A", "S")), ornt)
    spacing = np.array(volume.spacing[::-1])[ornt[:, 0].argsort()]  # canonical (x, y, z) mm
    smooth = ndimage.gaussian_filter(canon, SMOOTH_MM / spacing)

    body = _largest_component(smooth > BODY_SUV)
    if body.sum() * np.prod(spacing) < 1e6:  # less than a litre of tissue
        raise FedNdifError("automatic liver VOI: no body found (is the volume in SUV?); "
                           "pass a liver mask")
    body = _fill_axial(body)
    body_center_x = float(np.nonzero(body)[0].mean())
    lung = _right_lung(smooth, body, spacing, body_center_x)

    # Where to look: the right side of the body (the liver crosses the midline a little) ...
    region = body.copy()
    region[: max(0, int(body_center_x - 20.0 / spacing[0]))] = False
    if lung is not None:
        # ... below the base of the right lung (where its cross-section becomes small).
        area = lung.sum(axis=(0, 1))
        base = int(np.flatnonzero(area >= 0.1 * area.max())[0])
        region[:, :, base + 1:] = False
        region[:, :, : max(0, int(base - 250.0 / spacing[2]))] = False
        where = "below the right lung"
    else:
        where = "in the right half of the body (no lung found)"

    window = np.maximum(np.round(15.0 / spacing).astype(int), 3)
    mean = ndimage.uniform_filter(smooth, window)
    var = ndimage.uniform_filter(smooth * smooth, window) - mean * mean
    cv = np.sqrt(np.clip(var, 0, None)) / np.maximum(mean, 1e-6)
    low, high = LIVER_SUV_RANGE
    candidate = region & (smooth >= low) & (smooth <= high) & (cv <= MAX_LOCAL_CV)
    erosion = _ball(8.0, spacing)
    core = _largest_component(ndimage.binary_erosion(candidate, erosion))
    if not core.any():
        raise FedNdifError(f"automatic liver VOI: no large region with SUV {low}-{high} {where}; "
                           "pass a liver mask")
    # The liver: near the core, with uptake like the core's, judged on a broadly smoothed image
    # so that noise tails are not cut from the statistic (lesions and other organs still are).
    broad = ndimage.gaussian_filter(canon, 2 * SMOOTH_MM / spacing)
    level = float(np.median(broad[core]))
    similar = (region & (np.abs(broad - level) <= SIMILAR_UPTAKE * level)
               & (smooth >= 0.6 * level) & (smooth <= 1.6 * level))
    near = ndimage.binary_dilation(core, _ball(12.0, spacing))
    liver = _largest_component(similar & near)
    depth = _depth(liver, spacing)
    center = np.unravel_index(int(np.argmax(depth)), depth.shape)
    if depth[center] < 0.5 * VOI_MIN_RADIUS_MM:
        raise FedNdifError("automatic liver VOI: the liver-like region is too thin for a 3 cm "
                           "VOI; pass a liver mask")
    # Sparse (broadcast) grids: full-size int64 grids cost 24 bytes per voxel.
    grids = np.meshgrid(*(np.arange(n) for n in canon.shape), indexing="ij", sparse=True)
    dist2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, center, spacing, strict=True))
    voi = (dist2 <= VOI_MAX_RADIUS_MM**2) & liver & (depth > spacing.min())
    if voi.sum() < MIN_LIVER_VOXELS:
        raise FedNdifError(f"automatic liver VOI holds only {int(voi.sum())} voxels; pass a liver "
                           "mask")
    lung_base = None
    if lung is not None:
        area = lung.sum(axis=(0, 1))
        lung_base = int(np.flatnonzero(area >= 0.1 * area.max())[0])
    check_liver_voi(canon, voi, body, spacing, lung_base)
    log.debug("automatic liver VOI: %d voxels, %s", int(voi.sum()), where)
    return np.ascontiguousarray(apply_orientation(voi, back).transpose(2, 1, 0).astype(bool))


def check_liver_voi(canon: np.ndarray, voi: np.ndarray, body: np.ndarray, spacing: np.ndarray,
                    lung_base: int | None) -> None:
    """Refuse (one line) an automatic VOI that cannot be the liver: on the patient's left, low
    in a long body, too small, or with an uptake no liver has. ``canon``, ``voi`` and ``body``
    are in canonical RAS voxel order (x to the patient's right, z up), ``spacing`` in mm.

    Height: with the right lung found (``lung_base``, its base's slice), the VOI's centre lies
    at most MAX_BELOW_LUNG_MM below that base (the liver's dome sits under the right lung);
    without it, in the upper part of a long field of view."""
    xs = np.nonzero(body.any(axis=(1, 2)))[0]
    zs = np.nonzero(body.any(axis=(0, 1)))[0]
    vx, _, vz = (np.nonzero(voi)[i].mean() for i in range(3))
    midline = (float(xs[0]) + float(xs[-1])) / 2.0
    right_mm = (vx - midline) * spacing[0]
    problems = []
    if right_mm < MIN_RIGHT_MM:
        problems.append(f"its centre lies {-right_mm:.0f} mm to the patient's left of the "
                        "body's midline (the liver is in the right upper abdomen; the patient's "
                        "right is read from the series' orientation)")
    length = (zs[-1] - zs[0] + 1) * spacing[2]
    log.debug("automatic liver VOI centre: %.0f mm below the lung base",
              (lung_base - vz) * spacing[2] if lung_base is not None else float("nan"))
    if lung_base is not None:
        below = (lung_base - vz) * spacing[2]
        if below > MAX_BELOW_LUNG_MM:
            problems.append(f"its centre lies {below:.0f} mm below the base of the right lung "
                            f"(the liver sits under it, at most {MAX_BELOW_LUNG_MM:g} mm)")
    elif length >= LONG_BODY_MM:
        height = (vz - zs[0]) / max(zs[-1] - zs[0], 1)
        if height < 1.0 - UPPER_FRACTION:
            problems.append(f"it lies in the lower {100 * height:.0f} % of the body's "
                            f"{length / 10:.0f} cm (the liver is in the upper abdomen)")
    ml = float(voi.sum() * np.prod(spacing)) / 1000.0
    if ml < VOI_MIN_ML:
        problems.append(f"it holds {ml:.1f} ml (at least {VOI_MIN_ML:g} ml)")
    mean = float(canon[voi].mean())
    low, high = VOI_MEAN_SUV
    if not low <= mean <= high:
        problems.append(f"its mean SUV {mean:.2f} is outside the liver's {low}-{high}")
    if problems:
        raise FedNdifError("automatic liver VOI is implausible: " + "; ".join(problems)
                           + f"; {OVERRIDE}")


def check_nstd(nstd: float, how: str) -> None:
    """Refuse an NSTD no liver of a clinical or low-count PET scan has."""
    low, high = NSTD_RANGE
    if not (np.isfinite(nstd) and low <= nstd <= high):
        raise FedNdifError(f"liver NSTD {nstd:.4f} ({how}) is implausible: PET scans from full "
                           f"to 1 % count stay within {low}-{high}; {OVERRIDE}")


def measure_liver_nstd(volume: Volume, liver_mask: np.ndarray | None = None) -> tuple[float, str]:
    """Liver NSTD of ``volume`` and how the liver was found (mask or automatic VOI). An
    automatic VOI and its NSTD are checked for plausibility; a mask is the user's word."""
    if liver_mask is not None:
        return liver_nstd(volume.array, liver_mask), "liver mask"
    voi = find_liver_voi(volume)
    nstd = liver_nstd(volume.array, voi, erode=0)
    check_nstd(nstd, "automatic liver VOI")
    k, j, i = (float(np.mean(axis)) for axis in np.nonzero(voi))
    x, y, z = (volume.affine @ np.array([i, j, k, 1.0]))[:3]
    return nstd, f"automatic liver VOI at ({x:.0f}, {y:.0f}, {z:.0f}) mm (RAS)"

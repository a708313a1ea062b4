"""A 2D (per axial slice) PET scanner simulator: projection, Poisson counts, thinning, OSEM.

Written by hand with scipy.sparse because no maintained Python package offers a fast batched
emission projector with attenuation and OSEM that installs from PyPI without a GPU (parallelproj
needs conda; skimage's radon/iradon_sart is per slice and ~0.8 s per 128x128 MLEM iteration).
One sparse system matrix per grid serves every slice and every count level in one product.

Physics per slice: activity blurred by the scanner's PSF, line integrals over parallel-beam
lines, attenuation, a smooth scatter + randoms background, Poisson counts for the full-count
scan; each low-count scan is a binomial thinning of those same counts (as list-mode data is
cut); every scan is reconstructed with OSEM using the true attenuation and background (as
a clinical reconstruction does), then post-filtered. The system model carries the count
fraction, so each reconstruction is in SUV and unbiased against the full-count image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
# Key of the noise-free reconstruction in simulate_scans' result.
NOISE_FREE = "noise_free"


@dataclass(frozen=True)
class ScannerProfile:
    """What makes one site's images differ from another's."""

    name: str
    matrix: int  # in-plane voxels (square)
    pixel_mm: float
    slices: int
    slice_mm: float
    psf_fwhm_mm: float  # in-plane system resolution
    axial_fwhm_mm: float
    angles: int  # projection angles over 180 degrees
    sensitivity: float  # expected full-count trues per SUV*mm of attenuated line integral
    background_fraction: float  # scatter + randoms as a fraction of trues
    osem_iterations: int
    osem_subsets: int
    postfilter_fwhm_mm: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.slices, self.matrix, self.matrix)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return (self.slice_mm, self.pixel_mm, self.pixel_mm)


@dataclass(frozen=True)
class _System:
    """Sparse parallel-beam projector restricted to the circular field of view."""

    fov_index: np.ndarray  # flat in-plane indices of the pixels inside the FOV
    subsets: tuple[tuple[sp.csr_matrix, sp.csr_matrix], ...]  # (A_s, A_s^T) per OSEM subset
    full: sp.csr_matrix  # all rows, subset-ordered


@functools.lru_cache(maxsize=8)
def _system(matrix: int, pixel_mm: float, angles: int, subsets: int) -> _System:
    """Pixel-driven projector with linear interpolation onto detector bins of one pixel width.

    Entries are path lengths in mm, so ``A @ f`` of an SUV image is a line integral in SUV*mm.
    """
    centres = np.arange(matrix) - (matrix - 1) / 2
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    inside = (xx**2 + yy**2) <= (matrix / 2) ** 2
    fov_index = np.flatnonzero(inside.ravel())
    xs, ys = xx.ravel()[fov_index], yy.ravel()[fov_index]
    bins = int(np.ceil(matrix * np.sqrt(2.0))) + 2
    columns = np.arange(fov_index.size)
    per_subset = []
    for subset in range(subsets):
        rows, cols, vals = [], [], []
        for row_block, angle_index in enumerate(range(subset, angles, subsets)):
            theta = np.pi * angle_index / angles
            s = xs * np.cos(theta) + ys * np.sin(theta) + (bins - 1) / 2
            lower = np.floor(s).astype(np.int64)
            frac = s - lower
            for offset, weight in ((0, 1.0 - frac), (1, frac)):
                rows.append(row_block * bins + lower + offset)
                cols.append(columns)
                vals.append(weight * pixel_mm)
        n_rows = len(range(subset, angles, subsets)) * bins
        a = sp.csr_matrix(
            (np.concatenate(vals).astype(np.float32),
             (np.concatenate(rows), np.concatenate(cols))),
            shape=(n_rows, fov_index.size),
        )
        per_subset.append((a, a.T.tocsr()))
    full = sp.vstack([a for a, _ in per_subset]).tocsr()
    return _System(fov_index=fov_index, subsets=tuple(per_subset), full=full)


def _gaussian_sigma_vox(fwhm_zyx_mm: tuple[float, float, float],
                        spacing: tuple[float, float, float]) -> list[float]:
    return [f / FWHM_PER_SIGMA / s for f, s in zip(fwhm_zyx_mm, spacing, strict=True)]


def simulate_scans(
    activity: np.ndarray, mu: np.ndarray, profile: ScannerProfile,
    count_levels: list[float], rng: np.random.Generator, *, noise_free: bool = False,
) -> dict[float | str, np.ndarray]:
    """Reconstructed images (SUV, float32, z-y-x) of one subject at full count and each level.

    ``1.0`` (full count) is always included in the result. With ``noise_free``, also
    ``NOISE_FREE``: the full-count scan's expected counts (no Poisson draw) through the same
    OSEM and post-filter, what a perfect denoiser of this scanner could at best return. It
    draws nothing from ``rng``, so the other scans are the same with or without it.
    """
    if activity.shape != profile.shape:
        raise ValueError(f"activity shape {activity.shape} does not match {profile.shape}")
    levels = sorted({1.0, *(float(c) for c in count_levels)}, reverse=True)
    system = _system(profile.matrix, profile.pixel_mm, profile.angles, profile.osem_subsets)
    nz = profile.slices

    blurred = ndimage.gaussian_filter(
        activity.astype(np.float32),
        _gaussian_sigma_vox((profile.axial_fwhm_mm, profile.psf_fwhm_mm, profile.psf_fwhm_mm),
                            profile.spacing),
    )
    # Columns = slices; rows = in-FOV pixels.
    image_cols = np.ascontiguousarray(blurred.reshape(nz, -1)[:, system.fov_index].T)
    mu_cols = np.ascontiguousarray(mu.reshape(nz, -1)[:, system.fov_index].T)
    attenuation = np.exp(-(system.full @ mu_cols))
    trues = profile.sensitivity * attenuation * (system.full @ image_cols)
    # Scatter and randoms: a broad, smooth version of the trues along each projection.
    bins = int(np.ceil(profile.matrix * np.sqrt(2.0))) + 2
    smooth = ndimage.gaussian_filter1d(trues.reshape(-1, bins, nz), sigma=bins / 6, axis=1)
    background = (profile.background_fraction * smooth.reshape(trues.shape)
                  + 1e-3 * max(float(trues.mean()), 1e-6))
    full_counts = rng.poisson(trues + background)
    counts = [full_counts if c == 1.0 else rng.binomial(full_counts, c) for c in levels]
    keys: list[float | str] = list(levels)
    if noise_free:
        counts.append(trues + background)
        keys.append(NOISE_FREE)

    # Reconstruct all scans together: columns = (scan, slice). Columns are independent.
    level_scale = np.repeat(np.asarray([1.0 if k == NOISE_FREE else k for k in keys],
                                       np.float32), nz)
    data = np.concatenate(counts, axis=1).astype(np.float32)
    weight = np.tile(profile.sensitivity * attenuation, (1, len(keys))).astype(np.float32)
    weight *= level_scale
    bg = (np.tile(background, (1, len(keys))) * level_scale).astype(np.float32)
    estimate = _osem(system, data=data, weight=weight, background=bg,
                     iterations=profile.osem_iterations)

    volumes = {}
    sigma = _gaussian_sigma_vox(
        (profile.postfilter_fwhm_mm,) * 3, profile.spacing) if profile.postfilter_fwhm_mm else None
    for index, level in enumerate(keys):
        volume = np.zeros((nz, profile.matrix * profile.matrix), np.float32)
        volume[:, system.fov_index] = estimate[:, index * nz:(index + 1) * nz].T
        volume = volume.reshape(profile.shape)
        if sigma is not None:
            volume = ndimage.gaussian_filter(volume, sigma)
        volumes[level] = volume
    return volumes


def _osem(system: _System, *, data: np.ndarray, weight: np.ndarray, background: np.ndarray,
          iterations: int) -> np.ndarray:
    """Ordered-subsets EM for many independent sinograms at once (one per column).

    ``data`` rows are subset-ordered like ``system.full``; the forward model of column c is
    ``weight[:, c] * (A @ f[:, c]) + background[:, c]``.
    """
    starts = np.cumsum([0] + [a.shape[0] for a, _ in system.subsets])
    estimate = np.ones((system.fov_index.size, data.shape[1]), np.float32)
    sensitivities = [
        np.maximum(at @ weight[starts[s]:starts[s + 1]], 1e-8)
        for s, (_, at) in enumerate(system.subsets)
    ]
    for _ in range(iterations):
        for s, (a, at) in enumerate(system.subsets):
            rows = slice(starts[s], starts[s + 1])
            expected = weight[rows] * (a @ estimate) + background[rows]
            ratio = data[rows] / np.maximum(expected, 1e-8)
            estimate *= (at @ (weight[rows] * ratio)) / sensitivities[s]
    return estimate

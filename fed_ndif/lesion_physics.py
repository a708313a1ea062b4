"""The physics of a lesion added to a reconstructed PET image: a true ball blurred by the
scanner's resolution, with the noise of its uptake (:mod:`fed_ndif.training.augment` says
why). Shared by training-time lesion insertion and by the detectability observer's test
lesions, so that both insert lesions one way.

Hand-written (no library inserts lesions into PET images); the blur is MONAI's
``GaussianFilter``.
"""

from __future__ import annotations

import math

import torch
from monai.networks.layers import GaussianFilter

# Pixels of the full count above this SUV are "inside the body", where a lesion may go.
BODY_SUV = 0.3
# Local background level: the full count's median over a disc of this radius around the centre
# (the median, so that a lesion placed beside the bladder is not scaled by the bladder).
BACKGROUND_RADIUS_MM = 8.0
# The local mean that sets the noise gain: the full count smoothed by this sigma (pixels).
MEAN_SIGMA_PX = 1.5
# Sub-voxel samples per axis when the ball is voxelized (partial volume at its edge).
SUPERSAMPLE = 3
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def ball_profile(shape: tuple[int, int, int], centre: tuple[float, float, float], *,
                 radius_mm: float, spacing: tuple[float, float, float],
                 fwhm_mm: tuple[float, float, float] | None) -> torch.Tensor:
    """A uniform ball (value 1) of ``radius_mm`` at ``centre`` (voxel coordinates, z y x, which
    may lie outside the grid) on a grid of ``shape`` and ``spacing``, convolved with a gaussian
    of ``fwhm_mm`` (z, y, x; None: not blurred, only its partial volume). Computed in a box
    around the ball with room for the blur, so the grid's borders cut nothing off."""
    sigma_mm = [f / FWHM_PER_SIGMA for f in fwhm_mm] if fwhm_mm else [0.0, 0.0, 0.0]
    half = [math.ceil((radius_mm + 4.0 * s) / d) + 1
            for s, d in zip(sigma_mm, spacing, strict=True)]
    origin = [round(c) - h for c, h in zip(centre, half, strict=True)]
    offsets = (torch.arange(SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE - 0.5
    axes = []
    for h, o, c, d in zip(half, origin, centre, spacing, strict=True):
        fine = (torch.arange(2 * h + 1, dtype=torch.float32) + o)[:, None] + offsets[None, :]
        axes.append(((fine - c) * d).flatten())
    z, y, x = axes
    inside = (z[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2
              <= radius_mm ** 2).float()
    ball = torch.nn.functional.avg_pool3d(inside[None, None], SUPERSAMPLE)[0, 0]
    box = ball
    if fwhm_mm:
        sigma = [s / d for s, d in zip(sigma_mm, spacing, strict=True)]
        box = GaussianFilter(spatial_dims=3, sigma=sigma)(ball[None, None])[0, 0]
    out = torch.zeros(shape, dtype=torch.float32)
    src, dst = [], []
    for n, o, size in zip(shape, origin, box.shape, strict=True):
        lo, hi = max(o, 0), min(o + size, n)
        if lo >= hi:
            return out
        dst.append(slice(lo, hi))
        src.append(slice(lo - o, hi - o))
    out[tuple(dst)] = box[tuple(src)]
    return out


def local_background(full: torch.Tensor, cy: int, cx: int, pixel_mm: tuple[float, float],
                     body_level: float) -> float:
    """The full count's median over the body within ``BACKGROUND_RADIUS_MM`` of (cy, cx)."""
    height, width = full.shape
    yy, xx = torch.meshgrid((torch.arange(height) - cy) * pixel_mm[0],
                            (torch.arange(width) - cx) * pixel_mm[1], indexing="ij")
    near = ((yy ** 2 + xx ** 2) <= BACKGROUND_RADIUS_MM ** 2) & (full > body_level)
    return float(full[near].median()) if bool(near.any()) else body_level


def add_sphere(low: torch.Tensor, full: torch.Tensor, *, centre: tuple[float, float, float],
               radius_mm: float, uptake: float, spacing: tuple[float, float, float],
               fwhm_mm: tuple[float, float, float] | None, count_level: float,
               body_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A sphere of ``uptake`` (SUV added) at ``centre`` (voxels, z y x) added to the (Z, H, W)
    low count, with the noise of its uptake; ``full`` is the full count at the same slices.
    Returns the new low count and the noise-free uptake added (what the full count gains)."""
    where = {"shape": tuple(low.shape), "centre": centre, "radius_mm": radius_mm,
             "spacing": spacing}
    added = uptake * ball_profile(**where, fwhm_mm=fwhm_mm).to(low.dtype)
    # Counts come from the true activity: the noise grows with the unblurred ball's uptake.
    emitted = uptake * ball_profile(**where, fwhm_mm=None).to(low.dtype)
    mean = smooth_slices(full).clamp_min(body_level)
    return low + added + noise_scale(emitted / mean, count_level) * (low - full), added


def noise_scale(relative_added: torch.Tensor, level: float) -> torch.Tensor:
    """The multiple ``c`` of the noise field (low minus full count) to add so the input's noise
    variance grows by ``1 + relative_added``: with v the low count's variance, (1 - p) v the
    field's and their covariance (1 - p) v (thinning), the new variance is
    ``v (1 + (1 - p)(c^2 + 2c))``; solve for c >= 0."""
    kept = max(1.0 - min(level, 0.99), 1e-2)
    return torch.sqrt(1.0 + relative_added / kept) - 1.0


def smooth_slices(stack: torch.Tensor) -> torch.Tensor:
    """Each slice of a (C, H, W) stack smoothed in-plane."""
    gaussian = GaussianFilter(spatial_dims=2, sigma=MEAN_SIGMA_PX)
    return gaussian(stack[:, None])[:, 0]

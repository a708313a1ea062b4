"""Training-time augmentation of (low-count stack, full-count slice) pairs.

Lesion insertion: lesions are under 0.1 % of the voxels and a site has a few dozen, so a network
trained on a handful of subjects learns that small hot spots are mostly noise and smooths them
away. Inserting hot spheres of random size and contrast, consistently into the low-count stack
and its full-count target, shows it many lesions it must keep. The sphere is 3D: each slice of
the 2.5D stack gets the cross-section at its own depth, so an inserted lesion looks like a real
one, not like noise confined to one slice.

The low-count copy also gets the noise a hotter region would have: the image's own
high-frequency texture (input minus its smoothed self) scaled by sqrt(1 + added / local mean),
so variance grows in proportion to the mean as with Poisson counts, with the reconstruction's
own noise correlation. The full-count target gets the sphere without extra noise: its noise is
what the network should not learn to reproduce anyway.

Hand-written (no library inserts lesions into PET pairs); the smoothing is MONAI's
``GaussianFilter``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.layers import GaussianFilter

from fed_ndif.errors import FedNdifError

# Pixels of the full count above this SUV are "inside the body", where a lesion may go.
BODY_SUV = 0.3
# Local background level: the full count's median over a disc of this radius around the centre
# (the median, so that a lesion placed beside the bladder is not scaled by the bladder).
BACKGROUND_RADIUS_MM = 8.0
# The noise texture is the input minus its gaussian-smoothed self (sigma in pixels).
TEXTURE_SIGMA_PX = 1.5
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class LesionInsertion:
    """``probability`` per image; radius (mm) and contrast (added uptake / local background)
    uniform in their ranges; edges blurred to the scanner's ``fwhm_mm``."""

    probability: float = 0.0
    radius_mm: tuple[float, float] = (2.5, 10.0)
    contrast: tuple[float, float] = (0.5, 4.0)
    fwhm_mm: float = 6.0

    def __post_init__(self) -> None:
        ok = (0.0 <= self.probability <= 1.0 and 0 < self.radius_mm[0] <= self.radius_mm[1]
              and 0 < self.contrast[0] <= self.contrast[1] and self.fwhm_mm > 0)
        if not ok:
            raise FedNdifError(f"train.insert_lesions: invalid settings {self}: need probability "
                               "in [0, 1], 0 < radius_mm[0] <= radius_mm[1], 0 < contrast[0] <= "
                               "contrast[1], fwhm_mm > 0")

    @classmethod
    def from_config(cls, train: dict[str, Any]) -> LesionInsertion:
        settings = dict(train.get("insert_lesions") or {})
        for key in ("radius_mm", "contrast"):
            if key in settings:
                settings[key] = tuple(float(v) for v in settings[key])
        try:
            return cls(**settings)
        except TypeError as exc:
            raise FedNdifError(f"train.insert_lesions: {exc}") from None


def insert_lesions(low: torch.Tensor, full: torch.Tensor, spacing: torch.Tensor, *,
                   settings: LesionInsertion, body_level: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``low`` (N, 2k+1, H, W) and ``full`` (N, 1, H, W) in network units, ``spacing`` (N, 3)
    voxel size in mm (z, y, x); ``body_level`` is ``BODY_SUV`` in network units. Returns new
    tensors; every draw comes from ``generator``, a fixed number per image, so a step is the
    same on resume."""
    n, channels, height, width = low.shape
    k = channels // 2
    draws = torch.rand(n, 5, generator=generator)
    low, full = low.clone(), full.clone()
    for i in range(n):
        chosen, radius_u, contrast_u, depth_u, _ = draws[i].tolist()
        body = full[i, 0] > body_level
        if chosen >= settings.probability or not bool(body.any()):
            continue
        radius = settings.radius_mm[0] + radius_u * (settings.radius_mm[1] - settings.radius_mm[0])
        contrast = settings.contrast[0] + contrast_u * (settings.contrast[1] - settings.contrast[0])
        dz, dy, dx = (float(v) for v in spacing[i])
        centre = int(torch.multinomial(_inside(body, radius / min(dy, dx)).flatten().float(), 1,
                                       generator=generator))
        cy, cx = divmod(centre, width)
        # The target slice cuts the sphere anywhere within half a radius of its centre.
        z_target = (depth_u - 0.5) * radius
        y = (torch.arange(height, dtype=torch.float32) - cy) * dy
        x = (torch.arange(width, dtype=torch.float32) - cx) * dx
        z = (torch.arange(channels, dtype=torch.float32) - k) * dz + z_target
        distance = torch.sqrt(z[:, None, None] ** 2 + y[None, :, None] ** 2
                              + x[None, None, :] ** 2)
        sigma = settings.fwhm_mm / FWHM_PER_SIGMA
        # A sphere blurred by a gaussian, to first order in sigma / radius: an erfc edge.
        profile = 0.5 * torch.erfc((distance - radius) / (math.sqrt(2.0) * sigma))
        near = (y[:, None] ** 2 + x[None, :] ** 2) <= BACKGROUND_RADIUS_MM ** 2
        background = float(full[i, 0][near & body].median()) if bool((near & body).any()) \
            else body_level
        added = contrast * background * profile.to(low.dtype)
        full[i, 0] += added[k]
        smooth = _smooth(low[i])
        gain = torch.sqrt(1.0 + added / smooth.clamp_min(body_level))
        low[i] = low[i] + added + (low[i] - smooth) * (gain - 1.0)
    return low, full


def _inside(body: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Body pixels at least ``radius_px`` from air (the body itself where none are): a lesion
    sits in tissue, not half in air. Beyond the patch's border counts as body."""
    r = math.ceil(radius_px)
    air_near = torch.nn.functional.max_pool2d((~body).float()[None, None], 2 * r + 1, stride=1,
                                              padding=r)[0, 0]
    inside = body & (air_near == 0)
    return inside if bool(inside.any()) else body


def _smooth(stack: torch.Tensor) -> torch.Tensor:
    """Each slice of a (C, H, W) stack smoothed in-plane."""
    gaussian = GaussianFilter(spatial_dims=2, sigma=TEXTURE_SIGMA_PX)
    return gaussian(stack[:, None])[:, 0]

"""Training-time augmentation of (low-count stack, full-count slice) pairs.

Lesion insertion: lesions are under 0.1 % of the voxels and a site has a few dozen, so a network
trained on a handful of subjects learns that small hot spots are mostly noise and smooths them
away. Inserting hot spheres of random size and contrast, consistently into the low-count stack
and its full-count target, shows it many lesions it must keep. The sphere is 3D: each slice of
the 2.5D stack gets the cross-section at its own depth.

Physics, so that an inserted lesion looks like a reconstructed one and not like a shortcut:
- **Resolution.** The sphere is a true uniform ball convolved with the site's own resolution (a
  gaussian of the reconstructed image's FWHM along z, y and x, from the site folder's
  ``scanner.json``). A small sphere then loses contrast as the scanner loses it: at 6 mm FWHM
  the centre of a 2.5 mm-radius ball keeps about a fifth of its uptake. The ball is sampled on
  a sub-voxel grid (partial volume) and blurred with the separable gaussian.
- **Noise.** Reconstructed noise is spatially correlated and its variance grows with the local
  mean. The input's own noise field is the low count minus the full count (for a low count made
  by thinning a fraction p of the full count's events, that difference carries (1 - p) of the
  low count's noise variance, with the reconstruction's correlation). Adding ``c x`` that field,
  with ``c`` solved so that the variance becomes ``1 + added / mean`` times the original (Poisson
  statistics at the new mean), gives the lesion the noise of its uptake, at the right texture.
  The full-count target gets the sphere without extra noise: its noise is what the network
  should not learn to reproduce anyway.

Hand-written (no library inserts lesions into PET pairs); the blur is MONAI's
``GaussianFilter``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from monai.networks.layers import GaussianFilter

from fed_ndif.errors import FedNdifError

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


@dataclass(frozen=True)
class LesionInsertion:
    """``probability`` per image; radius (mm) and contrast (added uptake / local background)
    uniform in their ranges; ``fwhm_mm``: the resolution used where a site's folder does not
    state its own (``scanner.json``). Every value comes from ``train.insert_lesions``."""

    probability: float
    radius_mm: tuple[float, float]
    contrast: tuple[float, float]
    fwhm_mm: float

    def __post_init__(self) -> None:
        ok = (0.0 <= self.probability <= 1.0 and 0 < self.radius_mm[0] <= self.radius_mm[1]
              and 0 < self.contrast[0] <= self.contrast[1] and self.fwhm_mm > 0)
        if not ok:
            raise FedNdifError(f"train.insert_lesions: invalid settings {self}: need probability "
                               "in [0, 1], 0 < radius_mm[0] <= radius_mm[1], 0 < contrast[0] <= "
                               "contrast[1], fwhm_mm > 0")

    @classmethod
    def from_config(cls, train: dict[str, Any]) -> LesionInsertion | None:
        """None where the config has no ``insert_lesions`` (checkpoints from before it): off."""
        if not train.get("insert_lesions"):
            return None
        settings = dict(train["insert_lesions"])
        unknown = set(settings) - {f.name for f in fields(cls)}
        missing = {f.name for f in fields(cls)} - set(settings)
        if unknown or missing:
            raise FedNdifError(f"train.insert_lesions: unknown settings {sorted(unknown)}, "
                               f"missing {sorted(missing)}")
        for key in ("radius_mm", "contrast"):
            try:
                low, high = (float(v) for v in settings[key])
            except (TypeError, ValueError):
                raise FedNdifError(f"train.insert_lesions.{key}: need [LOW, HIGH], got "
                                   f"{settings[key]!r}") from None
            settings[key] = (low, high)
        try:
            return cls(**{k: v if isinstance(v, tuple) else float(v) for k, v in settings.items()})
        except (TypeError, ValueError) as exc:
            raise FedNdifError(f"train.insert_lesions: {exc}") from None


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


def insert_lesions(low: torch.Tensor, full: torch.Tensor, *, full_stack: torch.Tensor,
                   spacing: torch.Tensor, fwhm: torch.Tensor, count_level: torch.Tensor,
                   settings: LesionInsertion, body_level: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``low`` (N, 2k+1, H, W), ``full`` (N, 1, H, W) and ``full_stack`` (the full count at
    ``low``'s slices) in network units; ``spacing`` and ``fwhm`` (N, 3) in mm (z, y, x), a
    non-positive ``fwhm`` meaning "use ``settings.fwhm_mm``"; ``count_level`` (N,) the input's
    fraction of full count; ``body_level`` is ``BODY_SUV`` in network units. Returns new
    tensors; every draw comes from ``generator``, a fixed number per image, so a step is the
    same on resume."""
    n, channels, _, width = low.shape
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
        step = tuple(float(v) for v in spacing[i])
        resolution = tuple(float(v) if v > 0 else settings.fwhm_mm for v in fwhm[i])
        centre = int(torch.multinomial(_inside(body, radius / min(step[1:])).flatten().float(), 1,
                                       generator=generator))
        cy, cx = divmod(centre, width)
        # The target slice cuts the sphere anywhere within half a radius of its centre.
        cz = k - (depth_u - 0.5) * radius / step[0]
        background = local_background(full[i, 0], cy, cx, step[1:], body_level)
        low[i], added = add_sphere(low[i], full_stack[i], centre=(cz, float(cy), float(cx)),
                                   radius_mm=radius, uptake=contrast * background,
                                   spacing=step, fwhm_mm=resolution,
                                   count_level=float(count_level[i]), body_level=body_level)
        full[i, 0] += added[k]
    return low, full


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
    mean = _smooth(full).clamp_min(body_level)
    return low + added + _noise_scale(emitted / mean, count_level) * (low - full), added


def _noise_scale(relative_added: torch.Tensor, level: float) -> torch.Tensor:
    """The multiple ``c`` of the noise field (low minus full count) to add so the input's noise
    variance grows by ``1 + relative_added``: with v the low count's variance, (1 - p) v the
    field's and their covariance (1 - p) v (thinning), the new variance is
    ``v (1 + (1 - p)(c^2 + 2c))``; solve for c >= 0."""
    kept = max(1.0 - min(level, 0.99), 1e-2)
    return torch.sqrt(1.0 + relative_added / kept) - 1.0


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
    gaussian = GaussianFilter(spatial_dims=2, sigma=MEAN_SIGMA_PX)
    return gaussian(stack[:, None])[:, 0]

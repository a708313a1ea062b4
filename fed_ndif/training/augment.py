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

from fed_ndif.errors import FedNdifError
from fed_ndif.lesion_physics import add_sphere, local_background


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


def _inside(body: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Body pixels at least ``radius_px`` from air (the body itself where none are): a lesion
    sits in tissue, not half in air. Beyond the patch's border counts as body."""
    r = math.ceil(radius_px)
    air_near = torch.nn.functional.max_pool2d((~body).float()[None, None], 2 * r + 1, stride=1,
                                              padding=r)[0, 0]
    inside = body & (air_near == 0)
    return inside if bool(inside.any()) else body

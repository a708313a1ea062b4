"""Noise texture: the noise power spectrum (NPS) of a denoised volume against full count's.

PSNR and liver NSTD say how much noise is left, not what it looks like. A denoiser can halve
the noise and leave it as blobs a reader takes for structure (a plastic, mottled texture), or
add fine-grained noise of its own (a diffusion sample). The NPS tells these apart: its total
is the noise variance, its mean spatial frequency the grain.

Noise here is the image minus the noise-free reconstruction of the same scan (simulated
sites), its mean removed per slice and region, inside the liver (uniform uptake: almost all of
the difference is noise) and inside the body (there the difference also holds each method's
blur of edges). 2D NPS per axial slice, summed over slices, as is usual for PET and CT NPS;
the summaries are ratios to the full count's, so 1 is full count's texture:
``nps_power_<region>``: noise variance against full count's (below 1: less noise);
``nps_frequency_<region>``: the NPS-weighted mean radial frequency against full count's
(below 1: coarser, blotchier grain; above 1: finer). Hand-written: neither scikit-image nor
MONAI has an NPS.
"""

from __future__ import annotations

import math

import numpy as np

REGIONS = ("liver", "body")
KEYS = tuple(f"nps_{what}_{region}" for region in REGIONS for what in ("power", "frequency"))


def power_and_frequency(noise: np.ndarray, mask: np.ndarray,
                        spacing_yx: tuple[float, float]) -> tuple[float, float]:
    """Total noise power and NPS-weighted mean radial frequency (cycles/mm) of ``noise``
    inside ``mask`` (z, y, x), over the axial slices where the mask has voxels."""
    fy = np.fft.fftfreq(noise.shape[1], d=spacing_yx[0])
    fx = np.fft.fftfreq(noise.shape[2], d=spacing_yx[1])
    radial = np.hypot(*np.meshgrid(fy, fx, indexing="ij"))
    power = weighted = 0.0
    for plane, inside in zip(noise, mask, strict=True):
        if inside.sum() < 2:
            continue
        zero_mean = np.where(inside, plane - plane[inside].mean(), 0.0)
        spectrum = np.abs(np.fft.fft2(zero_mean)) ** 2
        power += float(spectrum.sum())
        weighted += float((spectrum * radial).sum())
    return power, (weighted / power if power > 0 else math.nan)


def texture_metrics(output: np.ndarray, full: np.ndarray, ideal: np.ndarray, *,
                    masks: dict[str, np.ndarray], spacing_yx: tuple[float, float]
                    ) -> dict[str, float]:
    """The ``KEYS`` of ``output`` against full count, per region of ``masks`` (liver, body)."""
    out = {}
    for region in REGIONS:
        mask = masks[region]
        mine = power_and_frequency(output - ideal, mask, spacing_yx)
        theirs = power_and_frequency(full - ideal, mask, spacing_yx)
        out[f"nps_power_{region}"] = mine[0] / theirs[0] if theirs[0] > 0 else math.nan
        out[f"nps_frequency_{region}"] = mine[1] / theirs[1] if theirs[1] > 0 else math.nan
    return out

"""Lesion uptake on whole 3D volumes in SUV: SUVmax, SUVmean, SUVpeak, contrast recovery, CNR.

Each is compared with the full-count image and, where the site has one, with a noise-free
reconstruction of the same scan: maxima of a noisy reference carry noise, so a perfect
denoiser does not score 0 % against full count, but it does against the noise-free image.
Lesions are grouped by size (equivalent-sphere diameter), because at PET resolution small
lesions lose uptake to partial volume whatever a denoiser does.

SUVpeak follows PERCIST: the highest mean SUV in a 1 cm³ sphere (12.4 mm across) centred on a
voxel of the lesion, in world millimetres (anisotropic voxels included); voxels the sphere
cuts count with the fraction of them inside it. Written by hand: no maintained library defines
PET lesion SUVpeak, SUV bias or CNR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal

# A lesion's local background: a shell from one FWHM of the site's resolution outside the
# lesion (closer, the lesion's own blurred uptake spills in) to this much further out.
SHELL_WIDTH_MM = 10.0
# The resolution assumed where a site's folder does not state its own (fed_ndif.data.resolution):
# a clinical whole-body PET reconstruction's, on the coarse side.
FALLBACK_FWHM_MM = 8.0
MIN_SHELL_VOXELS = 4
# Contrast recovery is a ratio of contrasts: for lesions barely visible in the full-count image
# (lesion/background < 1.5) it divides by ~0 and means nothing, so it is left out for them.
MIN_REFERENCE_CONTRAST = 0.5
PEAK_VOLUME_MM3 = 1000.0
# Size groups by equivalent-sphere diameter: (key, label, lower mm, upper mm).
SIZE_GROUPS = (("lt10", "< 10 mm", 0.0, 10.0), ("ge10", "≥ 10 mm", 10.0, math.inf))
UPTAKE = ("suvmax", "suvmean", "suvpeak")


def peak_kernel(spacing: Sequence[float], *, volume_mm3: float = PEAK_VOLUME_MM3,
                supersample: int = 7) -> np.ndarray:
    """Weights (summing to 1) of a sphere of ``volume_mm3`` on a (z, y, x) grid of ``spacing``
    mm: each voxel weighs the fraction of it inside the sphere (sampled at supersample³ points)."""
    radius = (3.0 * volume_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0)
    half = [math.ceil(radius / s + 0.5) for s in spacing]
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    axes = [np.add.outer(np.arange(-h, h + 1), offsets).ravel() * s
            for h, s in zip(half, spacing, strict=True)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    inside = (z**2 + y**2 + x**2) <= radius**2
    shape = [2 * h + 1 for h in half]
    weights = inside.reshape(shape[0], supersample, shape[1], supersample, shape[2],
                             supersample).mean(axis=(1, 3, 5))
    return weights / weights.sum()


def equivalent_diameter_mm(voxels: int, spacing: Sequence[float]) -> float:
    return float((6.0 * voxels * float(np.prod(spacing)) / math.pi) ** (1.0 / 3.0))


def size_group(diameter_mm: float) -> str:
    return next(key for key, _, low, high in SIZE_GROUPS if low <= diameter_mm < high)


@dataclass(frozen=True)
class Uptake:
    """One lesion in one image."""

    suvmax: float
    suvmean: float
    suvpeak: float
    background_mean: float
    background_sd: float


class LesionSet:
    """The lesions of one study, with their sizes and local backgrounds, found once and then
    measured in any number of images on the same grid.

    A lesion's background is a 3D shell from one FWHM (``fwhm_mm``, the largest of z, y, x)
    to one FWHM + ``SHELL_WIDTH_MM`` (at least two voxels) outside it, in world millimetres,
    without air and without what lies within one FWHM of any lesion: outside the PSF tail of
    the lesion's own uptake. A lesion with too small a shell (at the edge of the body) is left
    out.
    """

    def __init__(self, lesions: np.ndarray, spacing: Sequence[float], reference: np.ndarray, *,
                 fwhm_mm: Sequence[float] | None = None):
        self.spacing = tuple(float(s) for s in spacing)
        self.kernel = peak_kernel(self.spacing)
        positive = reference[reference > 0]
        body = (reference > 0.05 * float(np.median(positive)) if positive.size
                else np.ones(reference.shape, bool))
        gap = max(fwhm_mm) if fwhm_mm is not None else FALLBACK_FWHM_MM
        outer = gap + max(SHELL_WIDTH_MM, 2.0 * max(self.spacing))
        clear = ndimage.distance_transform_edt(lesions == 0, sampling=self.spacing) > gap
        margin = [int(np.ceil(outer / s)) + 1 for s in self.spacing]
        self.labels: list[int] = []
        self.masks: list[np.ndarray] = []
        self.shells: list[np.ndarray] = []
        self.diameters: list[float] = []
        for label, box in zip(range(1, int(lesions.max(initial=0)) + 1),
                              ndimage.find_objects(lesions.astype(np.int64)), strict=False):
            if box is None:
                continue
            box = tuple(slice(max(b.start - m, 0), b.stop + m)
                        for b, m in zip(box, margin, strict=True))
            mask = np.zeros(lesions.shape, bool)
            mask[box] = lesions[box] == label
            distance = ndimage.distance_transform_edt(~mask[box], sampling=self.spacing)
            shell = np.zeros(lesions.shape, bool)
            shell[box] = (distance <= outer) & clear[box] & body[box]
            if shell.sum() < MIN_SHELL_VOXELS:
                continue
            self.labels.append(int(label))
            self.masks.append(np.flatnonzero(mask))
            self.shells.append(np.flatnonzero(shell))
            self.diameters.append(equivalent_diameter_mm(int(mask.sum()), self.spacing))

    def uptake(self, volume: np.ndarray) -> list[Uptake]:
        if not self.labels:
            return []
        flat = np.asarray(volume, np.float64).ravel()
        peaks = signal.fftconvolve(np.asarray(volume, np.float64), self.kernel,
                                   mode="same").ravel()
        return [Uptake(suvmax=float(flat[m].max()), suvmean=float(flat[m].mean()),
                       suvpeak=float(peaks[m].max()), background_mean=float(flat[s].mean()),
                       background_sd=float(flat[s].std()))
                for m, s in zip(self.masks, self.shells, strict=True)]


def _bias_pct(value: float, reference: float) -> float:
    return 100.0 * (value - reference) / reference if reference > 0 else math.nan


def _contrast(uptake: Uptake) -> float:
    bg = uptake.background_mean
    return uptake.suvmean / bg - 1.0 if bg > 0 else math.nan


def lesion_metrics(lesion_set: LesionSet, output: list[Uptake], reference: list[Uptake],
                   ideal: list[Uptake] | None = None) -> list[dict[str, float]]:
    """Per lesion: uptake bias (%) against full count and the noise-free image, contrast
    recovery (output contrast / the noise-free image's where there is one, else the full
    count's: a noisy reference's contrast carries its noise) and CNR (in the output)."""
    results = []
    for i, (out, ref) in enumerate(zip(output, reference, strict=True)):
        row = {"diameter_mm": lesion_set.diameters[i]}
        for key in UPTAKE:
            row[f"{key}_bias_pct"] = _bias_pct(getattr(out, key), getattr(ref, key))
            row[f"{key}_ideal_bias_pct"] = (_bias_pct(getattr(out, key), getattr(ideal[i], key))
                                            if ideal is not None else math.nan)
        ref_contrast = _contrast(ideal[i] if ideal is not None else ref)
        row["contrast_recovery"] = (_contrast(out) / ref_contrast
                                    if ref_contrast >= MIN_REFERENCE_CONTRAST else math.nan)
        row["cnr"] = ((out.suvmean - out.background_mean) / out.background_sd
                      if out.background_sd > 0 else math.nan)
        results.append(row)
    return results


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def summary_keys() -> list[str]:
    """The columns :func:`summarize_lesions` fills, in a stable order."""
    keys = []
    for group, *_ in SIZE_GROUPS:
        keys.append(f"lesions_{group}")
        for key in UPTAKE:
            for ref in ("", "_ideal"):
                keys += [f"{key}{ref}_bias_pct_{group}", f"abs_{key}{ref}_bias_pct_{group}"]
        keys += [f"contrast_recovery_{group}", f"cnr_{group}"]
    return keys


def summarize_lesions(results: list[dict[str, float]]) -> dict[str, float]:
    """Means over the lesions of each size group; |bias| as well as signed bias, since errors
    of both signs cancel in a signed mean."""
    out: dict[str, float] = {}
    for group, *_ in SIZE_GROUPS:
        mine = [r for r in results if size_group(r["diameter_mm"]) == group]
        out[f"lesions_{group}"] = float(len(mine))
        for key in UPTAKE:
            for ref in ("", "_ideal"):
                name = f"{key}{ref}_bias_pct"
                out[f"{name}_{group}"] = _mean([r[name] for r in mine])
                out[f"abs_{name}_{group}"] = _mean([abs(r[name]) for r in mine])
        out[f"contrast_recovery_{group}"] = _mean([r["contrast_recovery"] for r in mine])
        out[f"cnr_{group}"] = _mean([r["cnr"] for r in mine])
    return out


def lesion_summary(output: np.ndarray, reference: np.ndarray, lesions: np.ndarray,
                   spacing: Sequence[float], *, ideal: np.ndarray | None = None,
                   fwhm_mm: Sequence[float] | None = None) -> dict[str, float]:
    """:func:`summarize_lesions` of one output in one step (measuring each image once)."""
    lesion_set = LesionSet(lesions, spacing, reference, fwhm_mm=fwhm_mm)
    return summarize_lesions(lesion_metrics(
        lesion_set, lesion_set.uptake(output), lesion_set.uptake(reference),
        lesion_set.uptake(ideal) if ideal is not None else None))

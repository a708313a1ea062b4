"""Lesion metrics on whole 3D volumes in SUV: uptake bias, contrast recovery, CNR.

Written by hand: no maintained library defines PET lesion SUV bias or CNR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

BACKGROUND_SHELL_VOXELS = 3  # in-plane dilation of a lesion that defines its local background
# Contrast recovery is a ratio of contrasts: for lesions barely visible in the full-count image
# (lesion/background < 1.5) it divides by ~0 and means nothing, so it is left out for them.
MIN_REFERENCE_CONTRAST = 0.5


@dataclass(frozen=True)
class LesionResult:
    label: int
    voxels: int
    suvmax_bias_pct: float
    suvmean_bias_pct: float
    contrast_recovery: float  # output lesion contrast / reference lesion contrast
    cnr: float  # (lesion mean - background mean) / background std, in the output


def _background_shell(mask: np.ndarray, lesions: np.ndarray, body: np.ndarray) -> np.ndarray:
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 2)
    near = ndimage.binary_dilation(mask, structure, iterations=BACKGROUND_SHELL_VOXELS)
    return near & (lesions == 0) & body


def lesion_metrics(output: np.ndarray, reference: np.ndarray, lesions: np.ndarray
                   ) -> list[LesionResult]:
    """Per-lesion SUV bias against the full-count image, contrast recovery and CNR.

    The background of a lesion is a ring of 3 voxels around it in-plane (other lesions and
    air excluded), the usual local-background definition for small PET lesions.
    """
    body = reference > 0.05 * float(np.median(reference[reference > 0])) if np.any(
        reference > 0) else np.ones(reference.shape, bool)
    results = []
    for label in np.unique(lesions[lesions > 0]):
        mask = lesions == label
        shell = _background_shell(mask, lesions, body)
        if shell.sum() < 4:
            continue
        ref_max, ref_mean = float(reference[mask].max()), float(reference[mask].mean())
        out_max, out_mean = float(output[mask].max()), float(output[mask].mean())
        ref_bg, out_bg = float(reference[shell].mean()), float(output[shell].mean())
        ref_contrast = ref_mean / ref_bg - 1 if ref_bg > 0 else math.nan
        out_contrast = out_mean / out_bg - 1 if out_bg > 0 else math.nan
        bg_std = float(output[shell].std())
        results.append(LesionResult(
            label=int(label), voxels=int(mask.sum()),
            suvmax_bias_pct=100 * (out_max - ref_max) / ref_max if ref_max > 0 else math.nan,
            suvmean_bias_pct=100 * (out_mean - ref_mean) / ref_mean if ref_mean > 0 else math.nan,
            contrast_recovery=(out_contrast / ref_contrast
                               if ref_contrast >= MIN_REFERENCE_CONTRAST else math.nan),
            cnr=(out_mean - out_bg) / bg_std if bg_std > 0 else math.nan,
        ))
    return results


def summarize_lesions(results: list[LesionResult]) -> dict[str, float]:
    """Mean over lesions; |bias| as well as signed bias, since errors of both signs cancel."""
    if not results:
        return {}
    def mean(values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return float(np.mean(finite)) if finite else math.nan

    keys = ("suvmax_bias_pct", "suvmean_bias_pct", "contrast_recovery", "cnr")
    out = {key: mean([getattr(r, key) for r in results]) for key in keys}
    out["abs_suvmax_bias_pct"] = mean([abs(r.suvmax_bias_pct) for r in results])
    out["abs_suvmean_bias_pct"] = mean([abs(r.suvmean_bias_pct) for r in results])
    out["lesions"] = float(len(results))
    return out

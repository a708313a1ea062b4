"""Image quality of a 3D volume in SUV against its reference: PSNR, SSIM, NMSE.

Scored inside the body (``psnr``, ``ssim``, ``nmse``): most of a PET field of view is air,
where every method is nearly exact, so whole-field numbers reward the air and shrink the
differences between methods. The body is the full-count reference's own (each slice's patient,
lungs included: :func:`fed_ndif.models.body.body_mask`). The whole-field values stay as
``*_field``.

A leaf of training and evaluation: training scores its validation studies with it and
evaluation its test studies, with the same numbers. PSNR and SSIM come from scikit-image with an
explicit data range: the reference volume's maximum SUV, ``max(ref) - min(0, min(ref))``, per
subject. SSIM is 3D with a 7-voxel window (smaller for volumes thinner than that) and
scikit-image's default sample covariance; inside the body it is the mean of the SSIM map there.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity

from fed_ndif.models.body import body_mask


def data_range(reference: np.ndarray) -> float:
    return float(reference.max() - min(float(reference.min()), 0.0)) or 1.0


def ssim_window(shape: tuple[int, ...]) -> int:
    return int(min(7, *(d if d % 2 else d - 1 for d in shape)))


def _scores(squared: np.ndarray, ssim_map: np.ndarray, reference: np.ndarray, rng: float,
            where: np.ndarray | slice) -> tuple[float, float, float]:
    mse = float(np.mean(squared[where]))
    psnr = 10.0 * math.log10(rng ** 2 / mse) if mse > 0 else math.inf
    nmse = mse / max(float(np.mean(reference[where] ** 2)), 1e-12)
    return psnr, float(np.mean(ssim_map[where])), nmse


def volume_metrics(output: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """PSNR (dB), SSIM and NMSE of ``output`` against the full-count ``reference``: inside the
    body, and over the whole field (``*_field``)."""
    output = np.asarray(output, np.float64)
    reference = np.asarray(reference, np.float64)
    if output.shape != reference.shape:
        raise ValueError(f"shapes differ: {output.shape} vs {reference.shape}")
    rng = data_range(reference)
    squared = (output - reference) ** 2
    ssim_field, ssim_map = structural_similarity(reference, output, data_range=rng, full=True,
                                        win_size=ssim_window(reference.shape))
    body = body_mask(reference, margin_px=0)
    if not body.any():
        body = np.ones(reference.shape, bool)
    inside = _scores(squared, ssim_map, reference, rng, body)
    field = _scores(squared, ssim_map, reference, rng, slice(None))
    return {"psnr": inside[0], "ssim": inside[1], "nmse": inside[2],
            "psnr_field": field[0], "ssim_field": float(ssim_field), "nmse_field": field[2]}

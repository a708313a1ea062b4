"""Image quality of a whole 3D volume in SUV against its reference: PSNR, SSIM, NMSE.

A leaf module: training scores its validation studies with it and evaluation its test studies,
with the same numbers. PSNR and SSIM come from scikit-image with an explicit data range: the
reference volume's maximum SUV, ``max(ref) - min(0, min(ref))``, per subject. SSIM is 3D with a
7-voxel window (smaller for volumes thinner than that) and scikit-image's default sample
covariance.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def data_range(reference: np.ndarray) -> float:
    return float(reference.max() - min(float(reference.min()), 0.0)) or 1.0


def ssim_window(shape: tuple[int, ...]) -> int:
    return int(min(7, *(d if d % 2 else d - 1 for d in shape)))


def volume_metrics(output: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """PSNR (dB), SSIM and NMSE of ``output`` against the full-count ``reference``."""
    output = np.asarray(output, np.float64)
    reference = np.asarray(reference, np.float64)
    if output.shape != reference.shape:
        raise ValueError(f"shapes differ: {output.shape} vs {reference.shape}")
    rng = data_range(reference)
    mse = float(np.mean((output - reference) ** 2))
    psnr = (float(peak_signal_noise_ratio(reference, output, data_range=rng)) if mse > 0
            else math.inf)
    ssim = float(structural_similarity(reference, output, data_range=rng,
                                       win_size=ssim_window(reference.shape)))
    nmse = mse / max(float(np.mean(reference**2)), 1e-12)
    return {"psnr": psnr, "ssim": ssim, "nmse": nmse}

"""Classical denoising baselines, each with its one parameter tuned on a site's validation set.

Gaussian filter (scipy.ndimage, 3D, sigma in mm) and non-local means (scikit-image, per axial
slice, with ``h`` as a multiple of the image's estimated noise sigma). Tuning maximises mean
PSNR against the full-count volumes of the validation studies, the same criterion for both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.restoration import denoise_nl_means, estimate_sigma

from fed_ndif.image_metrics import volume_metrics

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
GAUSSIAN_FWHM_MM = (2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0)
NLM_H_FACTORS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # PET noise is correlated: the
# wavelet sigma estimate sees only its fine-grained part, so useful h values are many times it.


def gaussian(volume: np.ndarray, *, fwhm_mm: float, spacing: Sequence[float]) -> np.ndarray:
    sigma = [fwhm_mm / FWHM_PER_SIGMA / s for s in spacing]
    return ndimage.gaussian_filter(volume.astype(np.float32), sigma).astype(np.float32)


def noise_sigma(volume: np.ndarray) -> float:
    """Noise SD inside the body: skimage's wavelet MAD estimate on the body's bounding box.

    On a whole PET volume most voxels are air (exactly zero) and the estimate collapses to 0,
    which would turn NLM into the identity.
    """
    body = volume > 0.1 * float(np.percentile(volume, 99))
    if not body.any():
        return 0.0
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(body))
    return float(estimate_sigma(volume[box].astype(np.float64), channel_axis=None))


def nl_means(volume: np.ndarray, *, h_factor: float, spacing: Sequence[float]) -> np.ndarray:
    """Slice-wise NLM with ``h = h_factor * sigma`` (sigma: :func:`noise_sigma`)."""
    del spacing  # patches are in voxels
    sigma = noise_sigma(volume)
    out = np.empty_like(volume, dtype=np.float32)
    for z in range(volume.shape[0]):
        out[z] = denoise_nl_means(volume[z].astype(np.float64), h=h_factor * sigma,
                                  sigma=sigma, patch_size=3, patch_distance=5, fast_mode=True)
    return np.clip(out, 0, None)


@dataclass(frozen=True)
class TunedFilter:
    name: str
    parameter: str
    value: float
    validation_psnr: float

    def apply(self, volume: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        return FILTERS[self.name][0](volume, **{self.parameter: self.value}, spacing=spacing)


FILTERS: dict[str, tuple[Callable[..., np.ndarray], str, tuple[float, ...]]] = {
    "gaussian": (gaussian, "fwhm_mm", GAUSSIAN_FWHM_MM),
    "nlm": (nl_means, "h_factor", NLM_H_FACTORS),
}


def tune_filter(name: str, studies: Sequence[tuple[np.ndarray, np.ndarray, Sequence[float]]]
                ) -> TunedFilter:
    """Best parameter on (low-count, full-count, spacing) validation studies by mean PSNR."""
    function, parameter, grid = FILTERS[name]
    scores = []
    for value in grid:
        psnr = [volume_metrics(function(low, **{parameter: value}, spacing=spacing), full)["psnr"]
                for low, full, spacing in studies]
        scores.append(float(np.mean(psnr)))
    best = int(np.argmax(scores))
    return TunedFilter(name=name, parameter=parameter, value=float(grid[best]),
                       validation_psnr=scores[best])

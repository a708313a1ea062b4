"""Run a network trained on patches over whole slices the way it was trained: in overlapping
windows of the training patch size, blended with gaussian weights (MONAI's
``sliding_window_inference``). A whole slice would otherwise give the normalization layers
(GroupNorm, InstanceNorm) other statistics than the patches they learnt on; a probe saw that as
an offset in air (FIELD-NOTES). Whether windows or whole slices serve a given network better is
measured, not assumed: BENCHMARKS.md, lesion-faithful denoising.
"""

from __future__ import annotations

import torch
from monai.inferers import sliding_window_inference
from torch import nn

WINDOW_OVERLAP = 0.5
GAUSSIAN_SIGMA_SCALE = 0.125


class SlidingWindow(nn.Module):
    """``forward(x, *per_sample)``: ``x`` (N, C, H, W) and per-sample tensors of shape (N,)
    (diffusion time, liver NSTD) passed on to the network for each of its windows."""

    def __init__(self, net: nn.Module, *, patch: int, overlap: float = WINDOW_OVERLAP,
                 windows_per_call: int = 8) -> None:
        super().__init__()
        self.net, self.patch, self.overlap = net, int(patch), overlap
        self.windows_per_call = windows_per_call

    def forward(self, x: torch.Tensor, *per_sample: torch.Tensor | None) -> torch.Tensor:
        if max(x.shape[-2:]) <= self.patch:
            return self.net(x, *per_sample)
        # MONAI mixes the windows of all images in its batches, so the per-sample values must
        # be one value for the whole batch: true when denoising one volume (one NSTD, one time
        # per sampler step); otherwise each image goes alone.
        if all(a is None or bool((a.reshape(-1) == a.reshape(-1)[0]).all()) for a in per_sample):
            return self._windows(x, [None if a is None else a.reshape(-1)[0] for a in per_sample])
        return torch.cat([self._windows(x[i:i + 1], [None if a is None else a.reshape(-1)[i]
                                                      for a in per_sample])
                          for i in range(x.shape[0])])

    def _windows(self, x: torch.Tensor, values: list[torch.Tensor | None]) -> torch.Tensor:
        def predictor(window: torch.Tensor) -> torch.Tensor:
            n = window.shape[0]
            return self.net(window, *(None if v is None else v.expand(n) for v in values))

        # A side shorter than the window is taken whole (MONAI would pad it up to the window).
        roi = (min(self.patch, x.shape[-2]), min(self.patch, x.shape[-1]))
        return sliding_window_inference(x, roi_size=roi,
                                        sw_batch_size=self.windows_per_call, predictor=predictor,
                                        overlap=self.overlap, mode="gaussian",
                                        roi_weight_map=self._weights(roi, x))

    @staticmethod
    def _weights(roi: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """Gaussian window weights (sigma = side / 8, as MONAI's), without MONAI's floor of
        1e-3 at the window edges: with the floor, a pixel on the image border is blended
        half-and-half from a window that sees it whole and one whose edge cuts through it."""
        def ramp(side: int) -> torch.Tensor:
            centre, sigma = (side - 1) / 2, side * GAUSSIAN_SIGMA_SCALE
            return torch.exp(-0.5 * ((torch.arange(side) - centre) / sigma) ** 2)

        return (ramp(roi[0])[:, None] * ramp(roi[1])[None, :]).to(like.device, torch.float32)

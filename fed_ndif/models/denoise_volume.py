"""Whole-volume denoising: every axial slice's 2.5D stack through a model, output in SUV.

Slices go through in batches built on the fly from the (normalized) volume, so memory beyond
the input and output volumes is one batch, whatever the number of slices. Works with either a
diffusion model (sampled; mean and per-voxel std over K samples) or the deterministic U-Net.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fed_ndif.errors import FedNdifError
from fed_ndif.models.body import body_mask, bounding_box
from fed_ndif.models.diffusion import DiffusionProcess
from fed_ndif.models.sampling import SamplerConfig, SliceNoise, sample
from fed_ndif.models.windowed import SlidingWindow

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NormalizationLike(Protocol):
    def forward(self, suv: np.ndarray) -> np.ndarray: ...
    def inverse(self, x: np.ndarray) -> np.ndarray: ...
    @property
    def range(self) -> tuple[float, float]: ...


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FedNdifError("device=cuda was asked for but no CUDA device is available")
    return device


def default_batch_size(device: torch.device) -> int:
    """Slices per network call. On a CPU small batches keep the activations in cache and run
    closest to the compute floor (benchmarks/compute_floor.py measures it); a GPU wants large
    ones to fill its cores."""
    return 4 if device.type == "cpu" else 32


def _autocast(device: torch.device, dtype: str):
    if dtype not in DTYPES:
        raise FedNdifError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype == "float32":
        return contextlib.nullcontext()
    # Mixed precision: the network runs in bf16/fp16, the sampler's arithmetic stays float32.
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


@torch.no_grad()
def denoise_volume(
    model: nn.Module, low_suv: np.ndarray, *, nstd: float, normalization: NormalizationLike,
    k: int, process: DiffusionProcess | None = None, sampler: SamplerConfig | None = None,
    warm_model: nn.Module | None = None, batch_size: int | None = None,
    device: str | None = "auto", window: int | None = None, window_limit: int | None = None,
    dtype: str = "float32", seed: int = 0, progress: bool = True, body_only: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Denoise a (z, y, x) SUV volume; returns (mean SUV, per-voxel std SUV or None).

    ``process`` None: ``model`` is the deterministic U-Net (no std). Otherwise ``model`` is the
    diffusion network, sampled with ``sampler``; ``warm_model`` (a U-Net) supplies the initial
    image when ``sampler.warm_start == "unet"``. ``window``: the patch size a patch-trained
    network learnt on; slices larger than it go through in blended windows of that size, or of
    up to ``window_limit`` pixels a side when given (fewer, larger windows).
    ``dtype='bfloat16'`` is meant for CUDA. ``body_only``: all-air slices skip the network, air
    keeps the input's values, and a windowed network sees only the body's bounding box
    (:mod:`fed_ndif.models.body`). A whole-slice network still sees whole slices: cropped, its
    normalization layers would see other statistics than in training (BENCHMARKS.md,
    "Body-only inference"). ``seed``: the sampler's noise on slice z is fixed by (seed, z)
    (:class:`~fed_ndif.models.sampling.SliceNoise`), so the output does not depend on the batch
    size or on the body's box.
    """
    if low_suv.ndim != 3:
        raise FedNdifError(f"expected a (z, y, x) volume, got shape {low_suv.shape}")
    dev = resolve_device(device)
    sampler = sampler or SamplerConfig()
    if process is not None and sampler.warm_start == "unet" and warm_model is None:
        raise FedNdifError("sampler.warm_start=unet needs a U-Net model (warm_model)")
    low = normalization.forward(low_suv)
    depth = low.shape[0]
    generator = torch.Generator().manual_seed(seed)
    # channels_last: on this project's CPU 1.7x faster convolutions at batch 16 (compute_floor).
    memory_format = torch.channels_last if dev.type == "cpu" else torch.preserve_format
    model = model.to(dev, memory_format=memory_format).eval()
    if warm_model is not None:
        warm_model = warm_model.to(dev, memory_format=memory_format).eval()
    network = SlidingWindow(model, patch=window_limit or window) if window else model
    body = body_mask(low_suv) if body_only else None
    try:
        return _denoise_batches(network, low, body, window=window, depth=depth, k=k,
                                nstd=nstd, dev=dev, dtype=dtype,
                                normalization=normalization, process=process, sampler=sampler,
                                warm_model=warm_model,
                                batch_size=batch_size or default_batch_size(dev),
                                memory_format=memory_format, generator=generator,
                                seed=seed, progress=progress)
    finally:  # the caller's networks (e.g. a trainer's EMA model) get their layout back
        for net in (model, warm_model):
            if net is not None and memory_format is torch.channels_last:
                net.to(memory_format=torch.contiguous_format)


def _denoise_batches(model: nn.Module, low: np.ndarray, body: np.ndarray | None, *,
                     window: int | None, depth: int, k: int, nstd: float,
                     dev: torch.device, dtype: str, normalization: NormalizationLike,
                     process: DiffusionProcess | None, sampler: SamplerConfig,
                     warm_model: nn.Module | None, batch_size: int,
                     memory_format: torch.memory_format, generator: torch.Generator,
                     seed: int, progress: bool) -> tuple[np.ndarray, np.ndarray | None]:
    # The network writes every body voxel (its batch's box holds the body); air, including
    # all-air slices, gets the input at the end.
    mean = np.empty(low.shape, np.float32)
    std = np.empty(low.shape, np.float32) if process is not None else None
    offsets = np.arange(-k, k + 1)
    # All-air slices are not denoised at all.
    slices = np.flatnonzero(body.any(axis=(1, 2))) if body is not None else np.arange(depth)
    for start in tqdm(range(0, len(slices), batch_size), desc="denoising", unit="batch",
                      disable=not progress, leave=False):
        zs = slices[start:start + batch_size]
        box = (slice(None), slice(None))
        if body is not None and window:
            box = bounding_box(body[zs], minimum=window)
        idx = np.clip(zs[:, None] + offsets[None, :], 0, depth - 1)
        stacks = torch.from_numpy(np.ascontiguousarray(low[idx][(..., *box)])).to(
            dev, memory_format=memory_format)  # (B, 2k+1, h, w)
        nstd_t = torch.full((len(zs),), float(nstd), device=dev)
        with _autocast(dev, dtype):
            if process is None:
                out = model(stacks, nstd_t).float()
                spread = None
            else:
                init = None
                if sampler.warm_start == "low_count":
                    init = stacks[:, k:k + 1]
                elif sampler.warm_start == "unet":
                    init = warm_model(stacks, nstd_t).float()
                noise = SliceNoise(seed=seed, slices=zs, field=low.shape[1:], box=box)
                out, spread = sample(model, process, low=stacks, nstd=nstd_t, cfg=sampler,
                                     generator=generator, init=init, x0_range=normalization.range,
                                     noise=noise)
        region = (zs, *box)
        mean[region] = out[:, 0].float().cpu().numpy()
        if std is not None:
            std[region] = spread[:, 0].float().cpu().numpy()
    if body is not None:
        mean[~body] = low[~body]
        if std is not None:
            std[~body] = 0.0
    return normalization.inverse(mean), None if std is None else normalization.inverse(std)

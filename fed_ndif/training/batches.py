"""Which slices (or patches) each training step sees, from (seed, step) alone.

A run restored from a checkpoint at step ``s`` draws exactly the batches the original run
would have drawn from step ``s`` on, so no sampler state has to be saved.

Patch training (``data.patch_size``) crops square patches from whole slices, as nnU-Net does:
at native resolution a CPU can afford many small patches where it cannot afford whole slices,
and lesions, under 0.1 % of the voxels, would hardly reach the loss in uniform crops. So a
fraction (``data.foreground_fraction``) of each batch is centred (with a random shift of up to
a quarter patch) on a random foreground voxel: a lesion voxel, or where a site has no lesion
masks, one of the hottest voxels of the full-count image.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from fed_ndif.data.dataset import SliceStackDataset
from fed_ndif.errors import FedNdifError

SEED_STRIDE = 1_000_003
Key = int | tuple[int, int, int, int]


class StepBatchSampler(Sampler[list[int]]):
    """Endless batches whose content depends only on (seed, step): a fresh permutation per epoch."""

    def __init__(self, n: int, *, batch_size: int, seed: int, start_step: int = 0) -> None:
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch))}
        return self._perms[epoch]

    def batch(self, step: int) -> list[Key]:
        first = step * self.batch_size
        return [int(self._perm(j // self.n)[j % self.n])
                for j in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[Key]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


class PatchBatchSampler(StepBatchSampler):
    """Batches of ``(slice, y0, x0, size)`` patch keys, part of them centred on foreground."""

    def __init__(self, dataset: SliceStackDataset, *, batch_size: int, seed: int, patch: int,
                 foreground_fraction: float, start_step: int = 0) -> None:
        super().__init__(len(dataset), batch_size=batch_size, seed=seed, start_step=start_step)
        height, width = dataset.slice_shape
        if patch < 8:
            raise FedNdifError(f"data.patch_size {patch} must be at least 8 pixels")
        # A slice smaller than the patch is taken whole (inference's windows do the same).
        patch = min(patch, height, width)
        if not 0.0 <= foreground_fraction <= 1.0:
            raise FedNdifError(f"data.foreground_fraction must be in [0, 1], got "
                               f"{foreground_fraction}")
        self.dataset, self.patch, self.fraction = dataset, patch, foreground_fraction
        self.limits = (height - patch, width - patch)
        self.foreground = [(i, s.foreground) for i, s in enumerate(dataset.studies)
                           if len(s.foreground)] if foreground_fraction > 0 else []

    def batch(self, step: int) -> list[Key]:
        rng = np.random.default_rng([self.seed, step, 1])
        keys: list[Key] = []
        for item in super().batch(step):
            if self.foreground and rng.random() < self.fraction:
                study, voxels = self.foreground[int(rng.integers(len(self.foreground)))]
                z, y, x = voxels[int(rng.integers(len(voxels)))]
                item = self.dataset.slice_of(study, int(z))
                shift = rng.integers(-self.patch // 4, self.patch // 4 + 1, size=2)
                y0, x0 = int(y) - self.patch // 2 + shift[0], int(x) - self.patch // 2 + shift[1]
            else:
                y0, x0 = (int(rng.integers(0, limit + 1)) for limit in self.limits)
            keys.append((int(item), int(np.clip(y0, 0, self.limits[0])),
                         int(np.clip(x0, 0, self.limits[1])), self.patch))
        return keys


def batch_sampler(dataset: SliceStackDataset, cfg: dict[str, Any], *, seed: int,
                  start_step: int = 0) -> StepBatchSampler:
    """Whole slices, or patches when the config's ``data.patch_size`` is set."""
    batch_size = int(cfg["train"]["batch_size"])
    patch = cfg["data"].get("patch_size")
    if not patch:
        return StepBatchSampler(len(dataset), batch_size=batch_size, seed=seed,
                                start_step=start_step)
    return PatchBatchSampler(dataset, batch_size=batch_size, seed=seed, patch=int(patch),
                             foreground_fraction=float(cfg["data"]["foreground_fraction"]),
                             start_step=start_step)

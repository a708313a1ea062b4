"""Checking and averaging site updates; plain numpy, no Flower.

Written here rather than taken from Flower's ``aggregate_arrayrecords`` because that sums replies
in arrival order (runs differ by ~1e-7), turns integer buffers into float64, and trusts every
reply: a NaN or wrongly shaped update would poison or crash the global model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


class UpdateRejected(ValueError):
    """A site's update that must not enter the average; the message says why."""


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str


def spec_of(weights: Mapping[str, np.ndarray]) -> OrderedDict[str, ArraySpec]:
    """The names, shapes and dtypes every update must match (taken from the global model)."""
    return OrderedDict((name, ArraySpec(tuple(a.shape), np.dtype(a.dtype).str))
                       for name, a in weights.items())


def expected_bytes(spec: Mapping[str, ArraySpec]) -> int:
    return sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in spec.values())


def check_update(arrays: Mapping[str, np.ndarray], spec: Mapping[str, ArraySpec], *,
                 num_examples: float) -> None:
    """Raise :class:`UpdateRejected` naming the first problem of an update."""
    if not (np.isfinite(num_examples) and num_examples > 0):
        raise UpdateRejected(f"num-examples is {num_examples!r}, not a positive number")
    missing = [name for name in spec if name not in arrays]
    unexpected = [name for name in arrays if name not in spec]
    if missing or unexpected:
        raise UpdateRejected(f"parameter names differ from the global model: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}")
    total = 0
    for name, want in spec.items():
        array = arrays[name]
        if tuple(array.shape) != want.shape:
            raise UpdateRejected(f"parameter '{name}' has shape {tuple(array.shape)}, "
                                 f"expected {want.shape}")
        if np.dtype(array.dtype).str != want.dtype:
            raise UpdateRejected(f"parameter '{name}' has dtype {np.dtype(array.dtype)}, "
                                 f"expected {np.dtype(want.dtype)}")
        if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
            raise UpdateRejected(f"parameter '{name}' holds NaN or infinite values")
        total += array.nbytes
    if total != expected_bytes(spec):
        raise UpdateRejected(f"update is {total} bytes, expected {expected_bytes(spec)}")


def weighted_average(updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
                     spec: Mapping[str, ArraySpec]) -> OrderedDict[str, np.ndarray]:
    """Example-weighted mean of checked updates, in the order given, accumulated in float64.

    Integer arrays (counters) are rounded back to their dtype.
    """
    if not updates:
        raise ValueError("no updates to average")
    total = float(sum(weight for _, weight in updates))
    result: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, want in spec.items():
        acc = np.zeros(want.shape, np.float64)
        for arrays, weight in updates:
            acc += np.asarray(arrays[name], np.float64) * (weight / total)
        dtype = np.dtype(want.dtype)
        result[name] = (np.rint(acc) if dtype.kind in "iub" else acc).astype(dtype)
    return result


def weighted_metrics(metrics: Sequence[tuple[Mapping[str, float], float]]) -> dict[str, float]:
    """Example-weighted mean of each metric that every site reported."""
    if not metrics:
        return {}
    common = set(metrics[0][0])
    for values, _ in metrics[1:]:
        common &= set(values)
    total = float(sum(weight for _, weight in metrics))
    return {key: float(sum(float(values[key]) * weight for values, weight in metrics) / total)
            for key in sorted(common)}

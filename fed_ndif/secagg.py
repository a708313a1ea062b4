"""Secure-aggregation settings and the checks that replace the per-update ones; plain numpy.

In secure mode (``fl.secure_aggregation: true``) the coordinator receives only the masked sum of
the sites' updates (Flower's SecAgg+; the protocol runs in fed_ndif.server.secure and
fed_ndif.client.secure). A sum cannot be checked site by site, so the checks move:

- each site checks its own change (trained - received weights) before it is masked: names,
  shapes, finite values, and that it fits the quantization's clipping range (SecAgg+ would
  clip it silently otherwise); a site that fails refuses to send and counts as dropped;
- the coordinator checks the unmasked aggregate: names, shapes, finite values.

What a site masks is ``change * q / max_weight`` with ``q`` its example count, quantized to
``quantization_range`` levels over ``[-clipping_range, clipping_range]`` with stochastic
rounding; the workflow divides the unmasked sum by the summed ``q / max_weight``, so the result
is FedAvg of the changes weighted by examples, within :meth:`SecAggSettings.max_error`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fed_ndif.errors import FedNdifError

MODULUS_RANGE = 2**32  # Flower's default and its maximum: masks are drawn mod 2**32


@dataclass(frozen=True)
class SecAggSettings:
    """``fl.secagg`` of the run config, checked (see configs/fl/default.yaml)."""

    num_shares: int | float
    reconstruction_threshold: int | float
    clipping_range: float
    max_weight: float
    quantization_range: int

    @classmethod
    def from_config(cls, fl: Mapping[str, Any]) -> SecAggSettings:
        """The settings of ``fl`` (the run config's ``fl`` section); FedNdifError names a bad
        one. Also refuses combinations secure mode cannot run with."""
        raw = dict(fl.get("secagg") or {})
        try:
            shares = _int_or_fraction(raw.get("num_shares", 1.0))
            threshold = _int_or_fraction(raw.get("reconstruction_threshold", 2))
            clipping = float(raw.get("clipping_range", 0.5))
            max_weight = float(raw.get("max_weight", 1e4))
            levels = raw.get("quantization_range", 2**26)
            if isinstance(levels, float) and levels.is_integer():
                levels = int(levels)
        except (TypeError, ValueError) as exc:
            raise FedNdifError(f"fl.secagg: {exc}") from None
        if fl.get("dp", {}).get("enabled"):
            raise FedNdifError("fl.dp.enabled and fl.secure_aggregation cannot both be true: "
                               "server-side clipping needs each site's update, which secure "
                               "aggregation hides")
        sites = int(fl["min_sites"])
        if sites < 2:
            raise FedNdifError(f"fl.secure_aggregation needs fl.min_sites >= 2 (is {sites}): "
                               "the sum of one site's update is that update")
        if isinstance(shares, int) and shares < 3:
            raise FedNdifError(f"fl.secagg.num_shares={shares}: give an integer >= 3 or a "
                               "fraction of the sampled sites (1.0: all)")
        if isinstance(shares, float) and not 0 < shares <= 1:
            raise FedNdifError(f"fl.secagg.num_shares={shares}: a fraction must be in (0, 1]")
        if isinstance(threshold, int):
            if threshold < 2:
                raise FedNdifError(f"fl.secagg.reconstruction_threshold={threshold}: at least 2")
            if threshold > sites:
                raise FedNdifError(f"fl.secagg.reconstruction_threshold={threshold} is more "
                                   f"than fl.min_sites={sites}: no round could be unmasked")
            if isinstance(shares, int) and threshold >= shares:
                raise FedNdifError(f"fl.secagg.reconstruction_threshold={threshold} must be "
                                   f"below fl.secagg.num_shares={shares}")
        elif not 0 < threshold <= 1:
            raise FedNdifError(f"fl.secagg.reconstruction_threshold={threshold}: a fraction "
                               "must be in (0, 1]")
        if not (np.isfinite(clipping) and clipping > 0):
            raise FedNdifError(f"fl.secagg.clipping_range={clipping}: a positive number")
        if not (np.isfinite(max_weight) and max_weight > 0):
            raise FedNdifError(f"fl.secagg.max_weight={max_weight}: a positive number")
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 2:
            raise FedNdifError(f"fl.secagg.quantization_range={levels!r}: an integer >= 2")
        settings = cls(shares, threshold, clipping, max_weight, levels)
        settings.check_sites(sites)
        return settings

    def check_sites(self, sites: int) -> None:
        """Refuse a round whose masked sum could wrap around the modulus."""
        if sites * self.quantization_range >= MODULUS_RANGE:
            raise FedNdifError(f"{sites} sites x fl.secagg.quantization_range="
                               f"{self.quantization_range} reach 2**32, where the masked sum "
                               "wraps around; lower fl.secagg.quantization_range")

    def weight_factor(self, num_examples: float) -> float:
        """The factor a site's change is multiplied by before quantization (as the SecAgg+ mod
        computes it: ``num_examples / max_weight`` on the quantization grid)."""
        return round(num_examples / self.max_weight * self.quantization_range) \
            / self.quantization_range

    def max_error(self, num_examples: Sequence[float]) -> float:
        """Bound on |secure aggregate - FedAvg| of one weight: each site's quantization errs by
        under one level, and the sum is divided by the summed weight factors."""
        level = 2 * self.clipping_range / self.quantization_range
        return len(num_examples) * level / sum(self.weight_factor(n) for n in num_examples)


def _int_or_fraction(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{value!r} is neither an integer nor a fraction")
    return value


def site_change(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]
                ) -> OrderedDict[str, np.ndarray]:
    """What a site masks: its trained weights minus those it received, in float64."""
    return OrderedDict((name, np.asarray(trained[name], np.float64)
                        - np.asarray(received[name], np.float64)) for name in received)


def check_own_change(change: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                     num_examples: float, settings: SecAggSettings) -> None:
    """A site's check of its own change before masking; FedNdifError names the problem."""
    if not (np.isfinite(num_examples) and num_examples > 0):
        raise FedNdifError(f"num-examples is {num_examples!r}, not a positive number")
    if num_examples > settings.max_weight:
        raise FedNdifError(f"this site's {num_examples:g} training examples exceed "
                           f"fl.secagg.max_weight={settings.max_weight:g}; raise it")
    if list(change) != list(received):
        raise FedNdifError("the update's parameter names differ from the received model's")
    factor = settings.weight_factor(num_examples)
    for name, array in change.items():
        if array.shape != np.shape(received[name]):
            raise FedNdifError(f"parameter '{name}' has shape {array.shape}, expected "
                               f"{np.shape(received[name])}")
        if not np.all(np.isfinite(array)):
            raise FedNdifError(f"parameter '{name}' holds NaN or infinite values")
        largest = float(np.abs(array).max()) if array.size else 0.0
        if largest * factor > settings.clipping_range:
            raise FedNdifError(
                f"parameter '{name}' changed by up to {largest:.4g}, which times the weight "
                f"factor {factor:.4g} exceeds fl.secagg.clipping_range="
                f"{settings.clipping_range:g} (it would be clipped); raise "
                "fl.secagg.clipping_range or fl.secagg.max_weight")


class AggregateRejected(ValueError):
    """The unmasked aggregate must not become the global model; the message says why."""


def check_aggregate(arrays: Sequence[np.ndarray], reference: Mapping[str, np.ndarray]
                    ) -> OrderedDict[str, np.ndarray]:
    """The coordinator's check of the unmasked mean change: one array per parameter of the
    global model, in its order and shape, finite. Returns it named."""
    if len(arrays) != len(reference):
        raise AggregateRejected(f"the aggregate holds {len(arrays)} arrays, the model "
                                f"{len(reference)}")
    named: OrderedDict[str, np.ndarray] = OrderedDict()
    for (name, want), array in zip(reference.items(), arrays, strict=True):
        array = np.asarray(array, np.float64)
        if array.shape != np.shape(want):
            raise AggregateRejected(f"parameter '{name}' of the aggregate has shape "
                                    f"{array.shape}, expected {np.shape(want)}")
        if not np.all(np.isfinite(array)):
            raise AggregateRejected(f"parameter '{name}' of the aggregate holds NaN or "
                                    "infinite values")
        named[name] = array
    return named


def apply_change(received: Mapping[str, np.ndarray], change: Mapping[str, np.ndarray]
                 ) -> OrderedDict[str, np.ndarray]:
    """The new global weights: the received weights plus the mean change, in their dtypes
    (integer buffers rounded)."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, base in received.items():
        value = np.asarray(base, np.float64) + change[name]
        dtype = np.dtype(base.dtype)
        out[name] = (np.rint(value) if dtype.kind in "iub" else value).astype(dtype)
    return out

"""How weights travel in a federation: full float32, or half precision at half the bytes.

Half precision (``fl.transfer_dtype: float16``) rounds what is sent, so each direction is
encoded to keep that rounding from piling up over rounds:

- coordinator -> site: the global weights cast to float16. The coordinator keeps its float32
  master copy; a site trains from the float16 values upcast to float32 (``received``).
- site -> coordinator: the site's *change* (trained - received) in float16, not its weights.
  A change is small, so float16's relative error applies to a small number; the coordinator
  rebuilds ``received + change`` in float32, exactly as the site would.

Integer buffers (counters) travel unchanged. bfloat16 is not offered: Flower's ``Array`` stores
numpy arrays, and numpy has no bfloat16; bfloat16 would also keep 8 fewer mantissa bits for the
same bytes. Plain numpy, no Flower.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from fed_ndif.errors import FedNdifError

TRANSFER_DTYPES = ("float32", "float16")


def check_transfer_dtype(name: str) -> np.dtype:
    if name not in TRANSFER_DTYPES:
        raise FedNdifError(f"fl.transfer_dtype is '{name}'; use one of {TRANSFER_DTYPES}")
    return np.dtype(name)


def _is_float(array: np.ndarray) -> bool:
    return np.dtype(array.dtype).kind == "f"


def encode_global(weights: Mapping[str, np.ndarray], dtype: str
                  ) -> OrderedDict[str, np.ndarray]:
    """What the coordinator sends: float arrays cast to the transfer dtype."""
    wire = check_transfer_dtype(dtype)
    sent = OrderedDict((name, a.astype(wire) if _is_float(a) else a)
                       for name, a in weights.items())
    for name, a in sent.items():
        if _is_float(a) and not np.all(np.isfinite(a)):
            raise FedNdifError(f"global weight '{name}' does not fit in {wire} (overflow); "
                               "use fl.transfer_dtype=float32")
    return sent


def received_weights(weights: Mapping[str, np.ndarray], dtype: str
                     ) -> OrderedDict[str, np.ndarray]:
    """The float32 weights a site starts from when sent ``encode_global(weights, dtype)``."""
    return OrderedDict((name, a.astype(np.float32) if _is_float(a) else a)
                       for name, a in encode_global(weights, dtype).items())


def encode_update(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                  dtype: str) -> OrderedDict[str, np.ndarray]:
    """What a site sends back: its weights (float32) or its change since ``received`` (float16)."""
    wire = check_transfer_dtype(dtype)
    if wire == np.float32:
        return OrderedDict(trained)
    return OrderedDict(
        (name, (a.astype(np.float32) - received[name].astype(np.float32)).astype(wire)
         if _is_float(a) else a)
        for name, a in trained.items())


def decode_update(update: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                  dtype: str) -> OrderedDict[str, np.ndarray]:
    """A site's trained float32 weights from its update (inverse of :func:`encode_update`).

    An update that does not fit (names, shapes, dtypes) is returned unchanged so that the
    aggregation's checks reject it with a message naming the problem.
    """
    wire = check_transfer_dtype(dtype)
    if wire == np.float32 or set(update) != set(received):
        return OrderedDict(update)
    decoded = OrderedDict()
    for name, base in received.items():
        change = update[name]
        if not _is_float(base):
            decoded[name] = change
            continue
        if change.dtype != wire or change.shape != base.shape:
            return OrderedDict(update)
        decoded[name] = (base.astype(np.float32) + change.astype(np.float32)).astype(base.dtype)
    return decoded

"""Translations between fed-ndif and Flower: hydra config <-> flat run config, weights <-> records.

This is the one place where a hydra config becomes Flower's flat run config and back.

Flower's run config holds only flat ``key = scalar`` pairs. A hydra config becomes dotted keys
(``train.lr``); values that are not scalars (lists, null) travel as JSON strings prefixed with
``json:``, so ``flwr run . --run-config "train.lr=0.001"`` overrides work as Flower users expect.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from omegaconf import DictConfig, OmegaConf

from fed_ndif.errors import FedNdifError

JSON_PREFIX = "json:"
Scalar = bool | int | float | str
# The parts of a simulate config that a federation's run config carries.
FEDERATED_KEYS = ("model", "diffusion", "train", "data", "fl", "logger", "run_dir")


def to_run_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Scalar]:
    """Flatten a (resolved) config into Flower run-config pairs."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Scalar] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            if not value:
                flat[prefix] = JSON_PREFIX + "{}"
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        elif isinstance(value, bool | int | float | str):
            flat[prefix] = value
        else:
            flat[prefix] = JSON_PREFIX + json.dumps(value)

    walk("", plain)
    return flat


def from_run_config(run_config: Mapping[str, Scalar]) -> dict[str, Any]:
    """Rebuild the nested config from Flower run-config pairs (inverse of :func:`to_run_config`)."""
    nested: dict[str, Any] = {}
    for key, value in run_config.items():
        if isinstance(value, str) and value.startswith(JSON_PREFIX):
            try:
                value = json.loads(value[len(JSON_PREFIX):])
            except json.JSONDecodeError as exc:
                raise FedNdifError(f"run config {key}: not valid JSON after '{JSON_PREFIX}'") \
                    from exc
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FedNdifError(f"run config {key}: '{part}' is both a value and a section")
        node[leaf] = value
    return nested


def federated_config(cfg: DictConfig, *, sites_dir: Path, run_dir: Path) -> dict[str, Any]:
    """The federated part of a simulate config, pointed at the run folder's sites."""
    fed = OmegaConf.to_container(cfg, resolve=True)
    fed = {key: fed[key] for key in FEDERATED_KEYS}
    sites = list(cfg.sites.keys())
    fed["run_dir"] = str(run_dir)
    fed["data"]["root"] = str(sites_dir)
    fed["data"]["sites"] = sites
    fed["fl"]["min_sites"] = len(sites)
    return fed


# A packed record: every array's bytes in one uint8 Array plus a JSON index (name, dtype,
# shape). Flower 1.42 moves each Array of a message as its own object, one HTTP request per
# hop: ~190 requests per model and direction, which dominated a deployed round (BENCHMARKS.md).
PACKED, INDEX = "fed-ndif.packed", "fed-ndif.index"


def to_array_record(weights: Mapping[str, np.ndarray], *, packed: bool = False) -> ArrayRecord:
    """Named numpy arrays as Flower's ArrayRecord (names, shapes and dtypes kept).

    ``packed``: as two Arrays (see PACKED) for the wire; :func:`from_array_record` reads both.
    """
    if not packed:
        return ArrayRecord(OrderedDict((name, Array(np.ascontiguousarray(value)))
                                       for name, value in weights.items()))
    arrays = [np.asarray(value, order="C") for value in weights.values()]  # keeps 0-d shapes
    index = [[name, a.dtype.str, list(a.shape)] for name, a in zip(weights, arrays, strict=True)]
    payload = (np.concatenate([a.reshape(-1).view(np.uint8) for a in arrays]) if arrays
               else np.zeros(0, np.uint8))
    return ArrayRecord(OrderedDict([
        (INDEX, Array(np.frombuffer(json.dumps(index).encode(), np.uint8).copy())),
        (PACKED, Array(payload))]))


def from_array_record(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """Named numpy arrays from a plain or packed ArrayRecord; ValueError names a bad one."""
    if PACKED not in record:
        return OrderedDict((name, record[name].numpy()) for name in record)
    try:
        index = json.loads(record[INDEX].numpy().tobytes())
        payload = record[PACKED].numpy()
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        offset = 0
        for name, dtype, shape in index:
            dt = np.dtype(dtype)
            size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            if offset + size > payload.size:
                raise ValueError(f"array '{name}' runs past the end of the packed data")
            out[str(name)] = payload[offset:offset + size].view(dt).reshape(tuple(shape)).copy()
            offset += size
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"packed weights have a malformed index ({exc})") from None
    if offset != payload.size:
        raise ValueError(f"packed weights hold {payload.size - offset} bytes beyond the index")
    return out


def pyproject_app_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table for pyproject.toml (nested; Flower flattens it)."""
    nested: dict[str, Any] = {}
    for key, value in to_run_config(cfg).items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested

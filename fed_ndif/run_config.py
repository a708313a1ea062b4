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
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from omegaconf import DictConfig, OmegaConf

from fed_ndif.errors import FedNdifError

JSON_PREFIX = "json:"
Scalar = bool | int | float | str


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


def to_array_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as Flower's ArrayRecord (names, shapes and dtypes kept)."""
    return ArrayRecord(OrderedDict((name, Array(np.ascontiguousarray(value)))
                                   for name, value in weights.items()))


def from_array_record(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((name, record[name].numpy()) for name in record)


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

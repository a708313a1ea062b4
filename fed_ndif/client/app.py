"""Flower ClientApp: a thin adapter over the single-site trainer (fed_ndif.training).

Site settings come from node config: ``data-path`` (the site's manifest or its folder) and
``device``; a simulated node without ``data-path`` uses ``partition-id`` to pick
``data.sites[i]`` under ``data.root``. Experiment settings come from the run config. Replies
carry weights and numeric metrics only, plus the site's name; never a patient identifier.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_ndif.checkpoints import build_state, get_weights, set_weights
from fed_ndif.client.secure import (
    is_secure,
    masked_reply,
    secure_aggregation_mod,
    secure_instructions,
)
from fed_ndif.data.dataset import SliceStackDataset, held_out_levels
from fed_ndif.data.manifest import MANIFEST_NAME, manifest_path
from fed_ndif.data.normalization import Normalization
from fed_ndif.errors import FedNdifError
from fed_ndif.run_config import from_array_record, from_run_config, to_array_record
from fed_ndif.secagg import SecAggSettings
from fed_ndif.training.trainer import make_train_batches, train_steps, validate
from fed_ndif.transfer import encode_update

log = logging.getLogger(__name__)

# Datasets stay loaded between rounds when the runtime reuses the process (simulation).
_DATASETS: dict[tuple, SliceStackDataset] = {}


def site_manifest(cfg: dict[str, Any], node_config: dict[str, Any]) -> tuple[str, Path]:
    """The site's name and manifest path from node config (deployment) or partition id."""
    if node_config.get("data-path"):
        path = Path(str(node_config["data-path"])).expanduser()
        manifest = manifest_path(path)
        name = str(node_config.get("site-name") or manifest.parent.name)
    elif "partition-id" in node_config:
        sites = list(cfg["data"]["sites"])
        index = int(node_config["partition-id"])
        if not 0 <= index < len(sites):
            raise FedNdifError(f"partition-id {index} has no site in data.sites={sites}")
        name = sites[index]
        manifest = Path(cfg["data"]["root"]) / name / MANIFEST_NAME
    else:
        raise FedNdifError("node config needs data-path (the site's manifest or folder)")
    if not manifest.is_file():
        raise FedNdifError(f"site {name}: no manifest at {manifest}")
    return name, manifest


def site_name(context: Context) -> str:
    return site_manifest(from_run_config(context.run_config), dict(context.node_config))[0]


# SecAgg+ rounds (fl.secure_aggregation) pass through Flower's secaggplus_mod; others do not.
secure_mod = functools.partial(secure_aggregation_mod, site_name=site_name)
app = ClientApp(mods=[secure_mod])


def _dataset(name: str, manifest: Path, split: str, cfg: dict[str, Any]) -> SliceStackDataset:
    normalization = Normalization.from_dict(cfg["data"]["normalization"])
    levels = cfg["data"].get("count_levels")
    excluded = held_out_levels(cfg["data"], name)
    key = (str(manifest.resolve()), split, int(cfg["model"]["k"]), normalization,
           tuple(levels) if levels else None, excluded)
    if key not in _DATASETS:
        _DATASETS[key] = SliceStackDataset(manifest, split=split, k=key[2],
                                           normalization=normalization, count_levels=levels,
                                           exclude_levels=excluded)
    return _DATASETS[key]


def _setup(weights: dict[str, np.ndarray], context: Context):
    cfg = from_run_config(context.run_config)
    name, manifest = site_manifest(cfg, dict(context.node_config))
    # Each site draws its own batches and noise: the seed depends on the site's name.
    cfg["train"]["seed"] = int(cfg["train"]["seed"]) + zlib.crc32(name.encode()) % 100_000
    device = str(context.node_config.get("device", cfg["train"].get("device", "auto")))
    state = build_state(cfg, device=device)
    set_weights(state, weights)
    return cfg, name, manifest, state


def _reply(msg: Message, name: str, metrics: dict[str, float],
           weights: OrderedDict[str, np.ndarray] | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord({k: float(v) for k, v in metrics.items()}),
                          "site": ConfigRecord({"name": name})})
    if weights is not None:
        content["arrays"] = to_array_record(weights, packed=True)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    secure = is_secure(msg)
    if secure:  # the update is asked for by a SecAgg+ round (fed_ndif.client.secure)
        weights, config = secure_instructions(msg)
    else:
        weights, config = from_array_record(msg.content["arrays"]), msg.content["config"]
    cfg, name, manifest, state = _setup(weights, context)
    server_round = int(config["server-round"])
    local_steps = int(cfg["fl"]["local_steps"])
    dataset = _dataset(name, manifest, "train", cfg)
    received = get_weights(state)
    # Batches of round r continue where round r-1 stopped: no slice is favoured.
    state.step = (server_round - 1) * local_steps
    metrics = train_steps(state, make_train_batches(state, dataset), local_steps)
    log.info("site %s round %d: loss %.4g over %d steps", name, server_round, metrics["loss"],
             local_steps)
    # FedAvg weights each site by its number of training slice stacks.
    metrics = {"train_loss": metrics["loss"], "train_seconds": metrics["seconds"],
               "num-examples": float(len(dataset))}
    if secure:
        return masked_reply(msg, name, metrics, get_weights(state), received,
                            SecAggSettings.from_config(cfg["fl"]))
    return _reply(msg, name, metrics, encode_update(get_weights(state), received,
                                                    str(cfg["fl"]["transfer_dtype"])))


@app.evaluate()
def validate_global(msg: Message, context: Context) -> Message:
    """The global model received this round, scored on the site's validation split."""
    cfg, name, manifest, state = _setup(from_array_record(msg.content["arrays"]), context)
    dataset = _dataset(name, manifest, "val", cfg)
    metrics = validate(state, dataset, max_studies=int(cfg["fl"]["evaluate_max_studies"]))
    return _reply(msg, name, {f"val_{k}" if k != "num-examples" else k: v
                              for k, v in metrics.items()})

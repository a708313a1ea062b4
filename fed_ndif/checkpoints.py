"""Checkpoints, their one home: the training state they hold, their format, names, saving,
loading, and the checks made before a checkpoint is used for inference.

Training, the federation, evaluation and the denoise command all read and write checkpoints
through this module, so a checkpoint written by any of them can be read by all the others. A
checkpoint is complete and self-describing (weights, EMA, optimizer, config, normalization,
schema and package version), written atomically, and read with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import fed_ndif
from fed_ndif.data.normalization import Normalization
from fed_ndif.errors import FedNdifError
from fed_ndif.models.denoise_volume import resolve_device
from fed_ndif.models.diffusion import EMA, DiffusionConfig, DiffusionProcess
from fed_ndif.models.networks import build_model
from fed_ndif.models.sampling import SamplerConfig, sampler_timesteps
from fed_ndif.staging import staged_file

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CHECKPOINT_KIND = "fed-ndif-checkpoint"
# A training folder's checkpoint, rewritten as training goes on.
LAST_CHECKPOINT = "last.pt"
# With train.keep_best: the best model by validation (the starting one if no step beat it), and
# the record of that choice.
BEST_CHECKPOINT = "best.pt"
SELECTION_RECORD = "selection.json"
# A federation's global model after each round, in RUN_DIR/checkpoints/.
GLOBAL_CHECKPOINTS = "checkpoints"
_GLOBAL_PATTERN = re.compile(r"global-round-(\d{4,})\.pt$")


def global_checkpoint_path(run_dir: Path, federated_round: int) -> Path:
    return Path(run_dir) / GLOBAL_CHECKPOINTS / f"global-round-{federated_round:04d}.pt"


def latest_global_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """The federation's last saved round and its checkpoint, if any."""
    found = [(int(m.group(1)), p)
             for p in (Path(run_dir) / GLOBAL_CHECKPOINTS).glob("global-round-*.pt")
             if (m := _GLOBAL_PATTERN.search(p.name))]
    return max(found) if found else None


@dataclass
class TrainingState:
    """Everything one training run holds: network, EMA copy, optimizer, process, settings.

    ``step`` counts optimizer steps. A global checkpoint also records the federated round it
    closes (``save_checkpoint(..., federated_round=N)``).
    """

    cfg: dict[str, Any]  # plain dict with model / diffusion / train / data sections
    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    normalization: Normalization
    process: DiffusionProcess | None  # None for the deterministic U-Net
    device: torch.device
    step: int = 0
    # With train.keep_best: the best-by-validation selection so far (best step and score,
    # checks since the best, start and rival scores), so a resumed run keeps its best.
    selection: dict[str, Any] | None = None

    @property
    def k(self) -> int:
        return int(self.cfg["model"]["k"])

    @property
    def kind(self) -> str:
        return str(self.cfg["model"]["kind"])

    @property
    def window(self) -> int | None:
        """The patch size the network trained on (None: whole slices); inference matches it."""
        patch = self.cfg["data"].get("patch_size")
        return int(patch) if patch else None


def plain_config(cfg: DictConfig | dict) -> dict[str, Any]:
    """A deep, plain-data copy (what checkpoints can hold under ``weights_only=True``)."""
    return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)  # type: ignore[return-value]


def diffusion_config(cfg: dict) -> DiffusionConfig:
    d = cfg["diffusion"]
    return DiffusionConfig(num_train_timesteps=int(d["num_train_timesteps"]),
                           schedule=str(d["schedule"]), prediction_type=str(d["prediction_type"]),
                           loss=str(d["loss"]), focus_fraction=float(d.get("focus_fraction", 0.0)),
                           min_snr_gamma=(None if d.get("min_snr_gamma") is None
                                          else float(d["min_snr_gamma"])))


def diffusion_process(cfg: dict) -> DiffusionProcess:
    """The process a config trains: its focus steps are those of the config's own sampler."""
    process_cfg = diffusion_config(cfg)
    focus = (sampler_timesteps(sampler_config(cfg),
                               num_train_timesteps=process_cfg.num_train_timesteps)
             if process_cfg.focus_fraction > 0 else ())
    return DiffusionProcess(process_cfg, focus_timesteps=tuple(focus))


def sampler_config(cfg: dict, **overrides: Any) -> SamplerConfig:
    """The sampler a config asks for. A U-Net warm start needs a second model, which one
    checkpoint does not hold: it becomes a warm start from the low-count input."""
    sampler = SamplerConfig(**{**cfg["diffusion"]["sampler"], **overrides})
    if sampler.warm_start == "unet":
        log.warning("the sampler starts from a U-Net output, which needs a second model; "
                    "starting from the low-count input instead")
        sampler = replace(sampler, warm_start="low_count")
    return sampler


def build_state(cfg: DictConfig | dict, *, normalization: Normalization | None = None,
                device: str | None = None) -> TrainingState:
    """A fresh model, EMA and optimizer from a train_local-style config (seeded by train.seed)."""
    cfg = plain_config(cfg)
    train = cfg["train"]
    if normalization is None:
        normalization = Normalization.from_dict(cfg["data"]["normalization"])
    cfg["data"]["normalization"] = normalization.to_dict()
    dev = resolve_device(device or train.get("device", "auto"))
    process = None
    prediction_type = "sample"
    if cfg["model"]["kind"] == "diffusion":
        process = diffusion_process(cfg)
        prediction_type = process.cfg.prediction_type
    torch.manual_seed(int(train["seed"]))
    model = build_model(cfg["model"], prediction_type=prediction_type).to(dev)
    ema = EMA(model, decay=float(train["ema_decay"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(train["lr"]),
                                  weight_decay=float(train["weight_decay"]))
    return TrainingState(cfg=cfg, model=model, ema=ema, optimizer=optimizer,
                         normalization=normalization, process=process, device=dev)


def get_weights(state: TrainingState, *, ema: bool = False) -> OrderedDict[str, np.ndarray]:
    """The network's state as named numpy arrays (what travels in a federation)."""
    model = state.ema.model if ema else state.model
    return OrderedDict((name, t.detach().cpu().numpy().copy())
                       for name, t in model.state_dict().items())


def set_weights(state: TrainingState, weights: dict[str, np.ndarray], *,
                reset_ema: bool = True) -> None:
    """Load named arrays into the network (and, by default, the EMA copy); checks names/shapes."""
    current = state.model.state_dict()
    missing = sorted(set(current) - set(weights))
    extra = sorted(set(weights) - set(current))
    if missing or extra:
        raise FedNdifError(f"weights do not fit the model: missing {missing[:3]}, "
                           f"unexpected {extra[:3]}")
    for name, value in weights.items():
        if tuple(np.shape(value)) != tuple(current[name].shape):
            raise FedNdifError(f"weight {name} has shape {tuple(np.shape(value))}, the model "
                               f"needs {tuple(current[name].shape)}")
    state.model.load_state_dict(OrderedDict(
        (n, torch.as_tensor(np.asarray(v)).to(current[n].dtype)) for n, v in weights.items()))
    if reset_ema:
        state.ema.model.load_state_dict(state.model.state_dict())


def _cpu_state(tensors: dict) -> dict:
    return {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in tensors.items()}


def save_checkpoint(state: TrainingState, path: str | Path, *,
                    federated_round: int | None = None) -> None:
    """Write the complete state atomically; a global model also records its round."""
    ema = state.ema.state_dict()
    content = {
        "kind": CHECKPOINT_KIND, "schema_version": SCHEMA_VERSION,
        "package_version": fed_ndif.__version__, "step": state.step,
        "config": state.cfg, "normalization": state.normalization.to_dict(),
        "model": _cpu_state(state.model.state_dict()),
        "ema": {**ema, "weights": _cpu_state(ema["weights"])},
        "optimizer": state.optimizer.state_dict(),
    }
    if federated_round is not None:
        content["round"] = int(federated_round)
    if state.selection is not None:
        content["selection"] = dict(state.selection)
    with staged_file(Path(path), suffix=".pt") as tmp:
        torch.save(content, tmp)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, checked for kind and schema version."""
    path = Path(path)
    if not path.is_file():
        raise FedNdifError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign/corrupt files
        raise FedNdifError(f"{path}: not a readable fed-ndif checkpoint "
                           f"({exc.__class__.__name__})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise FedNdifError(f"{path}: not a fed-ndif checkpoint")
    if ckpt.get("schema_version") != SCHEMA_VERSION:
        raise FedNdifError(f"{path}: checkpoint schema {ckpt.get('schema_version')} is not "
                           f"supported (this fed-ndif reads schema {SCHEMA_VERSION})")
    return ckpt


def _load_weights(module: nn.Module, weights: dict, *, path: Path, cfg: dict) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line
                      or "Missing" in line or "Unexpected" in line), str(exc).splitlines()[0])
        raise FedNdifError(
            f"{path}: weights do not fit a {cfg['model']['kind']} model with k="
            f"{cfg['model']['k']} ({2 * int(cfg['model']['k']) + 1} low-count slices): "
            f"{first[:200]}") from None


def load_checkpoint(path: str | Path, *, device: str | None = None,
                    expect_k: int | None = None) -> TrainingState:
    """The state exactly as saved (resume continues with the same next step)."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    cfg = ckpt["config"]
    k = int(cfg["model"]["k"])
    if expect_k is not None and k != expect_k:
        raise FedNdifError(f"{path}: the checkpoint was trained with k={k} ({2 * k + 1} "
                           f"low-count slices), but k={expect_k} ({2 * expect_k + 1}) is needed")
    state = build_state(cfg, normalization=Normalization.from_dict(ckpt["normalization"]),
                        device=device)
    _load_weights(state.model, ckpt["model"], path=path, cfg=cfg)
    _load_weights(state.ema.model, ckpt["ema"]["weights"], path=path, cfg=cfg)
    state.ema.num_updates = int(ckpt["ema"]["num_updates"])
    state.ema.decay = float(ckpt["ema"]["decay"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.step = int(ckpt["step"])
    selection = ckpt.get("selection")
    state.selection = dict(selection) if isinstance(selection, dict) else None
    return state


def init_from_checkpoint(state: TrainingState, path: str | Path) -> None:
    """Fine-tuning: take a checkpoint's (EMA) weights into a fresh state; optimizer and step
    stay new. The checkpoint's normalization must be the state's."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    k = int(ckpt["config"]["model"]["k"])
    if k != state.k or ckpt["config"]["model"]["kind"] != state.kind:
        raise FedNdifError(f"{path}: a {ckpt['config']['model']['kind']} model with k={k} cannot "
                           f"initialise a {state.kind} model with k={state.k}")
    if Normalization.from_dict(ckpt["normalization"]) != state.normalization:
        raise FedNdifError(f"{path}: the checkpoint's normalization {ckpt['normalization']} "
                           "differs from data.normalization; fine-tune with the same one")
    _load_weights(state.model, ckpt["ema"]["weights"], path=path, cfg=ckpt["config"])
    state.ema.model.load_state_dict(state.model.state_dict())


def check_for_inference(path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's config, after checking that it can denoise: a known model kind, a
    valid ``k`` and an SUV normalization (so the output can be turned back into SUV)."""
    try:
        cfg = ckpt["config"]
        kind = str(cfg["model"]["kind"])
        k = cfg["model"]["k"]
        normalization = ckpt.get("normalization")
    except (KeyError, TypeError) as exc:
        raise FedNdifError(f"{path}: the checkpoint lacks its model settings "
                           f"({exc.__class__.__name__}: {exc})") from None
    if kind not in ("diffusion", "unet"):
        raise FedNdifError(f"{path}: model kind {kind!r} cannot denoise (expected a "
                           "diffusion or unet checkpoint)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise FedNdifError(f"{path}: model.k is {k!r}; expected a non-negative integer")
    if not isinstance(normalization, dict):
        raise FedNdifError(f"{path}: the checkpoint carries no SUV normalization, so its "
                           "output cannot be turned back into SUV")
    try:
        Normalization.from_dict(normalization)
    except (TypeError, ValueError) as exc:
        raise FedNdifError(f"{path}: its SUV normalization {normalization} is invalid "
                           f"({exc})") from None
    return cfg

"""One site's training, validation and fine-tuning; Flower-free, so a ClientApp can reuse it.

API for the federation: :func:`build_bundle`, :func:`make_train_batches`, :func:`train_steps`,
:func:`evaluate`, :func:`get_weights` / :func:`set_weights`, :func:`save_checkpoint` /
:func:`load_checkpoint`. :func:`train_local` is the ``fed-ndif train-local`` command.

Exact resume: the batch order and every random draw of step ``s`` (diffusion t and noise, flips)
come from generators seeded by ``(seed, s)``, so a run restored from a checkpoint at step ``s``
takes the same step ``s + 1`` as the run that wrote it; no RNG state has to be saved.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Sampler, default_collate

import fed_ndif
from fed_ndif.data.dataset import Normalization, SliceStackDataset
from fed_ndif.errors import FedNdifError
from fed_ndif.evaluation.metrics import volume_metrics
from fed_ndif.models.denoise_volume import denoise_volume, resolve_device
from fed_ndif.models.diffusion import EMA, DiffusionConfig, DiffusionProcess
from fed_ndif.models.networks import build_model
from fed_ndif.models.sampling import SamplerConfig
from fed_ndif.staging import staged_file

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CHECKPOINT_KIND = "fed-ndif-checkpoint"
SEED_STRIDE = 1_000_003


@dataclass
class ModelBundle:
    """Everything one site trains: network, EMA copy, optimizer, process and settings."""

    cfg: dict[str, Any]  # plain dict with model / diffusion / train / data sections
    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    normalization: Normalization
    process: DiffusionProcess | None  # None for the deterministic U-Net
    device: torch.device
    step: int = 0

    @property
    def k(self) -> int:
        return int(self.cfg["model"]["k"])

    @property
    def kind(self) -> str:
        return str(self.cfg["model"]["kind"])


def _plain(cfg: DictConfig | dict) -> dict[str, Any]:
    """A deep, plain-data copy (what checkpoints can hold under ``weights_only=True``)."""
    return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)  # type: ignore[return-value]


def diffusion_config(cfg: dict) -> DiffusionConfig:
    d = cfg["diffusion"]
    return DiffusionConfig(num_train_timesteps=int(d["num_train_timesteps"]),
                           schedule=str(d["schedule"]), prediction_type=str(d["prediction_type"]),
                           loss=str(d["loss"]))


def sampler_config(cfg: dict, **overrides: Any) -> SamplerConfig:
    return SamplerConfig(**{**cfg["diffusion"]["sampler"], **overrides})


def build_bundle(cfg: DictConfig | dict, *, normalization: Normalization | None = None,
                 device: str | None = None) -> ModelBundle:
    """A fresh model, EMA and optimizer from a train_local-style config (seeded by train.seed)."""
    cfg = _plain(cfg)
    train = cfg["train"]
    if normalization is None:
        normalization = Normalization.from_dict(cfg["data"]["normalization"])
    cfg["data"]["normalization"] = normalization.to_dict()
    dev = resolve_device(device or train.get("device", "auto"))
    process = None
    prediction_type = "sample"
    if cfg["model"]["kind"] == "diffusion":
        process = DiffusionProcess(diffusion_config(cfg))
        prediction_type = process.cfg.prediction_type
    torch.manual_seed(int(train["seed"]))
    model = build_model(cfg["model"], prediction_type=prediction_type).to(dev)
    ema = EMA(model, decay=float(train["ema_decay"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(train["lr"]),
                                  weight_decay=float(train["weight_decay"]))
    return ModelBundle(cfg=cfg, model=model, ema=ema, optimizer=optimizer,
                       normalization=normalization, process=process, device=dev)


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

    def batch(self, step: int) -> list[int]:
        first = step * self.batch_size
        return [int(self._perm(j // self.n)[j % self.n])
                for j in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


def make_train_batches(bundle: ModelBundle, dataset: SliceStackDataset, *,
                       workers: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """An endless iterator of training batches starting at ``bundle.step`` (exact on resume)."""
    if dataset.k != bundle.k:
        raise FedNdifError(f"dataset k={dataset.k} does not match the model's k={bundle.k}")
    train = bundle.cfg["train"]
    workers = int(train.get("workers", 0)) if workers is None else workers
    sampler = StepBatchSampler(len(dataset), batch_size=int(train["batch_size"]),
                               seed=int(train["seed"]), start_step=bundle.step)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0)
    return iter(loader)


def _step_generator(bundle: ModelBundle) -> torch.Generator:
    seed = (int(bundle.cfg["train"]["seed"]) * SEED_STRIDE + bundle.step + 1) % (2**63)
    return torch.Generator().manual_seed(seed)


def train_step(bundle: ModelBundle, batch: dict[str, torch.Tensor]) -> float:
    """One optimizer step on one batch; returns the loss."""
    train = bundle.cfg["train"]
    generator = _step_generator(bundle)
    low = batch["low"].to(bundle.device)
    full = batch["full"].to(bundle.device)
    nstd = batch["nstd"].to(bundle.device)
    if train.get("augment_flip", False):
        flip = (torch.rand(low.shape[0], generator=generator) < 0.5).to(bundle.device)
        low = torch.where(flip[:, None, None, None], low.flip(-1), low)
        full = torch.where(flip[:, None, None, None], full.flip(-1), full)
    bundle.model.train()
    if bundle.process is not None:
        loss = bundle.process.loss(bundle.model, low=low, full=full, nstd=nstd,
                                   generator=generator)
    else:
        out = bundle.model(low, nstd)
        loss = (F.l1_loss(out, full) if train.get("unet_loss", "l1") == "l1"
                else F.mse_loss(out, full))
    bundle.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if train.get("grad_clip"):
        nn.utils.clip_grad_norm_(bundle.model.parameters(), float(train["grad_clip"]))
    bundle.optimizer.step()
    bundle.ema.update(bundle.model)
    bundle.step += 1
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FedNdifError(f"training diverged at step {bundle.step} (loss {value}); lower "
                           "train.lr or check the data normalization")
    return value


def train_steps(bundle: ModelBundle, batches: Iterator[dict[str, torch.Tensor]],
                steps: int) -> dict[str, float]:
    """``steps`` optimizer steps; metrics: mean loss, last loss, steps, examples, seconds."""
    losses = []
    examples = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        losses.append(train_step(bundle, batch))
        examples += int(batch["full"].shape[0])
    return {"loss": float(np.mean(losses)) if losses else float("nan"),
            "last_loss": losses[-1] if losses else float("nan"), "steps": float(steps),
            "num-examples": float(examples), "seconds": time.perf_counter() - start}


def evaluate(bundle: ModelBundle, dataset: SliceStackDataset, *, use_ema: bool = True,
             max_studies: int | None = None, sampler: SamplerConfig | None = None,
             seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Whole-volume PSNR/SSIM/NMSE (SUV) of denoised vs full-count, averaged over studies.

    Also reports the same metrics for the low-count input (``input_*``) as a reference. A
    U-Net warm start is not available here (it needs a second model): it falls back to a
    warm start from the low-count input.
    """
    model = bundle.ema.model if use_ema else bundle.model
    if bundle.process is not None:
        sampler = sampler or sampler_config(bundle.cfg)
        if sampler.warm_start == "unet":
            sampler = SamplerConfig(**{**sampler.__dict__, "warm_start": "low_count"})
    studies = dataset.studies[:max_studies] if max_studies else dataset.studies
    rows = []
    for s in studies:
        low_suv = bundle.normalization.inverse(s.low)
        ref = bundle.normalization.inverse(s.full)
        pred, _ = denoise_volume(model, low_suv, nstd=s.nstd, normalization=bundle.normalization,
                                 k=bundle.k, process=bundle.process, sampler=sampler,
                                 device=str(bundle.device), seed=seed, progress=progress)
        m = volume_metrics(pred, ref)
        m.update({f"input_{key}": v for key, v in volume_metrics(low_suv, ref).items()})
        rows.append(m)
    out = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    out["num-examples"] = float(len(rows))
    return out


def get_weights(bundle: ModelBundle, *, ema: bool = False) -> OrderedDict[str, np.ndarray]:
    """The network's state as named numpy arrays (what travels in a federation)."""
    model = bundle.ema.model if ema else bundle.model
    return OrderedDict((name, t.detach().cpu().numpy().copy())
                       for name, t in model.state_dict().items())


def set_weights(bundle: ModelBundle, weights: dict[str, np.ndarray], *,
                reset_ema: bool = True) -> None:
    """Load named arrays into the network (and, by default, the EMA copy); checks names/shapes."""
    state = bundle.model.state_dict()
    missing = sorted(set(state) - set(weights))
    extra = sorted(set(weights) - set(state))
    if missing or extra:
        raise FedNdifError(f"weights do not fit the model: missing {missing[:3]}, "
                           f"unexpected {extra[:3]}")
    for name, value in weights.items():
        if tuple(np.shape(value)) != tuple(state[name].shape):
            raise FedNdifError(f"weight {name} has shape {tuple(np.shape(value))}, the model "
                               f"needs {tuple(state[name].shape)}")
    bundle.model.load_state_dict(OrderedDict(
        (n, torch.as_tensor(np.asarray(v)).to(state[n].dtype)) for n, v in weights.items()))
    if reset_ema:
        bundle.ema.model.load_state_dict(bundle.model.state_dict())


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with staged_file(path, suffix=".pt") as tmp:
        torch.save(obj, tmp)


def _cpu_state(state: dict) -> dict:
    return {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in state.items()}


def save_checkpoint(bundle: ModelBundle, path: str | Path) -> None:
    """Complete, self-describing checkpoint (weights, EMA, optimizer, step, config,
    normalization, versions), written atomically; loadable with ``weights_only=True``."""
    ema = bundle.ema.state_dict()
    _atomic_torch_save({
        "kind": CHECKPOINT_KIND, "schema_version": SCHEMA_VERSION,
        "package_version": fed_ndif.__version__, "step": bundle.step,
        "config": bundle.cfg, "normalization": bundle.normalization.to_dict(),
        "model": _cpu_state(bundle.model.state_dict()),
        "ema": {**ema, "weights": _cpu_state(ema["weights"])},
        "optimizer": bundle.optimizer.state_dict(),
    }, Path(path))


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


def _load_weights(module: nn.Module, state: dict, *, path: Path, cfg: dict) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line
                      or "Missing" in line or "Unexpected" in line), str(exc).splitlines()[0])
        raise FedNdifError(
            f"{path}: weights do not fit a {cfg['model']['kind']} model with k="
            f"{cfg['model']['k']} ({2 * int(cfg['model']['k']) + 1} low-count slices): "
            f"{first[:200]}") from None


def load_checkpoint(path: str | Path, *, device: str | None = None,
                    expect_k: int | None = None) -> ModelBundle:
    """A bundle exactly as saved (resume continues with the same next step)."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    cfg = ckpt["config"]
    k = int(cfg["model"]["k"])
    if expect_k is not None and k != expect_k:
        raise FedNdifError(f"{path}: the checkpoint was trained with k={k} ({2 * k + 1} "
                           f"low-count slices), but k={expect_k} ({2 * expect_k + 1}) is needed")
    bundle = build_bundle(cfg, normalization=Normalization.from_dict(ckpt["normalization"]),
                          device=device)
    _load_weights(bundle.model, ckpt["model"], path=path, cfg=cfg)
    _load_weights(bundle.ema.model, ckpt["ema"]["weights"], path=path, cfg=cfg)
    bundle.ema.num_updates = int(ckpt["ema"]["num_updates"])
    bundle.ema.decay = float(ckpt["ema"]["decay"])
    bundle.optimizer.load_state_dict(ckpt["optimizer"])
    bundle.step = int(ckpt["step"])
    return bundle


def init_from_checkpoint(bundle: ModelBundle, path: str | Path) -> None:
    """Fine-tuning: take a checkpoint's (EMA) weights into a fresh bundle; optimizer and step
    stay new. The checkpoint's normalization must be the bundle's."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    k = int(ckpt["config"]["model"]["k"])
    if k != bundle.k or ckpt["config"]["model"]["kind"] != bundle.kind:
        raise FedNdifError(f"{path}: a {ckpt['config']['model']['kind']} model with k={k} cannot "
                           f"initialise a {bundle.kind} model with k={bundle.k}")
    if Normalization.from_dict(ckpt["normalization"]) != bundle.normalization:
        raise FedNdifError(f"{path}: the checkpoint's normalization {ckpt['normalization']} "
                           "differs from data.normalization; fine-tune with the same one")
    _load_weights(bundle.model, ckpt["ema"]["weights"], path=path, cfg=ckpt["config"])
    bundle.ema.model.load_state_dict(bundle.model.state_dict())


def train_local(manifest: str | Path, out_dir: str | Path, *,
                overrides: list[str] | tuple[str, ...] = (),
                resume: bool = False) -> dict[str, float]:
    """``fed-ndif train-local``: train one site from its manifest into OUT_DIR.

    OUT_DIR receives ``last.pt`` (written atomically every ``train.checkpoint_every`` steps and
    at the end), ``config.yaml`` and ``metrics.jsonl``; ``--resume`` continues from ``last.pt``.
    """
    from fed_ndif.config import load_config

    return train_sites(_plain(load_config("train_local", overrides)), [Path(manifest)],
                       Path(out_dir), resume=resume)


def finetune(checkpoint: str | Path, manifest: str | Path, out_dir: str | Path, *,
             steps: int, lr: float, device: str | None = None) -> dict[str, float]:
    """``fed-ndif finetune``: personalize a (global) checkpoint on one site's training split.

    Model, diffusion and data settings come from the checkpoint, so a site needs only the
    checkpoint and its manifest; the optimizer starts fresh.
    """
    cfg = read_checkpoint(checkpoint)["config"]
    cfg["train"].update(steps=int(steps), lr=float(lr), init_from=str(checkpoint),
                        device=device or cfg["train"].get("device", "auto"))
    return train_sites(cfg, [Path(manifest)], Path(out_dir))


def _interleaved(bundle: ModelBundle, datasets: list[SliceStackDataset]
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Batches from several sites (pooled training). Step ``s`` draws one site, with odds
    proportional to its size, and that site's batch ``s``, both from (seed, s) alone, so resume
    stays exact. A batch never mixes sites, whose matrices may differ."""
    if len(datasets) == 1:
        yield from make_train_batches(bundle, datasets[0])
        return
    seed, batch_size = int(bundle.cfg["train"]["seed"]), int(bundle.cfg["train"]["batch_size"])
    samplers = [StepBatchSampler(len(d), batch_size=batch_size, seed=seed + i)
                for i, d in enumerate(datasets)]
    odds = np.array([len(d) for d in datasets], float)
    odds /= odds.sum()
    step = bundle.step
    while True:
        pick = int(np.random.default_rng([seed, step]).choice(len(datasets), p=odds))
        yield default_collate([datasets[pick][i] for i in samplers[pick].batch(step)])
        step += 1


def train_sites(cfg: dict[str, Any], manifests: list[Path], out_dir: Path, *,
                resume: bool = False) -> dict[str, float]:
    """Train on one site's manifest, or pooled over several (the centralized upper bound)."""
    last = out_dir / "last.pt"
    if resume:
        if not last.is_file():
            raise FedNdifError(f"{last}: nothing to resume")
        bundle = load_checkpoint(last, device=cfg["train"]["device"])
        for section in ("model", "diffusion", "data"):
            if bundle.cfg[section] != cfg[section]:
                raise FedNdifError(f"{last}: the checkpoint's {section} settings differ from "
                                   f"this run's; resume with the same {section} settings")
        bundle.cfg["train"] = cfg["train"]
    else:
        if last.exists():
            raise FedNdifError(f"{out_dir}: holds a checkpoint already; pass --resume or choose "
                               "another folder")
        bundle = build_bundle(cfg)
        if cfg["train"].get("init_from"):
            init_from_checkpoint(bundle, cfg["train"]["init_from"])
    train = bundle.cfg["train"]
    k = bundle.k
    levels = cfg["data"]["count_levels"]
    train_sets = [SliceStackDataset(m, split="train", k=k, normalization=bundle.normalization,
                                    count_levels=levels) for m in manifests]
    val_sets = []
    for manifest in manifests:
        try:
            val_sets.append(SliceStackDataset(manifest, split="val", k=k,
                                              normalization=bundle.normalization,
                                              count_levels=levels))
        except FedNdifError:
            log.warning("%s: no validation studies; skipping its validation", manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(bundle.cfg)))
    batches = _interleaved(bundle, train_sets)
    total = int(train["steps"])
    chunk = max(1, int(train.get("log_every", 50)))
    val_every = int(train.get("val_every", 0)) or total
    ckpt_every = int(train.get("checkpoint_every", 0)) or total
    summary: dict[str, float] = {}
    log.info("training on %s (%s, k=%d) from step %d to %d",
             ", ".join(m.parent.name for m in manifests), bundle.kind, k, bundle.step, total)
    with (out_dir / "metrics.jsonl").open("a") as metrics_file:
        while bundle.step < total:
            n = min(chunk, total - bundle.step,
                    val_every - bundle.step % val_every, ckpt_every - bundle.step % ckpt_every)
            metrics = train_steps(bundle, batches, n)
            record = {"step": bundle.step, **metrics}
            if val_sets and (bundle.step % val_every == 0 or bundle.step == total):
                vals = [evaluate(bundle, v, max_studies=int(train["val_max_studies"]))
                        for v in val_sets]
                record.update({f"val_{key}": float(np.mean([v[key] for v in vals]))
                               for key in vals[0]})
            log.info("step %d: %s", bundle.step, ", ".join(
                f"{key}={v:.4g}" for key, v in record.items() if key != "step"))
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if bundle.step % ckpt_every == 0 or bundle.step == total:
                save_checkpoint(bundle, last)
            summary = record
    return summary

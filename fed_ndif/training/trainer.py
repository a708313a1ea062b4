"""One site's training, validation and fine-tuning; Flower-free, so a ClientApp can reuse it.

API for the federation: :func:`make_train_batches`, :func:`train_steps` and :func:`validate`,
over a :class:`~fed_ndif.checkpoints.TrainingState`. :func:`train_local` is the
``fed-ndif train-local`` command and :func:`finetune` the ``fed-ndif finetune`` command.

Exact resume: the batch order and every random draw of step ``s`` (diffusion t and noise, flips)
come from generators seeded by ``(seed, s)``, so a run restored from a checkpoint at step ``s``
takes the same step ``s + 1`` as the run that wrote it; no RNG state has to be saved.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, default_collate

from fed_ndif.checkpoints import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    SELECTION_RECORD,
    TrainingState,
    build_state,
    init_from_checkpoint,
    load_checkpoint,
    plain_config,
    read_checkpoint,
    sampler_config,
    save_checkpoint,
)
from fed_ndif.data.dataset import SliceStackDataset, held_out_levels, split_studies
from fed_ndif.errors import FedNdifError
from fed_ndif.image_metrics import volume_metrics
from fed_ndif.lesion_physics import BODY_SUV
from fed_ndif.models.denoise_volume import denoise_volume
from fed_ndif.models.diffusion import pixel_loss
from fed_ndif.models.sampling import SamplerConfig
from fed_ndif.staging import staged_file
from fed_ndif.training.augment import LesionInsertion, insert_lesions
from fed_ndif.training.batches import SEED_STRIDE, batch_sampler

log = logging.getLogger(__name__)

def make_train_batches(state: TrainingState, dataset: SliceStackDataset, *,
                       workers: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """An endless iterator of training batches starting at ``state.step`` (exact on resume)."""
    if dataset.k != state.k:
        raise FedNdifError(f"dataset k={dataset.k} does not match the model's k={state.k}")
    train = state.cfg["train"]
    workers = int(train.get("workers", 0)) if workers is None else workers
    sampler = batch_sampler(dataset, state.cfg, seed=int(train["seed"]), start_step=state.step)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0)
    return iter(loader)


def _step_generator(state: TrainingState) -> torch.Generator:
    seed = (int(state.cfg["train"]["seed"]) * SEED_STRIDE + state.step + 1) % (2**63)
    return torch.Generator().manual_seed(seed)


def _insertion_generator(state: TrainingState) -> torch.Generator:
    """Its own stream, so turning lesion insertion on leaves every other draw of a step as it
    was."""
    seed = (int(state.cfg["train"]["seed"]) * SEED_STRIDE + state.step + 1) * 2 + 1
    return torch.Generator().manual_seed(seed % (2**63))


def train_step(state: TrainingState, batch: dict[str, torch.Tensor]) -> float:
    """One optimizer step on one batch; returns the loss."""
    train = state.cfg["train"]
    generator = _step_generator(state)
    low, full = batch["low"], batch["full"]
    insertion = LesionInsertion.from_config(train)
    if insertion is not None and insertion.probability > 0:
        body_level = float(state.normalization.forward(np.float32(BODY_SUV)))
        low, full = insert_lesions(low, full, full_stack=batch["full_stack"],
                                   spacing=batch["spacing"], fwhm=batch["fwhm"],
                                   count_level=batch["count_level"], settings=insertion,
                                   body_level=body_level,
                                   generator=_insertion_generator(state))
    low, full = low.to(state.device), full.to(state.device)
    nstd = batch["nstd"].to(state.device)
    if train["augment_flip"]:
        flip = (torch.rand(low.shape[0], generator=generator) < 0.5).to(state.device)
        low = torch.where(flip[:, None, None, None], low.flip(-1), low)
        full = torch.where(flip[:, None, None, None], full.flip(-1), full)
    state.model.train()
    weight = uptake_weight(full, float(train.get("uptake_weight", 0.0)))
    if state.process is not None:
        loss = state.process.loss(state.model, low=low, full=full, nstd=nstd,
                                   generator=generator, weight=weight)
    else:
        loss = pixel_loss(state.model(low, nstd), full, kind=train.get("unet_loss", "l1"),
                          weight=weight)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if train.get("grad_clip"):
        nn.utils.clip_grad_norm_(state.model.parameters(), float(train["grad_clip"]))
    state.optimizer.step()
    state.ema.update(state.model)
    state.step += 1
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FedNdifError(f"training diverged at step {state.step} (loss {value}); lower "
                           "train.lr or check the data normalization")
    return value


def uptake_weight(full: torch.Tensor, strength: float) -> torch.Tensor | None:
    """Per-pixel loss weights ``1 + strength x uptake`` (normalized units), scaled to mean 1 per
    image: lesions are under 0.1 % of the voxels, so an unweighted loss hardly sees their peaks.
    None when ``strength`` is 0 (the plain loss)."""
    if strength <= 0:
        return None
    weight = 1.0 + strength * full.clamp_min(0)
    return weight / weight.mean(dim=(1, 2, 3), keepdim=True)


def train_steps(state: TrainingState, batches: Iterator[dict[str, torch.Tensor]],
                steps: int) -> dict[str, float]:
    """``steps`` optimizer steps; metrics: mean loss, last loss, steps, examples, seconds."""
    losses = []
    examples = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        losses.append(train_step(state, batch))
        examples += int(batch["full"].shape[0])
    return {"loss": float(np.mean(losses)) if losses else float("nan"),
            "last_loss": losses[-1] if losses else float("nan"), "steps": float(steps),
            "num-examples": float(examples), "seconds": time.perf_counter() - start}


def validate(state: TrainingState, dataset: SliceStackDataset, *, use_ema: bool = True,
             max_studies: int | None = None, sampler: SamplerConfig | None = None,
             seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Whole-volume PSNR/SSIM/NMSE (SUV) of denoised vs full-count, averaged over studies.

    Also reports the same metrics for the low-count input (``input_*``) as a reference.
    """
    model = state.ema.model if use_ema else state.model
    if state.process is not None:
        sampler = sampler or sampler_config(state.cfg)
    studies = dataset.studies[:max_studies] if max_studies else dataset.studies
    rows = []
    for s in studies:
        low_suv = state.normalization.inverse(s.low)
        ref = state.normalization.inverse(s.full)
        pred, _ = denoise_volume(model, low_suv, nstd=s.nstd, normalization=state.normalization,
                                 k=state.k, process=state.process, sampler=sampler,
                                 device=str(state.device), window=state.window, seed=seed,
                                 progress=progress)
        m = volume_metrics(pred, ref)
        m.update({f"input_{key}": v for key, v in volume_metrics(low_suv, ref).items()})
        rows.append(m)
    out = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    out["num-examples"] = float(len(rows))
    return out


def train_local(manifest: str | Path, out_dir: str | Path, *,
                overrides: list[str] | tuple[str, ...] = (),
                resume: bool = False) -> dict[str, float]:
    """``fed-ndif train-local``: train one site from its manifest into OUT_DIR.

    OUT_DIR receives ``last.pt`` (written atomically every ``train.checkpoint_every`` steps and
    at the end), ``config.yaml`` and ``metrics.jsonl``; ``--resume`` continues from ``last.pt``.
    """
    from fed_ndif.config import load_config

    return train_sites(plain_config(load_config("train_local", overrides)), [Path(manifest)],
                       Path(out_dir), resume=resume)


def finetune(checkpoint: str | Path, manifest: str | Path, out_dir: str | Path, *,
             steps: int, lr: float, device: str | None = None, val_every: int | None = None,
             patience: int = 0, rival: Path | None = None) -> dict[str, float]:
    """``fed-ndif finetune``: personalize a (global) checkpoint on one site's training split.

    Model, diffusion and data settings come from the checkpoint, so a site needs only the
    checkpoint and its manifest; the optimizer starts fresh. With ``val_every``, the site's
    validation split scores the global model and then every ``val_every`` steps; ``best.pt``
    is the best of them (the global model itself when no step beats it), and training stops
    after ``patience`` checks without a gain (0: never early). ``rival``: another checkpoint
    of the same network that competes on validation too (an experiment at equal budget
    fine-tunes an earlier round, and the final global model is the one to beat).
    """
    cfg = read_checkpoint(checkpoint)["config"]
    cfg["train"].update(steps=int(steps), lr=float(lr), init_from=str(checkpoint),
                        device=device or cfg["train"].get("device", "auto"))
    if val_every:
        if val_every < 1 or patience < 0:
            raise FedNdifError(f"--val-every must be at least 1 and --patience at least 0, got "
                               f"{val_every} and {patience}")
        cfg["train"].update(val_every=int(val_every), keep_best=True, patience=int(patience))
    return train_sites(cfg, [Path(manifest)], Path(out_dir), rival=rival)


def _interleaved(state: TrainingState, datasets: list[SliceStackDataset]
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Batches from several sites (pooled training). Step ``s`` draws one site, with odds
    proportional to its size, and that site's batch ``s``, both from (seed, s) alone, so resume
    stays exact. A batch never mixes sites, whose matrices may differ."""
    if len(datasets) == 1:
        yield from make_train_batches(state, datasets[0])
        return
    seed = int(state.cfg["train"]["seed"])
    samplers = [batch_sampler(d, state.cfg, seed=seed + i) for i, d in enumerate(datasets)]
    odds = np.array([len(d) for d in datasets], float)
    odds /= odds.sum()
    step = state.step
    while True:
        pick = int(np.random.default_rng([seed, step]).choice(len(datasets), p=odds))
        yield default_collate([datasets[pick][i] for i in samplers[pick].batch(step)])
        step += 1


def train_sites(cfg: dict[str, Any], manifests: list[Path], out_dir: Path, *,
                resume: bool = False, rival: Path | None = None) -> dict[str, float]:
    """Train on one site's manifest, or pooled over several (the centralized upper bound)."""
    last = out_dir / LAST_CHECKPOINT
    if resume:
        if not last.is_file():
            raise FedNdifError(f"{last}: nothing to resume")
        state = load_checkpoint(last, device=cfg["train"]["device"])
        for section in ("model", "diffusion", "data"):
            if state.cfg[section] != cfg[section]:
                raise FedNdifError(f"{last}: the checkpoint's {section} settings differ from "
                                   f"this run's; resume with the same {section} settings")
        state.cfg["train"] = cfg["train"]
    else:
        if last.exists():
            raise FedNdifError(f"{out_dir}: holds a checkpoint already; pass --resume or choose "
                               "another folder")
        state = build_state(cfg)
        if cfg["train"].get("init_from"):
            init_from_checkpoint(state, cfg["train"]["init_from"])
    train = state.cfg["train"]
    k = state.k
    levels = cfg["data"]["count_levels"]

    def site_split(manifest: Path, split: str) -> SliceStackDataset:
        return SliceStackDataset(manifest, split=split, k=k, normalization=state.normalization,
                                 count_levels=levels,
                                 exclude_levels=held_out_levels(cfg["data"], manifest.parent.name))

    train_sets = [site_split(m, "train") for m in manifests]
    val_sets = []
    for manifest in manifests:
        # Only a missing split is skipped: a broken validation study is an error.
        if not split_studies(manifest, ("val",), count_levels=levels,
                             exclude_levels=held_out_levels(cfg["data"], manifest.parent.name)):
            log.warning("%s: no validation studies; skipping its validation", manifest)
            continue
        val_sets.append(site_split(manifest, "val"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(state.cfg)))
    batches = _interleaved(state, train_sets)
    total = int(train["steps"])
    chunk = max(1, int(train.get("log_every", 50)))
    val_every = int(train["val_every"]) or total
    ckpt_every = int(train["checkpoint_every"]) or total
    summary: dict[str, float] = {}
    log.info("training on %s (%s, k=%d) from step %d to %d",
             ", ".join(m.parent.name for m in manifests), state.kind, k, state.step, total)
    selection = _Selection(out_dir) if train.get("keep_best") and val_sets else None
    if selection is not None and resume and state.selection:
        selection.restore(state.selection)  # the best so far, and the checks since it
    with (out_dir / "metrics.jsonl").open("a") as metrics_file:
        if selection is not None and state.step == 0:
            if rival is not None:
                selection.consider_rival(rival, _validation(
                    load_checkpoint(rival, device=str(state.device)), val_sets))
            selection.consider(state, _validation(state, val_sets))
        while state.step < total:
            n = min(chunk, total - state.step,
                    val_every - state.step % val_every, ckpt_every - state.step % ckpt_every)
            metrics = train_steps(state, batches, n)
            record = {"step": state.step, **metrics}
            if val_sets and (state.step % val_every == 0 or state.step == total):
                record.update(_validation(state, val_sets))
            log.info("step %d: %s", state.step, ", ".join(
                f"{key}={v:.4g}" for key, v in record.items() if key != "step"))
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            summary = record
            stop = False
            if selection is not None and "val_psnr" in record:
                selection.consider(state, record)
                stop = selection.exhausted(int(train.get("patience", 0)))
            if stop or state.step % ckpt_every == 0 or state.step == total:
                if selection is not None:
                    state.selection = selection.state()
                save_checkpoint(state, last)
            if stop:
                log.info("no validation gain in %d checks: stopping at step %d",
                         selection.since_best, state.step)
                break
    if selection is not None:
        selection.finish()
    return summary


def _validation(state: TrainingState, val_sets: list[SliceStackDataset]) -> dict[str, float]:
    vals = [validate(state, v, max_studies=int(state.cfg["train"]["val_max_studies"]))
            for v in val_sets]
    return {f"val_{key}": float(np.mean([v[key] for v in vals])) for key in vals[0]}


class _Selection:
    """Keeps the best model by validation PSNR in ``best.pt``, the starting weights (step 0)
    included: when no step beats them, the starting model is what the run hands on."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.best_step = -1
        self.best_psnr = -math.inf
        self.start_psnr = math.nan
        self.rival: Path | None = None
        self.rival_psnr = math.nan
        self.since_best = 0

    def consider_rival(self, rival: Path, record: dict[str, float]) -> None:
        """A checkpoint that did not come from this run: best.pt becomes a copy of it."""
        self.rival, self.rival_psnr = rival, float(record["val_psnr"])
        self.best_psnr = self.rival_psnr
        with staged_file(self.out_dir / BEST_CHECKPOINT, suffix=".pt") as tmp:
            shutil.copyfile(rival, tmp)

    def consider(self, state: TrainingState, record: dict[str, float]) -> None:
        psnr = float(record["val_psnr"])
        if state.step == 0:
            self.start_psnr = psnr
        if psnr > self.best_psnr:
            self.best_step, self.best_psnr, self.since_best = state.step, psnr, 0
            save_checkpoint(state, self.out_dir / BEST_CHECKPOINT)
        else:
            self.since_best += 1

    _KEPT = ("best_step", "best_psnr", "start_psnr", "rival_psnr", "since_best")

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to go on choosing where this one stopped."""
        kept = {name: getattr(self, name) for name in self._KEPT}
        return {**kept, "rival": str(self.rival) if self.rival is not None else None}

    def restore(self, saved: dict[str, Any]) -> None:
        for name in self._KEPT:
            if name in saved:
                setattr(self, name, type(getattr(self, name))(saved[name]))
        if saved.get("rival"):
            self.rival = Path(saved["rival"])
        log.info("resuming the selection: best so far step %d (validation PSNR %.3f dB), %d "
                 "check(s) since", self.best_step, self.best_psnr, self.since_best)

    def exhausted(self, patience: int) -> bool:
        return patience > 0 and self.since_best >= patience

    def finish(self) -> None:
        summary = {"best_step": self.best_step, "val_psnr_best": self.best_psnr,
                   "val_psnr_start": self.start_psnr, "kept_start": self.best_step == 0}
        if self.rival is not None:
            summary.update(rival=str(self.rival), val_psnr_rival=self.rival_psnr,
                           kept_rival=self.best_step == -1)
        (self.out_dir / SELECTION_RECORD).write_text(json.dumps(summary, indent=1))
        if self.best_step == -1:
            log.info("kept %s (validation PSNR %.3f dB; no fine-tuned step beat it)", self.rival,
                     self.best_psnr)
        else:
            log.info("kept the model of step %d (validation PSNR %.3f dB; start %.3f dB)",
                     self.best_step, self.best_psnr, self.start_psnr)

"""The multi-site comparison behind ``fed-ndif simulate``: federations, personalization,
local-only and pooled training, classical baselines, evaluation and the report.

Each stage leaves its result in the run folder and is skipped when that result is already
there, so an interrupted experiment continues where it stopped:

    sites/                      synthetic sites (make_sites)
    federated/<method>/         global checkpoints, metrics.jsonl, wandb (one Flower run each)
    federated/.<method>/logs/   Flower's, Ray's and wandb's own output
    personalized/<site>/        Fed-NDIF fine-tuned on each site
    local/<site>/               each site alone
    pooled/                     centralized on all sites' data
    metrics.csv, report.md, metrics_summary.json, figures/, config.yaml
    seeds/seed<k>/              with compare.seeds: N > 1, the same learned-method folders and
                                metrics.csv for training seed k = 1..N-1 (seed 0 is the layout
                                above, so a one-seed run resumes as before)
    metrics_seeds.csv           every seed's rows, with their seed (N > 1)

Every learned method gets the same training budget (:class:`Budget`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from fed_ndif.checkpoints import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    SELECTION_RECORD,
    global_checkpoint_path,
    latest_global_checkpoint,
    read_checkpoint,
)
from fed_ndif.data.dataset import held_out_levels
from fed_ndif.data.manifest import MANIFEST_NAME
from fed_ndif.data.sites import parse_sites
from fed_ndif.errors import FedNdifError
from fed_ndif.evaluation.compare import (
    INPUT_LABEL,
    Method,
    checkpoint_method,
    input_method,
    load_studies,
    noise_free_method,
    read_rows,
    score_methods,
    tuned_filters,
    write_rows,
)
from fed_ndif.evaluation.convergence import federation_curve, trainer_curve
from fed_ndif.evaluation.detectability import (
    DETECTION_CSV,
    DetectionTask,
    read_detection,
    score_detection,
    write_detection,
)
from fed_ndif.evaluation.report import figure_lesion_slices, write_report
from fed_ndif.run_config import federated_config
from fed_ndif.runtime.processes import run_parallel
from fed_ndif.runtime.simulation import run_flower_simulation
from fed_ndif.staging import remove_path

log = logging.getLogger(__name__)

# Federated methods: the changes each makes to the experiment's model.
FEDERATIONS: dict[str, dict[str, Any]] = {
    "fedndif": {},
    "fedavg_no_nstd": {"noise_embedding": False},
    "fedavg_unet": {"kind": "unet"},
}
LABELS = {
    "input": INPUT_LABEL,
    "gaussian": "Gaussian filter",
    "nlm": "Non-local means",
    "local": "Local-only diffusion",
    "fedavg_unet": "FedAvg U-Net",
    "fedavg_no_nstd": "FedAvg diffusion, no NSTD",
    "fedndif_global": "Fed-NDIF global",
    "fedndif_personalized": "Fed-NDIF personalized",
    "pooled": "Pooled diffusion (upper bound)",
}
ENGINES = ("flower", "inprocess")  # simulation.engine: see configs/simulate.yaml
SEEDS_DIR = "seeds"
SEEDS_METRICS = "metrics_seeds.csv"
NEEDS_FEDERATION = {"fedndif_global": "fedndif", "fedndif_personalized": "fedndif",
                    "fedavg_no_nstd": "fedavg_no_nstd", "fedavg_unet": "fedavg_unet"}


def _methods(cfg: DictConfig) -> list[str]:
    methods = list(cfg.compare.methods)
    unknown = [m for m in methods if m not in LABELS]
    if unknown:
        raise FedNdifError(f"configuration error: compare.methods has unknown {unknown}; "
                           f"choose from {list(LABELS)}")
    return methods


LEARNED = {"local", "fedavg_unet", "fedavg_no_nstd", "fedndif_global", "fedndif_personalized",
           "pooled"}


@dataclass(frozen=True)
class Budget:
    """One training budget for every learned method, counted as the pixels that pass through
    the network: optimizer steps x batch x pixels per sample (a patch, or a whole slice where
    the slice is smaller than the patch or patches are off), per site. Steps x batch alone
    would charge a 64-px patch like a 120-px slice, 3.5 times its compute.

    A site spends ``per_site = rounds x local_steps + finetune_steps`` steps on Fed-NDIF
    personalized (federated rounds, then fine-tuning). Every other learned method gets the
    same: the federations run ``finetune_steps / local_steps`` more rounds (personalization
    starts from round ``rounds``), local-only trains ``per_site`` steps at each site, and
    pooled training ``sites x per_site`` steps on all sites' data. Every method trains on the
    same samples (``data``), so equal steps are equal pixels.
    """

    pixels: tuple[int, ...]  # per training sample, one entry per site
    rounds: int
    local_steps: int
    finetune_steps: int
    batch: int

    def __post_init__(self) -> None:
        if self.finetune_steps % self.local_steps:
            raise FedNdifError(f"configuration error: compare.finetune_steps "
                               f"({self.finetune_steps}) must be a multiple of fl.local_steps "
                               f"({self.local_steps}), so that every learned method can get the "
                               "same training budget")

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Budget:
        patch = cfg.data.get("patch_size")
        pixels = []
        for site in parse_sites(cfg):
            side = min(int(patch), site.scanner.matrix) if patch else site.scanner.matrix
            pixels.append(side * side if patch else site.scanner.matrix ** 2)
        return cls(pixels=tuple(pixels), rounds=int(cfg.fl.rounds),
                   local_steps=int(cfg.fl.local_steps),
                   finetune_steps=int(cfg.compare.finetune_steps),
                   batch=int(cfg.train.batch_size))

    @property
    def sites(self) -> int:
        return len(self.pixels)

    @property
    def per_site(self) -> int:
        return self.rounds * self.local_steps + self.finetune_steps

    @property
    def federated_rounds(self) -> int:
        return self.rounds + self.finetune_steps // self.local_steps

    @property
    def megapixels(self) -> float:
        """What every learned method passes through its network, all sites together."""
        return self.per_site * self.batch * sum(self.pixels) / 1e6

    def label(self) -> str:
        return f"{self.megapixels:.1f} Mpx"

    def notes(self, finetune_lr: float) -> str:
        sides = ", ".join(f"{round(p ** 0.5)}²" for p in self.pixels)
        return (f"Training budget, the same for every learned method: {self.megapixels:.1f} "
                f"megapixels through the network (table column 'budget'), that is "
                f"{self.per_site} optimizer steps of batch {self.batch} per site on samples of "
                f"{sides} pixels ({self.sites} sites). Fed-NDIF personalized: {self.rounds} "
                f"federated rounds of {self.local_steps} local steps, then up to "
                f"{self.finetune_steps} fine-tuning steps at lr {finetune_lr:g}, or the "
                f"final global model where none of those steps beats it on validation; the "
                f"federations (Fed-NDIF global, FedAvg U-Net, FedAvg diffusion without NSTD): "
                f"{self.federated_rounds} rounds; local-only: {self.per_site} steps at each site; "
                f"pooled: {self.sites * self.per_site} steps on all sites' data.")


def _train_cfg(fed: dict[str, Any], steps: int, *, val_every: int) -> dict[str, Any]:
    cfg = copy.deepcopy({k: fed[k] for k in ("model", "diffusion", "train", "data")})
    cfg["train"].update(steps=int(steps), val_every=int(val_every), checkpoint_every=0,
                        init_from=None)
    return cfg


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _train_unless_done(cfg: dict[str, Any], manifests: list[Path], out: Path) -> Path:
    from fed_ndif.training.trainer import train_sites

    last = out / LAST_CHECKPOINT
    if last.is_file() and int(read_checkpoint(last)["step"]) >= int(cfg["train"]["steps"]):
        log.info("%s: already trained", out)
    else:
        train_sites(cfg, manifests, out, resume=last.is_file())
    return last


def seed_config(cfg: DictConfig, seed: int) -> DictConfig:
    """The experiment with training seed ``seed`` (0: ``cfg`` itself): initialisation, batch
    order (``train.seed``) and the sampler's noise at evaluation (``compare.seed``) change; the
    sites and their test subjects do not."""
    if seed == 0:
        return cfg
    out = copy.deepcopy(cfg)
    out.train.seed = int(cfg.train.seed) + seed
    out.compare.seed = int(cfg.compare.seed) + seed
    return out


def seed_folder(out_dir: Path, seed: int) -> Path:
    """Seed 0 keeps the single-seed layout (earlier runs resume); seed k has seeds/seed<k>/."""
    return out_dir if seed == 0 else out_dir / SEEDS_DIR / f"seed{seed}"


def run_experiment(cfg: DictConfig, out_dir: Path, sites_dir: Path) -> Path:
    """Everything after the sites exist; returns report.md. With ``compare.seeds: N``, every
    learned method is trained and scored N times (:func:`seed_config`); the methods that do not
    learn are scored once, and the report's intervals hold the spread over seeds."""
    methods = _methods(cfg)
    sites = list(cfg.sites.keys())
    budget = Budget.from_config(cfg)
    seeds = int(cfg.compare.get("seeds") or 1)
    rows, figures, curves, detection = _train_and_score(cfg, out_dir, sites_dir, methods)
    notes = [
        budget.notes(float(cfg.compare.finetune_lr)),
        *_selection_notes(out_dir / "personalized", sites),
        f"Diffusion sampling: {cfg.diffusion.sampler.name}, {cfg.diffusion.sampler.steps} "
        f"steps, {cfg.diffusion.sampler.samples} sample(s), warm start "
        f"{cfg.diffusion.sampler.warm_start}; model preset channels "
        f"{list(cfg.model.diffusion_net.channels)}.",
    ]
    if seeds > 1:
        learned = [m for m in methods if m in LEARNED]
        rows = [{**r, "seed": 0} if r["method"] in LEARNED else r for r in rows]
        detection = [{**r, "seed": 0} if r["method"] in LEARNED else r for r in detection]
        for seed in range(1, seeds):
            log.info("training seed %d of %d: %s", seed + 1, seeds, ", ".join(learned))
            seeded, _, _, seeded_detection = _train_and_score(
                seed_config(cfg, seed), seed_folder(out_dir, seed), sites_dir, learned)
            rows += [{**r, "seed": seed} for r in seeded]
            detection += [{**r, "seed": seed} for r in seeded_detection]
        write_rows(out_dir / SEEDS_METRICS, rows)
        notes.append(f"Training seeds: {seeds} (`compare.seeds`; train.seed and compare.seed "
                     f"{int(cfg.train.seed)}..{int(cfg.train.seed) + seeds - 1}); every learned "
                     f"method trained and scored once per seed (seed k > 0 in "
                     f"`{SEEDS_DIR}/seed<k>/`), all rows in `{SEEDS_METRICS}`; the figures and "
                     "the mean ± sd tables pool every seed's rows.")
    else:
        notes.append("Training seeds: 1 (`compare.seeds: 1`): the intervals hold test "
                     "subjects, not training randomness.")
    budgets = {m: budget.label() for m in methods if m in LEARNED}
    # The noise-free reference (simulated sites) is scored right after the input it shows the
    # physical best for.
    order = [shown for name in methods
             for shown in ((name, "noise_free") if name == "input" else (name,))]
    held_out = {site: held_out_levels(cfg.data, site) for site in sites}
    return write_report(out_dir, rows, order, curves=curves, notes=notes, figures=figures,
                        budgets=budgets, held_out=held_out, detection=detection)


def _federate(cfg: DictConfig, fed: dict[str, Any], *, n_sites: int, work_dir: Path,
              name: str) -> None:
    """One federation on the configured engine: Flower's simulation (Ray, a SuperLink on
    127.0.0.1) or the same apps in this process (``simulation.engine: inprocess``)."""
    if check_engine(cfg) == "inprocess":
        from fed_ndif.runtime.inprocess import run_inprocess_federation

        run_inprocess_federation(fed, n_sites=n_sites)
    else:
        run_flower_simulation(fed, n_sites=n_sites,
                              cpus_per_site=float(cfg.simulation.cpus_per_site),
                              gpus_per_site=float(cfg.simulation.gpus_per_site),
                              work_dir=work_dir, name=name)


def check_engine(cfg: DictConfig) -> str:
    engine = str(cfg.simulation.engine)
    if engine not in ENGINES:
        raise FedNdifError(f"configuration error: simulation.engine is {engine!r}; choose "
                           f"one of {list(ENGINES)}")
    return engine


def _train_and_score(cfg: DictConfig, out_dir: Path, sites_dir: Path, methods: list[str]
                     ) -> tuple[list[dict], list[Path], dict[str, list[dict]]]:
    """Train every learned method of ``methods`` into ``out_dir`` (or find it trained there)
    and score ``methods`` on the test subjects: rows, lesion figures, training curves."""
    from fed_ndif.training.trainer import finetune

    sites = list(cfg.sites.keys())
    manifests = {s: sites_dir / s / MANIFEST_NAME for s in sites}
    budget = Budget.from_config(cfg)
    rounds = budget.federated_rounds

    checkpoints: dict[str, dict[str, Path]] = {m: {} for m in methods}
    curves: dict[str, list[dict]] = {}
    for federation in dict.fromkeys(NEEDS_FEDERATION[m] for m in methods
                                    if m in NEEDS_FEDERATION):
        run_dir = out_dir / "federated" / federation
        fed = federated_config(cfg, sites_dir=sites_dir, run_dir=run_dir)
        fed["model"].update(FEDERATIONS[federation])
        fed["fl"]["rounds"] = rounds
        done = latest_global_checkpoint(run_dir)
        if done is not None and done[0] >= rounds:
            log.info("federation %s: already finished", federation)
        else:
            log.info("federation %s: %d rounds over %d sites", federation, rounds, len(sites))
            _federate(cfg, fed, n_sites=len(sites),
                      work_dir=out_dir / "federated" / f".{federation}",
                      name=f"federation {federation}")
        final = global_checkpoint_path(run_dir, rounds)
        if not final.is_file():
            raise FedNdifError(f"federation {federation} did not write {final}; see "
                               f"{out_dir / 'federated' / f'.{federation}' / 'logs'}")
        records = _read_jsonl(run_dir / "metrics.jsonl")
        if records:
            name = LABELS.get(f"{federation}_global", LABELS.get(federation, federation))
            curves[name] = federation_curve(records, local_steps=budget.local_steps)
        for method, needed in NEEDS_FEDERATION.items():
            if needed == federation and method in methods and method != "fedndif_personalized":
                checkpoints[method] = dict.fromkeys(sites, final)

    fed = federated_config(cfg, sites_dir=sites_dir, run_dir=out_dir / "federated" / "fedndif")
    if "fedndif_personalized" in methods:
        start = global_checkpoint_path(out_dir / "federated" / "fedndif", budget.rounds)
        # Equal budgets: fine-tuning starts from an earlier round, and the final global model
        # (same budget) competes with its steps on validation, so a site keeps whichever is
        # better there: personalization is applied only where it pays.
        final = global_checkpoint_path(out_dir / "federated" / "fedndif", rounds)
        val_every = cfg.compare.get("finetune_val_every")
        chosen = BEST_CHECKPOINT if val_every else LAST_CHECKPOINT
        # With selection, best.pt appears at step 0; only the selection record marks a finished
        # run. An unfinished one is cheap: it starts over.
        finished = SELECTION_RECORD if val_every else LAST_CHECKPOINT
        for site in sites:
            out = out_dir / "personalized" / site
            if not (out / finished).is_file():
                remove_path(out)
                log.info("personalizing Fed-NDIF round %d on %s (%d steps)", budget.rounds,
                         site, budget.finetune_steps)
                finetune(start, manifests[site], out, steps=budget.finetune_steps,
                         lr=float(cfg.compare.finetune_lr), device=str(cfg.compare.device),
                         val_every=int(val_every) if val_every else None,
                         patience=int(cfg.compare.get("finetune_patience") or 0),
                         rival=final if val_every and final != start else None)
            checkpoints["fedndif_personalized"][site] = out / chosen
            records = [r for r in _read_jsonl(out / "metrics.jsonl") if r["step"] > 0]
            if records:
                curves[f"{LABELS['fedndif_personalized']} ({site})"] = trainer_curve(
                    records, start=budget.rounds * budget.local_steps)
    # Local-only and pooled validate every compare.val_every steps per site (0: never), so
    # that the report can show whether they trained to a plateau. They are independent
    # trainings: compare.workers processes run them side by side (the longest first).
    val_every = int(cfg.compare.get("val_every") or 0)
    jobs: dict[tuple[str, str], tuple] = {}
    if "pooled" in methods:
        pooled = _train_cfg(fed, len(sites) * budget.per_site,
                            val_every=len(sites) * val_every)
        jobs[("pooled", "")] = (pooled, list(manifests.values()), out_dir / "pooled")
    if "local" in methods:
        local = _train_cfg(fed, budget.per_site, val_every=val_every)
        for site in sites:
            jobs[("local", site)] = (local, [manifests[site]], out_dir / "local" / site)
    workers = int(cfg.compare.get("workers") or 1)
    if jobs:
        log.info("training %s (%d steps per site) with %d worker(s)",
                 ", ".join(" ".join(key).strip() for key in jobs), budget.per_site, workers)
    trained = dict(zip(jobs, run_parallel(_train_unless_done, list(jobs.values()),
                                          workers=workers), strict=True))
    for (method, site), last in trained.items():
        records = _read_jsonl(last.parent / "metrics.jsonl")
        if method == "pooled":
            checkpoints["pooled"] = dict.fromkeys(sites, last)
            if val_every and records:
                curves[LABELS["pooled"]] = trainer_curve(records, sites=len(sites))
        else:
            checkpoints["local"][site] = last
            if val_every and records:
                curves[f"{LABELS['local']} ({site})"] = trainer_curve(records)

    rows, figures, detection = score_test_splits(cfg, out_dir, sites, manifests, methods,
                                                 checkpoints)
    return rows, figures, curves, detection


def _selection_notes(folder: Path, sites: list[str]) -> list[str]:
    """What personalization kept at each site, from its selection record."""
    kept = []
    for site in sites:
        record = folder / site / SELECTION_RECORD
        if record.is_file():
            chosen = json.loads(record.read_text())
            if chosen.get("kept_rival"):
                kept.append(f"{site}: the final global model, not personalized (no fine-tuned "
                            f"step beat its {chosen['val_psnr_rival']:.2f} dB on validation)")
            elif chosen["kept_start"]:
                kept.append(f"{site}: the global model it started from (no fine-tuned step beat "
                            f"it on validation, {chosen['val_psnr_start']:.2f} dB)")
            else:
                rival = (f", the final global model {chosen['val_psnr_rival']:.2f} dB"
                         if "val_psnr_rival" in chosen else "")
                kept.append(f"{site}: fine-tuned step {chosen['best_step']} "
                            f"({chosen['val_psnr_best']:.2f} dB on validation against "
                            f"{chosen['val_psnr_start']:.2f} dB for its start{rival})")
    return ["Personalization kept, by validation PSNR: " + "; ".join(kept) + "."] if kept else []


def _lesion_study(studies):
    """The lowest-count test study of the first subject, and its largest lesion's slice."""
    with_lesions = [s for s in studies if s.lesions is not None and s.lesions.max() > 0]
    if not with_lesions:
        return None, None
    subject = with_lesions[0].study.subject
    study = min((s for s in with_lesions if s.study.subject == subject),
                key=lambda s: s.study.count_level)
    sizes = np.bincount(study.lesions.ravel())
    sizes[0] = 0
    zs = np.argwhere(study.lesions == int(np.argmax(sizes)))[:, 0]
    return study, int(np.round(zs.mean()))


def score_test_splits(cfg: DictConfig, out_dir: Path, sites: list[str],
                      manifests: dict[str, Path], methods: list[str],
                      checkpoints: dict[str, dict[str, Path]]) -> tuple[list[dict], list[Path]]:
    metrics_csv = out_dir / "metrics.csv"
    detection_csv = out_dir / DETECTION_CSV
    task = DetectionTask.from_config(cfg.compare.get("detectability"))
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = read_rows(metrics_csv) if metrics_csv.is_file() else []
    detection: list[dict] = read_detection(detection_csv) if detection_csv.is_file() else []
    done = {r["site"] for r in rows} & ({r["site"] for r in detection} if task else set(sites))
    figures = []
    for site in sites:
        figure = figures_dir / f"lesion_{site}.png"
        if site in done and figure.is_file():
            figures.append(figure)
            continue
        rows = [r for r in rows if r["site"] != site]
        detection = [r for r in detection if r["site"] != site]
        levels = list(cfg.compare.count_levels or [])
        levels += [c for c in held_out_levels(cfg.data, site) if levels]
        studies = load_studies(manifests[site], "test", count_levels=levels or None,
                               max_subjects=cfg.compare.max_test_subjects or None)
        site_methods: list[Method] = []
        filters = {m.name: m for m in tuned_filters(manifests[site])} if {
            "gaussian", "nlm"} & set(methods) else {}
        for name in methods:
            if name == "input":
                site_methods.append(input_method())
                if any(s.ideal is not None for s in studies):
                    site_methods.append(noise_free_method())
            elif name in filters:
                site_methods.append(filters[name])
            else:
                site_methods.append(checkpoint_method(
                    name, LABELS[name], checkpoints[name][site], device=str(cfg.compare.device),
                    seed=int(cfg.compare.seed)))
        chosen, slice_index = _lesion_study(studies)
        site_rows, outputs = score_methods(site, studies, site_methods,
                                           keep_outputs=lambda s, c=chosen: s is c)
        if task is not None:
            detection += score_detection(site, studies, site_methods, task)
            write_detection(detection_csv, detection)
        rows += site_rows
        write_rows(metrics_csv, rows)
        if chosen is not None:
            level = chosen.study.count_level
            panels = [(m.label if m.name != "input" else f"low count {100 * level:g} %",
                       outputs[(chosen.study.subject, level, m.name)]) for m in site_methods]
            top = float(np.percentile(chosen.full[slice_index], 99.5))
            figure_lesion_slices(site, panels, chosen.full, slice_index, figure,
                                 window=(0.0, max(1.0, math.ceil(top))))
            figures.append(figure)
    return rows, figures, detection

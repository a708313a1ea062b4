"""The method's three claims where models converge: ``experiment=converge``, every method x N
training seeds on a 2-core CPU, and the two comparisons a `fed-ndif simulate` report does not
hold (BENCHMARKS.md, "The method's claims where models converge").

    python benchmarks/converge.py runs/converge                 # 3 seeds, 2 at a time
    python benchmarks/converge.py runs/converge --seeds 3 --parallel 1 some.key=value

Resumable: each seed is a `fed-ndif simulate` folder (``s<k>``, train.seed and compare.seed k)
that skips the stages it has finished, then that seed's evaluations below (a process each, as
soon as its seed is trained), skipped when their folders hold their metrics. Writes, under the root:
- ``joined/``: the seeds joined by benchmarks/seed_spread.py (report.md, claims.json);
- ``held_out_scanner/``: a site whose scanner no training site has (configs/sites/
  held_out_scanner.yaml), scored only at test: (a) the NSTD embedding at an unseen scanner;
- ``samples/``: Fed-NDIF global with one sample and the mean of K against the FedAvg U-Net,
  at equal training compute, on body PSNR, lesions and liver noise grain: (c);
- ``claims.json`` / ``claims.md``: the three claims in one table, each with its interval over
  subjects and seeds, Holm-corrected as one family: (a) at the held-out scanner and at the
  held-out count level, (b) federation against local-only and pooled over all sites (per site
  in ``joined/report.md``), (c) from ``samples/``.

``--experiment`` picks another setting of the same design (benchmarks/gpu.sh runs
``converge_gpu``). Each seed runs with this process's OMP_NUM_THREADS (1 when unset).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fed_ndif.checkpoints import global_checkpoint_path
from fed_ndif.config import load_config
from fed_ndif.data.manifest import MANIFEST_NAME
from fed_ndif.data.sites import write_sites
from fed_ndif.evaluation.compare import evaluate_site, read_rows
from fed_ndif.evaluation.statistics import PairedDifference, holm, paired_difference
from fed_ndif.experiment import Budget

ROOT = Path(__file__).resolve().parents[1]
# The package's entry point by module: a GPU machine installs wheels without console scripts.
FED_NDIF = [sys.executable, "-m", "fed_ndif.cli"]
CHECKPOINTS = {"fedndif_global": "fedndif", "fedavg_no_nstd": "fedavg_no_nstd",
               "fedavg_unet": "fedavg_unet"}
log = logging.getLogger("converge")


def _seed_overrides(seed: int, extra: list[str], experiment: str) -> list[str]:
    return [f"experiment={experiment}", f"train.seed={seed}", f"compare.seed={seed}",
            "simulation.engine=inprocess", "logger.wandb_mode=disabled", *extra]


def _run_seed(root: Path, seed: int, extra: list[str], samples: int, experiment: str) -> float:
    """Train and score one seed, then its extra evaluations, each in its own process; the
    seconds it took (0 when it was all done already)."""
    out = root / f"s{seed}"
    start = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with (root / f"s{seed}.log").open("a") as logfile:
        if not (out / "report.md").is_file():
            subprocess.run([*FED_NDIF, "simulate", f"out_dir={out}",
                            *_seed_overrides(seed, extra, experiment)], check=True, stdout=logfile,
                           stderr=subprocess.STDOUT, env=env)
        if not (root / f"extras_s{seed}.done").is_file():
            subprocess.run([sys.executable, __file__, str(root), "--extras-of", str(seed),
                            "--samples", str(samples), "--experiment", experiment, *extra],
                           check=True, stdout=logfile, stderr=subprocess.STDOUT, env=env)
    return time.monotonic() - start


def _final_checkpoints(run: Path, cfg) -> dict[str, Path]:
    rounds = Budget.from_config(cfg).federated_rounds
    return {name: global_checkpoint_path(run / "federated" / folder, rounds)
            for name, folder in CHECKPOINTS.items()}


def _evaluate(manifest: Path, out: Path, models: dict[str, Path], *, filters: bool,
              count_levels: list[float] | None, device: str) -> list[dict]:
    if not (out / "metrics.csv").is_file():
        evaluate_site(manifest, out, models=models, filters=filters, overwrite=True,
                      count_levels=count_levels, device=device)
    return read_rows(out / "metrics.csv")


def _sample_variant(source: Path, target: Path, samples: int) -> Path:
    if not target.is_file():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint_variant.py"),
                        str(source), str(target), f"diffusion.sampler.samples={samples}"],
                       check=True, stdout=subprocess.DEVNULL)
    return target


def _claim(rows: list[dict], name: str, method: str, reference: str, metric: str, *,
           higher_is_better: bool) -> tuple[str, bool, PairedDifference]:
    return name, higher_is_better, paired_difference(rows, method, reference, metric,
                                                     higher_is_better=higher_is_better)


def _corrected(claims: list[tuple[str, bool, PairedDifference]]) -> list[dict]:
    """The claims as one family: Holm-corrected verdicts, as the report's headline."""
    differences = holm([d for _, _, d in claims],
                       higher_is_better={d.metric: better for _, better, d in claims})
    return [{"claim": name, "method": d.method, "reference": d.reference, "metric": d.metric,
             "mean": d.mean, "low": d.low, "high": d.high, "p_holm": d.p_adjusted,
             "verdict": d.verdict, "subjects": d.subjects, "seeds": d.seeds}
            for (name, _, _), d in zip(claims, differences, strict=True)]


def _seeded(rows: list[dict], seed: int, learned: set[str]) -> list[dict]:
    return [{**r, "seed": seed} for r in rows if r["method"] in learned] + (
        [r for r in rows if r["method"] not in learned] if seed == 0 else [])


LEARNED = {*CHECKPOINTS, "fedndif_mean", "fedndif_personalized", "local", "pooled"}


def _extras(root: Path, seed: int, cfg, samples: int) -> tuple[list[dict], list[dict]]:
    """Seed ``seed``'s rows at the held-out scanner and of the sample comparison (evaluated
    once; later calls read them back)."""
    run = root / f"s{seed}"
    final = _final_checkpoints(run, cfg)
    held_out = root / "held_out_scanner"
    scanner = {name: final[name] for name in ("fedndif_global", "fedavg_no_nstd")}
    scanner_rows = _seeded(_evaluate(held_out / "site_d" / MANIFEST_NAME,
                                     held_out / f"eval_s{seed}", scanner, filters=False,
                                     count_levels=None, device=cfg.compare.device), seed,
                           LEARNED)
    (root / "samples").mkdir(exist_ok=True)
    mean = _sample_variant(final["fedndif_global"], root / "samples" / f"mean_s{seed}.pt",
                           samples)
    sample_rows = []
    for site in cfg.sites:
        models = {"fedndif_global": final["fedndif_global"], "fedndif_mean": mean,
                  "fedavg_unet": final["fedavg_unet"]}
        sample_rows += _seeded(_evaluate(
            run / "sites" / site / MANIFEST_NAME, root / "samples" / f"{site}_s{seed}",
            models, filters=False, count_levels=list(cfg.compare.count_levels),
            device=cfg.compare.device), seed, LEARNED)
    (root / f"extras_s{seed}.done").touch()
    return scanner_rows, sample_rows


def write_claims(root: Path, cfg, *, seeds: int, samples: int) -> str:
    """claims.json and claims.md from every seed's extra evaluations; the markdown table."""
    claims, scanner_rows, sample_rows, seed_rows = [], [], [], []
    for seed in range(seeds):
        scanner_part, sample_part = _extras(root, seed, cfg, samples)
        scanner_rows += scanner_part
        sample_rows += sample_part
        seed_rows += _seeded(read_rows(root / f"s{seed}" / "metrics.csv"), seed, LEARNED)
    for held in cfg.data.held_out_levels:
        for level in held.levels:
            at = [r for r in seed_rows if r["site"] == held.site and r["count_level"] == level]
            claims.append(_claim(at, f"(a) NSTD embedding at a held-out count level "
                                     f"({held.site}, {100 * level:g} %)", "fedndif_global",
                                 "fedavg_no_nstd", "psnr", higher_is_better=True))
    for level in sorted({r["count_level"] for r in scanner_rows}):
        at = [r for r in scanner_rows if r["count_level"] == level]
        claims.append(_claim(at, f"(a) NSTD embedding at a held-out scanner (site_d, "
                                 f"{100 * level:g} %)", "fedndif_global", "fedavg_no_nstd",
                             "psnr", higher_is_better=True))
    trained = [r for r in seed_rows if r["count_level"] in set(cfg.compare.count_levels)]
    for method, reference, what in (
            ("fedndif_global", "local", "Fed-NDIF global against local-only"),
            ("fedndif_personalized", "local", "Fed-NDIF personalized against local-only"),
            ("fedndif_global", "pooled", "Fed-NDIF global against pooled")):
        claims.append(_claim(trained, f"(b) {what}, all sites", method, reference, "psnr",
                             higher_is_better=True))
    for method, what in (("fedndif_global", "one sample"),
                         ("fedndif_mean", f"mean of {samples} samples")):
        for metric, better, on in (("psnr", True, "body PSNR"),
                                   ("abs_suvpeak_ideal_bias_pct_ge10", False, "lesions"),
                                   ("nps_power_liver", False, "liver noise power"),
                                   ("nps_frequency_liver", True, "liver noise grain")):
            claims.append(_claim(sample_rows, f"(c) Fed-NDIF global, {what}, against the FedAvg "
                                              f"U-Net: {on}", method, "fedavg_unet", metric,
                                 higher_is_better=better))
    claims.append(_claim(sample_rows, f"mean of {samples} samples against one sample",
                         "fedndif_mean", "fedndif_global", "psnr", higher_is_better=True))
    claims = _corrected(claims)
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
              for k, v in c.items()} for c in claims]
    (root / "claims.json").write_text(json.dumps(clean, indent=1))
    lines = ["| claim | metric | difference | 95 % CI | Holm p | verdict | subjects × seeds |",
             "|---|---|---|---|---|---|---|"]

    def shown(value, spec: str) -> str:  # no interval or p-value where there were too few
        return "–" if value is None else format(value, spec)

    lines += [f"| {c['claim']} | {c['metric']} | {shown(c['mean'], '+.2f')} | "
              f"[{shown(c['low'], '+.2f')}, {shown(c['high'], '+.2f')}] | "
              f"{shown(c['p_holm'], '.3f')} | {c['verdict']} | {c['subjects']} × {c['seeds']} |"
              for c in clean]
    (root / "claims.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2, help="seeds trained at once")
    parser.add_argument("--samples", type=int, default=4, help="K of the sample mean")
    parser.add_argument("--experiment", default="converge", help="configs/experiment/ entry")
    parser.add_argument("--extras-of", type=int, help=argparse.SUPPRESS)  # one seed's extras
    parser.add_argument("--claims-only", action="store_true",
                        help="only claims.json / claims.md, from seeds already evaluated")
    parser.add_argument("overrides", nargs="*", help="hydra overrides of every seed")
    args = parser.parse_intermixed_args()  # hydra overrides may follow the options
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = args.root.resolve()
    cfg = load_config("simulate", _seed_overrides(0, args.overrides, args.experiment))
    if args.extras_of is not None:
        _extras(root, args.extras_of, cfg, args.samples)
        return
    if args.claims_only:
        print(write_claims(root, cfg, seeds=args.seeds, samples=args.samples))
        return
    root.mkdir(parents=True, exist_ok=True)
    sites = root / "sites"
    if not sites.is_dir():
        write_sites(sites, cfg)
    held_out = root / "held_out_scanner"
    if not held_out.is_dir():
        write_sites(held_out, load_config("make_sites", [
            "sites=held_out_scanner", "split.val_fraction=0.16", "split.test_fraction=0.82"]))
    for seed in range(args.seeds):
        if not (root / f"s{seed}" / "sites").is_dir():
            shutil.copytree(sites, root / f"s{seed}" / "sites")
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        walls = list(pool.map(lambda s: _run_seed(root, s, args.overrides, args.samples,
                                                  args.experiment), range(args.seeds)))
    log.info("seeds trained and scored: %.0f s wall (%s s each)", time.monotonic() - start,
             ", ".join(f"{w:.0f}" for w in walls))
    runs = [root / f"s{seed}" for seed in range(args.seeds)]
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "seed_spread.py"), *map(str, runs),
                    "--out", str(root / "joined")], check=True)
    print(write_claims(root, cfg, seeds=args.seeds, samples=args.samples))


if __name__ == "__main__":
    main()

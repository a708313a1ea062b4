"""What privacy costs in image quality: plain FedAvg against secure aggregation (SecAgg+) and
server-side differential privacy, on the data-scarce sites (``experiment=scarce``).

Each mode runs the same Fed-NDIF federation (same seed, same sites) as a Flower simulation;
each final global model is scored on the test subjects of every site at one count level, and
paired against plain FedAvg per subject (95 % bootstrap intervals over subjects). For the DP
modes, epsilon at the given delta comes from Flower's own accountant
(``flwr.supercore.privacy_accounting.RdpAccountant``; needs ``dp-accounting``), with every site
in every round (no sampling amplification), as ``fed_ndif.server.federation`` runs it.

    python benchmarks/secure_quality.py OUT_DIR [--noise 0.1 1.0] [--clip 1.0]
        [--delta 1e-5] [--level 0.1] [hydra overrides of configs/simulate.yaml ...]

Resumable: a mode whose run folder holds its last round is not trained again.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from fed_ndif.checkpoints import read_checkpoint
from fed_ndif.config import load_config
from fed_ndif.data.sites import write_sites
from fed_ndif.evaluation.compare import (
    checkpoint_method,
    input_method,
    load_studies,
    score_methods,
)
from fed_ndif.evaluation.statistics import paired_difference
from fed_ndif.run_config import federated_config
from fed_ndif.runtime.simulation import run_flower_simulation
from fed_ndif.server.federation import rounds_recorded

METRICS = (("psnr", True, "PSNR dB", ".3f"), ("ssim", True, "SSIM", ".4f"),
           ("abs_suvmax_ideal_bias_pct_ge10", False, "abs SUVmax bias % (>= 10 mm)", ".2f"),
           ("abs_suvmax_ideal_bias_pct_lt10", False, "abs SUVmax bias % (< 10 mm)", ".2f"))


def epsilon(noise: float, rounds: int, sites: int, delta: float) -> float | None:
    try:
        from flwr.supercore.privacy_accounting import (
            GaussianPrivacyEvent,
            NeighboringRelation,
            PrivacyConfig,
            SamplingMethod,
        )
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        accountant = RdpAccountant(PrivacyConfig(
            target_delta=delta, population_size=sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
    except ImportError:
        return None
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=noise, sample_size=sites,
                                            population_size=sites), count=rounds)
    return accountant.get_epsilon(delta)


def change_norms(run_dir: Path, rounds: int) -> list[float]:
    """L2 norm of the global model's change in each round (what DP clips and noises)."""
    def weights(r: int) -> dict:
        ckpt = read_checkpoint(run_dir / "checkpoints" / f"global-round-{r:04d}.pt")
        return {k: v.numpy().astype(np.float64) for k, v in ckpt["model"].items()}
    out, before = [], weights(0)
    for r in range(1, rounds + 1):
        after = weights(r)
        out.append(float(math.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in after))))
        before = after
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--noise", type=float, nargs="*", default=[0.1, 1.0])
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--level", type=float, default=0.1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config("simulate", ["experiment=scarce", "logger.wandb_mode=disabled",
                                   "fl.evaluate_max_studies=0", *args.overrides])
    out = args.out.resolve()
    sites_dir = out / "sites"
    if not sites_dir.exists():
        write_sites(sites_dir, cfg)
    sites = list(cfg.sites.keys())
    rounds = int(cfg.fl.rounds)
    modes = {"plain": [], "secure": ["fl.secure_aggregation=true"]}
    for noise in args.noise:
        modes[f"dp{noise:g}"] = ["fl.dp.enabled=true", f"fl.dp.noise_multiplier={noise}",
                                 f"fl.dp.clipping_norm={args.clip}"]
    seconds = {}
    for mode, extra in modes.items():
        run_dir = out / mode
        if rounds_recorded(run_dir) >= rounds:
            continue
        fed = federated_config(OmegaConf.merge(cfg, OmegaConf.from_dotlist(extra)),
                               sites_dir=sites_dir, run_dir=run_dir)
        run_flower_simulation(fed, n_sites=len(sites), cpus_per_site=1, gpus_per_site=0,
                              work_dir=out / f"{mode}-work", name=mode)
    for mode in modes:
        records = [json.loads(line) for line in
                   (out / mode / "metrics.jsonl").read_text().splitlines()]
        seconds[mode] = sum(r["seconds"] for r in records) / len(records)
    rows = []
    for site in sites:
        studies = load_studies(sites_dir / site / "manifest.csv", "test",
                               count_levels=[args.level])
        methods = [input_method()] + [checkpoint_method(
            mode, mode, out / mode / "checkpoints" / f"global-round-{rounds:04d}.pt")
            for mode in modes]
        rows += score_methods(site, studies, methods)[0]
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    norms = change_norms(out / "plain", rounds)
    print(f"experiment=scarce, {len(sites)} sites, {rounds} rounds x {cfg.fl.local_steps} local "
          f"steps, test subjects at {args.level:g} count level; {os.cpu_count()} CPUs; plain "
          f"FedAvg's global change per round: L2 norm {', '.join(f'{n:.3g}' for n in norms)}")
    head = " | ".join(label for _, _, label, _ in METRICS)
    print(f"| mode | epsilon (delta={args.delta:g}) | s per round | {head} |")
    print("|---|---|---|" + "---|" * len(METRICS))
    for mode in modes:
        if mode == "plain":
            eps = "none (not private)"
        elif mode == "secure":
            eps = "none (hides updates, not the model)"
        else:
            noise = float(mode[2:])
            value = epsilon(noise, rounds, len(sites), args.delta)
            eps = "dp-accounting missing" if value is None else f"{value:.3g}"
            eps += f" (noise {noise:g}, clip {args.clip:g})"
        cells = []
        for metric, higher, _, fmt in METRICS:
            if mode == "plain":
                values = [r[metric] for r in rows if r["method"] == mode
                          and isinstance(r.get(metric), float) and math.isfinite(r[metric])]
                cells.append(f"{np.mean(values):{fmt}} (mean)" if values else "n/a")
                continue
            d = paired_difference(rows, mode, "plain", metric, higher_is_better=higher)
            cells.append(f"{d.mean:+{fmt}} [{d.low:+{fmt}}, {d.high:+{fmt}}] n={d.subjects}")
        print(f"| {mode} | {eps} | {seconds[mode]:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

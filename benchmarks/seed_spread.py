"""Paired method differences per training seed, and their spread over seeds.

Each run is one `fed-ndif simulate` output folder (its metrics.csv) trained with another seed on
the same sites and test subjects. Per run, site and count level: each comparison's difference
averaged over the test subjects; then the mean over runs and a 95 % t-interval over runs (the
randomness of training, with the test set fixed).

    python benchmarks/seed_spread.py runs/scarce2 runs/scarce_seed1 runs/scarce_seed2
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path

from fed_ndif.evaluation.compare import read_rows

T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}  # two-sided 95 %, n - 1 degrees of freedom
PAIRS = [("fedndif_global", "local"), ("fedndif_personalized", "fedndif_global"),
         ("pooled", "fedndif_global"), ("fedavg_no_nstd", "fedndif_global"),
         ("fedavg_unet", "fedndif_global")]
METRICS = {"psnr": "PSNR (dB)",
           "abs_suvpeak_ideal_bias_pct_ge10": "abs SUVpeak bias vs noise-free, >= 10 mm (pp)"}


def run_differences(run: str) -> dict[tuple, float]:
    rows = read_rows(Path(run) / "metrics.csv")
    table = {(r["site"], r["count_level"], r["subject"], r["method"]): r for r in rows}
    out = {}
    for site, level in sorted({(r["site"], r["count_level"]) for r in rows}):
        subjects = sorted({r["subject"] for r in rows
                           if (r["site"], r["count_level"]) == (site, level)})
        for a, b in PAIRS:
            for metric in METRICS:
                diffs = [table[(site, level, s, a)][metric] - table[(site, level, s, b)][metric]
                         for s in subjects
                         if (site, level, s, a) in table and (site, level, s, b) in table]
                diffs = [d for d in diffs if math.isfinite(d)]
                if diffs:
                    out[(site, level, a, b, metric)] = statistics.mean(diffs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="simulate output folders, one per seed")
    args = parser.parse_args()
    per_seed = defaultdict(list)
    for run in args.runs:
        for key, value in run_differences(run).items():
            per_seed[key].append(value)
    print("| site, level | comparison | metric | per seed | mean over seeds | 95 % t-interval |")
    print("|---|---|---|---|---|---|")
    for (site, level, a, b, metric), values in sorted(per_seed.items()):
        mean = statistics.mean(values)
        interval = "-"
        if 1 < len(values) <= max(T_975):
            half = T_975[len(values)] * statistics.stdev(values) / math.sqrt(len(values))
            interval = f"[{mean - half:+.2f}, {mean + half:+.2f}]"
        print(f"| {site}, {float(level):.0%} | {a} - {b} | {METRICS[metric]} | "
              f"{', '.join(f'{v:+.2f}' for v in values)} | {mean:+.2f} | {interval} |")


if __name__ == "__main__":
    main()

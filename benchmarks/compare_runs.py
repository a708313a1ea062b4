"""The same method in two `fed-ndif simulate` runs on the same sites and test subjects (e.g. the
shipped recipe against whole slices), paired by subject: per site and count level, the mean
difference (run A minus run B) with the report's 95 % interval over test subjects. A side may
be several runs, comma-separated, one per training seed (paired with the other side's run at
the same position): the interval then holds the seed-to-seed spread too.

    python benchmarks/compare_runs.py runs/scarce_i26 runs/scarce_slices \\
        [--methods fedndif_global,fedndif_personalized] [--metrics psnr,abs_suvmax_bias_pct_ge10]
    python benchmarks/compare_runs.py runs/p0,runs/p1,runs/p2 runs/w0,runs/w1,runs/w2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fed_ndif.evaluation.compare import read_rows
from fed_ndif.evaluation.paired import PAIRED_METRICS
from fed_ndif.evaluation.statistics import paired_difference

HIGHER_IS_BETTER = {key: higher for key, _, _, higher in PAIRED_METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--methods", default="fedndif_global,fedndif_personalized,local,"
                        "fedavg_unet,fedavg_no_nstd,pooled")
    parser.add_argument("--metrics", default="psnr,abs_suvmax_bias_pct_ge10,"
                        "abs_suvpeak_ideal_bias_pct_ge10")
    args = parser.parse_args()
    sides = {"A": args.run_a.split(","), "B": args.run_b.split(",")}
    if len(sides["A"]) != len(sides["B"]):
        parser.error("run_a and run_b need as many runs (seeds) each")
    seeded = len(sides["A"]) > 1
    runs = {tag: [{**row, "seed": seed} if seeded else row
                  for seed, run in enumerate(folders)
                  for row in read_rows(Path(run) / "metrics.csv")]
            for tag, folders in sides.items()}
    metrics = args.metrics.split(",")
    print(f"A = {args.run_a}, B = {args.run_b}; A minus B, 95 % CI over test subjects\n")
    print("| site | count level | method | " + " | ".join(f"Δ {m}" for m in metrics) + " |")
    print("|---" * (3 + len(metrics)) + "|")
    groups = sorted({(r["site"], r["count_level"]) for r in runs["A"]})
    for site, level in [*groups, ("all", None)]:
        for method in args.methods.split(","):
            rows = [{**r, "method": f"{method}@{tag}"} for tag, table in runs.items()
                    for r in table if r["method"] == method
                    and (site == "all" or (r["site"], r["count_level"]) == (site, level))
                    and (site != "all" or r["count_level"] == 0.1)]
            if not rows:
                continue
            cells = []
            for metric in metrics:
                d = paired_difference(rows, f"{method}@A", f"{method}@B", metric,
                                      higher_is_better=HIGHER_IS_BETTER.get(metric, True))
                cells.append(f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}] ({d.subjects}"
                             + (f" x {d.seeds})" if seeded else ")"))
            where = "all sites, 10 %" if site == "all" else f"{100 * level:g} %"
            print(f"| {site} | {where} | {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

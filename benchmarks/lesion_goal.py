"""The lesion goal of the shipped recipe, per site, for one `fed-ndif simulate` run: for lesions
>= 10 mm at one count level, each method's mean signed SUVmax bias vs full count, SUVpeak and
SUVmean bias vs the noise-free image, body PSNR minus the tuned Gaussian, and liver NSTD over
full count's, each with a 95 % t-interval over test subjects (a subject's lesions averaged
first: the subject is the unit that repeats).

    python benchmarks/lesion_goal.py runs/scarce_i26 [--level 0.1] [--methods ...]

Goal (BENCHMARKS.md): SUVmax within -8..+5 %, |SUVpeak| and |SUVmean| <= 5 %, PSNR >= Gaussian
+ 2 dB, liver NSTD within +-20 % of full count's. "met" needs the whole interval inside.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from scipy import stats

from fed_ndif.evaluation.compare import read_rows
from fed_ndif.evaluation.statistics import subject_means

GOALS = {  # metric: (header, low, high)
    "suvmax_bias_pct_ge10": ("SUVmax vs full %", -8.0, 5.0),
    "suvpeak_ideal_bias_pct_ge10": ("SUVpeak vs noise-free %", -5.0, 5.0),
    "suvmean_ideal_bias_pct_ge10": ("SUVmean vs noise-free %", -5.0, 5.0),
    "psnr_minus_gaussian": ("body PSNR − Gaussian dB", 2.0, math.inf),
    "nstd_ratio": ("liver NSTD / full count's", 0.8, 1.2),
}


def _interval(values: list[float]) -> tuple[float, float, float]:
    array = np.asarray(values, float)
    mean = float(array.mean())
    if len(array) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array)))
    return mean, mean - half, mean + half


def _seed_averaged(by_seed: dict) -> list[float]:
    """Each subject's value averaged over training seeds (the subject is the unit that repeats)."""
    per_subject: dict = {}
    for means in by_seed.values():
        for subject, value in means.items():
            per_subject.setdefault(subject, []).append(value)
    return [float(np.mean(v)) for v in per_subject.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--level", type=float, default=0.1)
    parser.add_argument("--methods", default="fedndif_global,fedndif_personalized,local,"
                        "fedavg_unet,fedavg_no_nstd,pooled,gaussian,input")
    args = parser.parse_args()
    rows = [r for r in read_rows(Path(args.run) / "metrics.csv")
            if math.isclose(r["count_level"], args.level)]
    gaussian = {(r["site"], r["subject"]): r["psnr"] for r in rows if r["method"] == "gaussian"}
    for r in rows:
        r["psnr_minus_gaussian"] = r["psnr"] - gaussian.get((r["site"], r["subject"]), math.nan)
        r["nstd_ratio"] = r["liver_nstd"] / r["full_count_liver_nstd"]
    print(f"{args.run}, {100 * args.level:g} % counts, lesions >= 10 mm; mean [95 % t-interval "
          "over test subjects] (subjects); * = interval inside the goal\n")
    print("| site | method | " + " | ".join(h for h, _, _ in GOALS.values()) + " |")
    print("|---" * (2 + len(GOALS)) + "|")
    for site in sorted({r["site"] for r in rows}):
        mine = [r for r in rows if r["site"] == site]
        for method in args.methods.split(","):
            cells = []
            for metric, (_, low, high) in GOALS.items():
                values = _seed_averaged(subject_means(mine, method, metric))
                if not values:
                    cells.append("–")
                    continue
                mean, lo, hi = _interval(values)
                met = "*" if lo >= low and hi <= high else ""
                cells.append(f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}] ({len(values)}){met}")
            print(f"| {site} | {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

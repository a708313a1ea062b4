"""One multi-seed result from separate one-seed `fed-ndif simulate` folders.

A run with ``compare.seeds: N`` trains its seeds one after another and has this in its own
report.md. Seeds trained apart (in parallel processes on a GPU machine, or before
``compare.seeds`` existed), each a folder of the same sites and test subjects with
``train.seed`` and ``compare.seed`` = base + k, give the same rows: this script joins them as
run_experiment does (learned methods once per seed, the others from the first folder).

    python benchmarks/seed_spread.py runs/s0 runs/s1 runs/s2            # the per-seed table
    python benchmarks/seed_spread.py runs/s0 runs/s1 runs/s2 --out runs/joined
        # runs/joined/report.md (headline with the seeds inside its intervals, every table),
        # metrics_seeds.csv and claims.json (the headline's claims as numbers)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from fed_ndif.data.dataset import held_out_levels
from fed_ndif.evaluation.compare import read_rows, write_rows
from fed_ndif.evaluation.detectability import DETECTION_CSV, read_detection
from fed_ndif.evaluation.headline import headline_claims, seed_table
from fed_ndif.evaluation.report import split_held_out, write_report
from fed_ndif.experiment import LEARNED, SEEDS_METRICS, Budget


def joined_rows(runs: list[Path]) -> list[dict]:
    rows = []
    for seed, run in enumerate(runs):
        for row in read_rows(run / "metrics.csv"):
            if row["method"] in LEARNED:
                rows.append({**row, "seed": seed})
            elif seed == 0:  # a method that does not train: once
                rows.append({**row, "seed": None})
    return rows


def joined_detection(runs: list[Path]) -> list[dict]:
    rows = []
    for seed, run in enumerate(runs):
        if (run / DETECTION_CSV).is_file():
            rows += [{**r, "seed": seed} for r in read_detection(run / DETECTION_CSV)
                     if r["method"] in LEARNED or seed == 0]
    return rows


def write_joined(runs: list[Path], out: Path) -> Path:
    """report.md, metrics_seeds.csv and claims.json in ``out`` from the seeds' folders."""
    rows = joined_rows(runs)
    cfg = OmegaConf.load(runs[0] / "config.yaml")
    (out / "figures").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(runs[0] / "config.yaml", out / "config.yaml")
    write_rows(out / SEEDS_METRICS, rows)
    order = [shown for name in cfg.compare.methods
             for shown in ((name, "noise_free") if name == "input" else (name,))]
    held_out = {site: held_out_levels(cfg.data, site) for site in cfg.sites}
    notes = [f"Training seeds: {len(runs)}, each trained in its own `fed-ndif simulate` folder "
             f"({', '.join(r.name for r in runs)}) and joined by benchmarks/seed_spread.py; "
             "every learned method once per seed, the others scored once."]
    budget = Budget.from_config(cfg).label()
    report = write_report(out, rows, order, curves={}, notes=notes, figures=[],
                          held_out=held_out, detection=joined_detection(runs),
                          budgets={m: budget for m in order if m in LEARNED})
    kept, held = split_held_out(rows, held_out)
    claims = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in c.items()} for c in headline_claims(kept, held)]
    (out / "claims.json").write_text(json.dumps(claims, indent=1))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="simulate folders, one per seed")
    parser.add_argument("--out", type=Path, help="write the joined report here")
    args = parser.parse_args()
    if args.out:
        print(f"report: {write_joined(args.runs, args.out)}")
    else:
        sys.stdout.write("\n".join(seed_table(joined_rows(args.runs))) + "\n")


if __name__ == "__main__":
    main()

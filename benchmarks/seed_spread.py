"""Paired method differences per training seed, for runs trained before ``compare.seeds``.

A run with ``compare.seeds: N`` has this table in its own report.md ("Training seeds"); this
script builds the same table (``fed_ndif.evaluation.headline.seed_table``) from separate
`fed-ndif simulate` folders, one per seed, trained on the same sites and test subjects.

    python benchmarks/seed_spread.py runs/scarce2 runs/scarce_seed1 runs/scarce_seed2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fed_ndif.evaluation.compare import read_rows
from fed_ndif.evaluation.headline import seed_table
from fed_ndif.experiment import LEARNED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="simulate output folders, one per seed")
    args = parser.parse_args()
    rows = []
    for seed, run in enumerate(args.runs):
        for row in read_rows(Path(run) / "metrics.csv"):
            if row["method"] in LEARNED:
                rows.append({**row, "seed": seed})
            elif seed == 0:  # a method that does not train: once
                rows.append({**row, "seed": None})
    sys.stdout.write("\n".join(seed_table(rows)) + "\n")


if __name__ == "__main__":
    main()

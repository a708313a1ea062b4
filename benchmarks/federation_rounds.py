"""Federation cost per round in a Flower simulation (issue 5): bytes each site sends and
receives, the model's fp32 size, and a round's wall time minus the slowest site's training.

Usage: python benchmarks/federation_rounds.py [hydra overrides of configs/simulate.yaml]
(default: experiment=tiny model=small fl.rounds=3 fl.local_steps=20, no validation).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile

from fed_ndif.checkpoints import build_state, get_weights
from fed_ndif.simulate import simulate


def main() -> None:
    overrides = sys.argv[1:] or ["experiment=tiny", "model=small", "fl.rounds=3",
                                 "fl.local_steps=20", "fl.evaluate_max_studies=0",
                                 "logger.wandb_mode=disabled"]
    with tempfile.TemporaryDirectory() as tmp:
        run = simulate([*overrides, f"out_dir={tmp}/run"])
        rounds = [json.loads(line) for line in
                  (run / "federated" / "metrics.jsonl").read_text().splitlines()]
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    fp32 = sum(a.nbytes for a in get_weights(build_state(cfg, device="cpu")).values())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; overrides: {' '.join(overrides)}")
    print(f"model fp32 size: {fp32 / 1e6:.2f} MB")
    print("| round | sites | bytes per site per direction | round wall s | slowest site "
          "training s | overhead s |")
    print("|---|---|---|---|---|---|")
    for r in rounds:
        slowest = max(m["train_seconds"] for m in r["per_site"].values())
        print(f"| {r['round']} | {len(r['sites'])} | {r['update_bytes']:,} | {r['seconds']:.1f} "
              f"| {slowest:.1f} | {r['seconds'] - slowest:.1f} |")


if __name__ == "__main__":
    main()

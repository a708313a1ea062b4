"""CPU training throughput: slice stacks per second (forward + backward + AdamW step + EMA).

Uses the trainer's own ``train_step`` (the exact code ``fed-ndif train-local`` runs) on random
batches of the right shape (2k+1 low-count slices, one full-count slice, an NSTD), so no data
loading is timed. One thread by default (the machine is shared).

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --sizes 64 128 --kinds diffusion unet
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from fed_ndif.checkpoints import build_state
from fed_ndif.config import load_config
from fed_ndif.training.trainer import train_step


def measure(kind: str, size: int, *, model: str, batch: int, warmup: int, steps: int,
            repeats: int, seed: int, overrides: list[str], device: str = "cpu") -> dict:
    cfg = load_config("train_local", [f"model={model}", f"model.kind={kind}",
                                      f"train.device={device}", f"train.batch_size={batch}",
                                      f"train.seed={seed}",
                                      # the network's throughput: no lesion insertion (data
                                      # augmentation, which needs real full-count stacks)
                                      "train.insert_lesions.probability=0", *overrides])
    bundle = build_state(cfg)
    k = bundle.k
    g = torch.Generator().manual_seed(seed)
    batch_data = {"low": torch.rand(batch, 2 * k + 1, size, size, generator=g) * 0.5,
                  "full": torch.rand(batch, 1, size, size, generator=g) * 0.5,
                  "nstd": torch.full((batch,), 0.3)}
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        train_step(bundle, batch_data)
    rates, cpu_rates = [], []
    for _ in range(repeats):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            train_step(bundle, batch_data)
        sync()
        rates.append(steps * batch / (time.perf_counter() - start))
        cpu_rates.append(steps * batch / (time.process_time() - cpu_start))
    return {"kind": kind, "size": size, "model": model,
            "params": sum(p.numel() for p in bundle.model.parameters()),
            "batch": batch, "steps_timed": steps * repeats,
            "stacks_per_s_median": float(np.median(rates)),
            "stacks_per_s_min": float(np.min(rates)), "stacks_per_s_max": float(np.max(rates)),
            "s_per_step": float(batch / np.median(rates)),
            # per CPU-second of this process: what one uncontended core would give (on a
            # shared machine the wall-clock rate mostly measures the other tenants)
            "stacks_per_cpu_s": float(np.median(cpu_rates)),
            "cpu_share": float(np.median(rates) / np.median(cpu_rates)), "device": device,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--kinds", nargs="+", default=["diffusion", "unet"])
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("overrides", nargs="*", help="train_local config overrides, key=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        for kind in args.kinds:
            row = measure(kind, size, model=args.model, batch=args.batch, warmup=args.warmup,
                          steps=args.steps, repeats=args.repeats, seed=args.seed,
                          overrides=args.overrides, device=args.device)
            row["threads"] = args.threads
            row["overrides"] = args.overrides
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nmachine: {platform.machine()} {platform.processor() or ''} "
          f"{os.cpu_count()} cores, torch {torch.__version__}, threads={args.threads}")
    print("| kind | size | params | batch | stacks/s wall (median [min-max]) | s/step wall "
          "| stacks per CPU-s | CPU share |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['size']}x{r['size']} | {r['params'] / 1e6:.2f} M | {r['batch']} "
              f"| {r['stacks_per_s_median']:.1f} [{r['stacks_per_s_min']:.1f}-"
              f"{r['stacks_per_s_max']:.1f}] | {r['s_per_step']:.2f} | "
              f"{r['stacks_per_cpu_s']:.1f} | {r['cpu_share']:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()

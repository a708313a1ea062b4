"""Compute floor of one network evaluation against what this machine achieves (issue 9).

- FLOPs per evaluation per slice: torch's FlopCounterMode over one forward pass (it counts
  convolutions, matmuls and attention; GroupNorm, SiLU and additions are not counted, so the
  floor is a little optimistic).
- Machine throughput: the best GFLOP/s measured on the network's dominant operation, a 3x3
  convolution at the model's widths and resolutions, and on a large matmul.
- Achieved: seconds per evaluation per slice of the real forward pass, under the variants the
  CPU allows (threads, inference mode, channels_last, batch size, torch.compile).

    python benchmarks/compute_floor.py --size 128 --batch 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from fed_ndif.checkpoints import build_state
from fed_ndif.config import load_config


def timed(fn: Callable[[], object], *, repeats: int, min_s: float = 1.0) -> float:
    """Median seconds per call (after a warm-up call); each sample runs >= min_s."""
    fn()
    samples = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_s:
                break
        samples.append(elapsed / calls)
    return sorted(samples)[len(samples) // 2]


def conv_gflops(channels: int, size: int, batch: int, repeats: int) -> float:
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    x = torch.randn(batch, channels, size, size)
    flops = 2 * batch * channels * channels * 9 * size * size
    with torch.inference_mode():
        return flops / timed(lambda: conv(x), repeats=repeats) / 1e9


def matmul_gflops(n: int, repeats: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / timed(lambda: a @ b, repeats=repeats) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="the default inference batch")
    parser.add_argument("--model", default="small")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--compile", action="store_true", help="also try torch.compile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()

    bundle = build_state(load_config("train_local", [f"model={args.model}",
                                                      "train.device=cpu"]), device="cpu")
    model = bundle.model.eval()
    channels = model.in_channels

    def inputs(batch: int, memory_format=torch.contiguous_format):
        x = torch.randn(batch, channels, args.size, args.size).to(memory_format=memory_format)
        return x, torch.full((batch,), 500), torch.full((batch,), 0.2)

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(*inputs(args.batch))
    flops_per_slice = counter.get_total_flops() / args.batch
    widths = sorted(set(bundle.cfg["model"]["diffusion_net"]["channels"]))
    rows: list[dict] = []
    report = {"machine": f"{platform.machine()} {platform.processor()} {os.cpu_count()} CPUs",
              "torch": torch.__version__, "model": args.model, "size": args.size,
              "gflop_per_slice_eval": flops_per_slice / 1e9, "throughput": {}, "rows": rows}
    for threads in args.threads:
        torch.set_num_threads(threads)
        best = {}
        for level, width in enumerate(widths):
            res = args.size // 2 ** level
            best[f"conv3x3 {width}ch {res}px"] = conv_gflops(width, res, args.batch,
                                                             args.repeats)
        best["matmul 1024"] = matmul_gflops(1024, args.repeats)
        report["throughput"][threads] = best
        peak = max(best.values())
        floor_s = flops_per_slice / (peak * 1e9)

        def run(name: str, batch: int, fn: Callable[[], object], *, peak=peak,
                floor_s=floor_s, threads=threads) -> None:
            per_slice = timed(fn, repeats=args.repeats) / batch
            rows.append({"threads": threads, "variant": name, "batch": batch,
                         "s_per_slice_eval": per_slice, "floor_s": floor_s,
                         "over_floor": per_slice / floor_s, "peak_gflops": peak})
            print(json.dumps(rows[-1]), flush=True)

        for batch in args.batches:
            x = inputs(batch)
            with torch.no_grad():
                run("no_grad", batch, lambda x=x: model(*x))
            with torch.inference_mode():
                run("inference_mode", batch, lambda x=x: model(*x))
        x = inputs(args.batch, torch.channels_last)
        model_cl = model.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            run("inference_mode + channels_last", args.batch,
                lambda m=model_cl, x=x: m(*x))
        model.to(memory_format=torch.contiguous_format)
        if args.compile:
            compiled = torch.compile(model)
            x = inputs(args.batch)
            with torch.inference_mode():
                run("inference_mode + torch.compile", args.batch,
                    lambda m=compiled, x=x: m(*x))
    print(f"\n{report['machine']}, torch {report['torch']}, model {args.model} at "
          f"{args.size}x{args.size}: {report['gflop_per_slice_eval']:.3f} GFLOP per slice per "
          "evaluation")
    for threads, best in report["throughput"].items():
        print(f"threads {threads}: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in best.items()))
    print("| threads | variant | batch | s per slice-evaluation | floor s | achieved / floor |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['variant']} | {r['batch']} | {r['s_per_slice_eval']:.4f} "
              f"| {r['floor_s']:.4f} | {r['over_floor']:.1f}x |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()

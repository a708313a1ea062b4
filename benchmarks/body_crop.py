"""Denoising only the body against the whole field of view: quality parity and time.

Scores each checkpoint twice on a site's test split, once with ``body_only`` (the default: the
network sees the body's bounding box, air keeps the input) and once on the whole field of view,
and writes the usual report with every method paired against its whole-field twin (95 % CIs
over test subjects), plus the seconds each variant spent denoising.

    python benchmarks/body_crop.py runs/scarce/sites/site_a/manifest.csv runs/i16/body \
        --model whole=runs/i16/whole/last.pt --model patch=runs/i16/patch/last.pt --level 0.1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fed_ndif.checkpoints import load_checkpoint, sampler_config
from fed_ndif.evaluation.compare import Method, TestStudy, load_studies, score_methods, write_rows
from fed_ndif.evaluation.report import write_report
from fed_ndif.models.denoise_volume import denoise_volume


def variants(name: str, checkpoint: Path, seconds: dict[str, float]) -> list[Method]:
    state = load_checkpoint(checkpoint, device="cpu")
    sampler = sampler_config(state.cfg) if state.process is not None else None

    def runner(method: str, body_only: bool):
        def run(study: TestStudy):
            start = time.perf_counter()
            mean, _ = denoise_volume(state.ema.model, study.low, nstd=study.nstd,
                                     normalization=state.normalization, k=state.k,
                                     process=state.process, sampler=sampler, device="cpu",
                                     window=state.window, progress=False, body_only=body_only)
            seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - start
            return mean
        return run

    return [Method(f"{name}_field", f"{name}, whole field", runner(f"{name}_field", False)),
            Method(f"{name}_body", f"{name}, body only", runner(f"{name}_body", True))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT")
    parser.add_argument("--level", type=float, action="append", help="count levels (default all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seconds: dict[str, float] = {}
    methods = []
    for item in args.model:
        name, _, path = item.partition("=")
        methods += variants(name, Path(path), seconds)
    studies = load_studies(args.manifest, "test", count_levels=args.level)
    rows, _ = score_methods(args.manifest.parent.name, studies, methods)
    (args.out_dir / "figures").mkdir(parents=True, exist_ok=True)
    write_rows(args.out_dir / "metrics.csv", rows)
    for name in [m.name for m in methods if m.name.endswith("_field")]:
        pair = [r for r in rows if r["method"] in (name, name.replace("_field", "_body"))]
        folder = args.out_dir / name.removesuffix("_field")
        (folder / "figures").mkdir(parents=True, exist_ok=True)
        write_report(folder, pair, [name, name.replace("_field", "_body")], curves={},
                     figures=[], notes=[f"{len(studies)} test studies"], reference=name)
    (args.out_dir / "seconds.json").write_text(json.dumps(seconds, indent=1))
    print(json.dumps(seconds, indent=1))


if __name__ == "__main__":
    main()

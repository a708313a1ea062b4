"""One checkpoint under several inference settings: quality against the first setting, and time.

Each variant is the checkpoint's own inference (its sampler, windows over the body, ONNX Runtime
on a CPU) with some settings changed; every variant is scored on a site's test split, paired
against the first one (95 % CIs over test subjects), and timed. The sampler's noise is fixed per
voxel (seed, slice), so variants that only change geometry or the engine draw the same noise.

    python benchmarks/inference_variants.py runs/scarce/sites/site_a/manifest.csv runs/i21/q \\
        runs/i16/patch_insert/last.pt --level 0.1 \\
        --variant today:engine=torch --variant onnx: --variant w128:window_limit=128 \\
        --variant steps3:steps=3 --variant field:body_only=0

Settings: engine (torch | onnxruntime | openvino-f32 | openvino-bf16), window_limit (pixels),
steps, body_only (0 | 1). OpenVINO is not a dependency of the project (measured here, not
shipped): ``pip install openvino`` to run those variants.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from fed_ndif.checkpoints import load_checkpoint, sampler_config
from fed_ndif.evaluation.compare import Method, TestStudy, load_studies, score_methods, write_rows
from fed_ndif.evaluation.report import write_report
from fed_ndif.models.denoise_volume import denoise_volume
from fed_ndif.models.engines import inference_network, onnx_export

SETTINGS = {"engine": str, "window_limit": int, "steps": int, "body_only": lambda v: v == "1"}


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in SETTINGS:
            raise SystemExit(f"{text}: unknown setting {key!r} (known: {', '.join(SETTINGS)})")
        settings[key] = SETTINGS[key](value)
    return name, settings


class OpenVinoCore(nn.Module):
    """The exported core under OpenVINO at the given inference precision."""

    def __init__(self, model: nn.Module, *, precision: str, threads: int) -> None:
        import openvino

        super().__init__()
        core = openvino.Core()
        self.compiled = core.compile_model(core.read_model(onnx_export(model)), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision,
            "NUM_STREAMS": 1})
        self.embedded = len(self.compiled.inputs) == 3  # x, timesteps, nstd

    def forward(self, x, timesteps=None, class_labels=None):
        inputs = [x.float(), timesteps, class_labels.float() if self.embedded else None]
        arrays = [v.contiguous().numpy() for v in inputs if v is not None]
        return torch.from_numpy(self.compiled(arrays)[0].copy())


def network_for(model: nn.Module, engine: str, threads: int) -> tuple[nn.Module, int]:
    """The network and the PyTorch thread count it runs with (the engine sets it, process-wide,
    so each variant sets it again before it runs)."""
    if not engine.startswith("openvino"):
        network = inference_network(model, engine=engine, threads=threads)
        return network, torch.get_num_threads()
    runner = copy.deepcopy(model).eval()
    runner.unet = OpenVinoCore(runner, precision=engine.split("-")[1], threads=threads)
    return runner, 1


def variant(name: str, settings: dict, checkpoint: Path, threads: int,
            seconds: dict[str, float]) -> Method:
    state = load_checkpoint(checkpoint, device="cpu")
    steps = {"steps": settings["steps"]} if "steps" in settings else {}
    sampler = sampler_config(state.cfg, **steps) if state.process is not None else None
    network, torch_threads = network_for(state.ema.model, settings.get("engine", "onnxruntime"),
                                         threads)

    def run(study: TestStudy):
        torch.set_num_threads(torch_threads)
        start = time.perf_counter()
        mean, _ = denoise_volume(network, study.low, nstd=study.nstd,
                                 normalization=state.normalization, k=state.k,
                                 process=state.process, sampler=sampler, device="cpu",
                                 window=state.window, window_limit=settings.get("window_limit"),
                                 body_only=settings.get("body_only", True), progress=False)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return mean

    label = ", ".join(f"{k}={v}" for k, v in settings.items()) or "checkpoint's settings"
    return Method(name, f"{name} ({label})", run)


def write_results(out_dir: Path, rows: list[dict], methods: list[Method],
                  seconds: dict[str, float], what: str) -> None:
    """metrics.csv, the report (every variant paired against the first) and seconds.json."""
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    write_rows(out_dir / "metrics.csv", rows)
    names = [m.name for m in methods]
    write_report(out_dir, rows, names, curves={}, figures=[],
                 notes=[f"{what}; seconds denoising: "
                        + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())],
                 reference=names[0])
    (out_dir / "seconds.json").write_text(json.dumps(seconds, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=V,...")
    parser.add_argument("--level", type=float, action="append", help="count levels (default all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seconds: dict[str, float] = {}
    methods = [variant(*parse_variant(text), args.checkpoint, args.threads, seconds)
               for text in args.variant]
    studies = load_studies(args.manifest, "test", count_levels=args.level)
    rows, _ = score_methods(args.manifest.parent.name, studies, methods)
    write_results(args.out_dir, rows, methods, seconds,
                  f"{len(studies)} test studies, {args.threads} thread(s)")
    print(json.dumps(seconds, indent=1))


if __name__ == "__main__":
    main()

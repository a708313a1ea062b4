"""Time and peak memory of ``fed-ndif denoise`` (the whole path: NIfTI in, automatic liver VOI,
sampling, NIfTI out) on synthetic volumes, one fresh subprocess per size.

    python benchmarks/denoise_volume.py --work runs/bench_denoise \\
        [--sizes 128x128x96,192x192x400] [--steps N] [--device cpu] [--nstd-only-sizes ...]

Sizes are ``XxYxZ`` (columns x rows x slices). ``--steps`` defaults to the checkpoint's sampler
setting (configs/diffusion/default.yaml: the command's default); sampling time is linear in
network evaluations x slices, so a run at fewer steps predicts the default (reported as an
estimate, marked so). ``--device cuda --precision bf16`` also records peak GPU memory.
Peak memory is the child's VmHWM (peak resident set), read from /proc/self/status;
``cpu_seconds`` is the child's CPU time over the whole path (all its threads).
``--nstd-only-sizes`` measures the part of the path that does not run the model (NIfTI read and
the automatic liver VOI) on large volumes cheaply.

The checkpoint is a ``model=small`` diffusion model trained for a few steps on tiny synthetic
sites: enough for timing (weights do not change the cost), not for quality.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _vm(key: str) -> float:
    """A /proc/self/status memory line in MiB (VmHWM: peak RSS, VmRSS: current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _parse_size(text: str) -> tuple[int, int, int]:
    x, y, z = (int(v) for v in text.lower().split("x"))
    return x, y, z


def make_checkpoint(work: Path, patch_size: int | None = None) -> Path:
    """``patch_size``: None, the shipped default (configs/data); 0, whole slices."""
    from fed_ndif.config import load_config
    from fed_ndif.data.sites import make_sites
    from fed_ndif.training.trainer import train_local

    if patch_size is None:
        patch_size = int(load_config("train_local").data.patch_size or 0)
    ckpt = work / (f"train_patch{patch_size}" if patch_size else "train") / "last.pt"
    if ckpt.is_file():
        return ckpt
    # A patch-trained network needs slices at least a patch wide (tiny sites are 48 px).
    matrix = [f"sites.site_a.scanner.matrix={patch_size + 8}"] if patch_size else []
    manifests = make_sites(work / "sites", overrides=[
        "sites=tiny", "sites.site_a.subjects=1", "sites.site_b.subjects=1",
        "sites.site_c.subjects=1", *matrix], overwrite=True)
    train_local(manifests[0], ckpt.parent, overrides=[
        "model=small", "train.steps=2", "train.batch_size=2", "train.val_every=0",
        "train.device=cpu", f"data.patch_size={patch_size or 'null'}"])
    return ckpt


def _sampler(ckpt: Path) -> dict:
    from fed_ndif.checkpoints import read_checkpoint

    return dict(read_checkpoint(ckpt)["config"]["diffusion"]["sampler"])


def _default_samples(ckpt: Path) -> int:
    return int(_sampler(ckpt)["samples"])


def _default_evals(ckpt: Path) -> int:
    """Network evaluations per slice of the checkpoint's (= the command's default) sampler."""
    sampler = _sampler(ckpt)
    return int(sampler["steps"]) * int(sampler["samples"])


def make_volume(size: tuple[int, int, int], path: Path) -> Path:
    """A noisy synthetic torso-to-head SUV volume (phantom activity + smoothed Gaussian noise)."""
    from scipy import ndimage

    from fed_ndif.data.nifti import save_nifti
    from fed_ndif.data.phantom import Grid, make_phantom
    from fed_ndif.data.volume import axial_affine

    if path.is_file():
        return path
    nx, ny, nz = size
    pixel = 410.0 / nx if nx <= 128 else 700.0 / nx  # 3.2 mm at 128, 3.65 mm at 192
    spacing = (3.0 if nz <= 128 else 2.0, pixel, pixel)
    rng = np.random.default_rng(0)
    phantom = make_phantom(Grid((nz, ny, nx), spacing), rng)
    activity = phantom.activity.astype(np.float32)
    noise = rng.standard_normal(activity.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, 0.8) * 2.0
    low = np.clip(activity + 0.25 * np.sqrt(activity) * noise, 0, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_nifti(low, path, affine=axial_affine(shape_zyx=(nz, ny, nx), spacing_zyx=spacing))
    return path


def child(args: argparse.Namespace) -> None:
    import torch

    from fed_ndif.data.nifti import load_nifti
    from fed_ndif.data.nstd import measure_liver_nstd
    from fed_ndif.inference import denoise_study

    if args.threads:
        torch.set_num_threads(args.threads)
    record: dict = {"rss_after_imports_mib": _vm("VmRSS")}
    cpu_start = time.process_time()
    start = time.perf_counter()
    if args.nstd_only:
        volume = load_nifti(args.input)
        nstd, how = measure_liver_nstd(volume)
        record.update(seconds=time.perf_counter() - start, nstd=nstd, nstd_source=how)
    else:
        out = Path(args.output)
        result = denoise_study(args.input, out, checkpoint=args.checkpoint, steps=args.steps,
                               device=args.device, precision=args.precision, overwrite=True,
                               batch_size=args.batch_size, progress=False,
                               engine=args.engine, threads=args.threads)
        record.update(seconds=result.seconds, sampling_seconds=result.sampling_seconds,
                      nstd=result.nstd, nstd_source=result.nstd_source, sampler=result.sampler,
                      precision=args.precision, batch_size=args.batch_size,
                      engine=result.engine)
        if torch.cuda.is_available() and args.device.startswith("cuda"):
            record["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
            record["gpu"] = torch.cuda.get_device_name()
    record["threads"] = torch.get_num_threads()
    # CPU seconds of the whole path (every thread): on a machine shared with other work, wall
    # time stretches, but CPU time / threads is what the command needs on cores of its own.
    record["cpu_seconds"] = time.process_time() - cpu_start
    record["peak_rss_mib"] = _vm("VmHWM")
    print(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench_denoise", help="scratch folder")
    parser.add_argument("--sizes", default="128x128x96,192x192x400")
    parser.add_argument("--nstd-only-sizes", default="", help="sizes for the model-free part")
    parser.add_argument("--steps", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch-size", type=int, help="default: the command's (4 on CPU)")
    parser.add_argument("--threads", type=int, help="default: the command's (every core)")
    parser.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto",
                        help="as for the command (default: auto)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--use-checkpoint", help="time this checkpoint (e.g. a patch-trained "
                        "one, which denoises in windows) instead of the made one")
    parser.add_argument("--patch-size", type=int, help="the made timing checkpoint's patch "
                        "size (inference in windows of this size over the body); 0: whole "
                        "slices; default: the shipped default (configs/data)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nstd-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = (Path(args.use_checkpoint) if args.use_checkpoint
            else make_checkpoint(work, args.patch_size))
    jobs = [(s, False) for s in args.sizes.split(",") if s]
    jobs += [(s, True) for s in args.nstd_only_sizes.split(",") if s]
    rows = []
    for text, nstd_only in jobs:
        size = _parse_size(text)
        volume = make_volume(size, work / "inputs" / f"{text}.nii.gz")
        command = [sys.executable, __file__, "--child", "--input", str(volume),
                   "--output", str(work / "outputs" / f"{text}.nii.gz"),
                   "--checkpoint", str(ckpt), "--device", args.device,
                   "--precision", args.precision,
                   *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
                   *(["--threads", str(args.threads)] if args.threads else []),
                   "--engine", args.engine]
        if args.steps is not None:
            command += ["--steps", str(args.steps)]
        if nstd_only:
            command.append("--nstd-only")
        (work / "outputs").mkdir(exist_ok=True)
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            print(run.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{text}: the child failed")
        record = json.loads(run.stdout.strip().splitlines()[-1])
        nx, ny, nz = size
        record.update(size=text, nstd_only=nstd_only,
                      volume_mib=nx * ny * nz * 4 / 2**20)
        if not nstd_only:
            default_evals = _default_evals(ckpt)
            evals = args.steps * _default_samples(ckpt) if args.steps else default_evals
            record["evals_per_slice"] = evals
            record["default_evals_per_slice"] = default_evals
            record["s_per_slice_eval"] = record["sampling_seconds"] / (nz * evals)
            # Sampling time is linear in network evaluations: scale to the default sampler.
            record["estimated_default_seconds"] = (
                record["seconds"] + (default_evals - evals) * record["sampling_seconds"] / evals)
        rows.append(record)
        print(json.dumps(record), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

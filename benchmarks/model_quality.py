"""Issue 4 "Measure": quality of a CPU-trained U-Net and diffusion model on one synthetic site.

Two sub-commands (run the two trainings concurrently, one thread each, if you like):

    # train one model for a wall-clock budget on the train split at one count level
    python benchmarks/model_quality.py train SITE/manifest.csv OUT/unet.pt --kind unet --minutes 8
    python benchmarks/model_quality.py train SITE/manifest.csv OUT/diff.pt --kind diffusion \
        --minutes 20
    # score the test split against full count: input, tuned Gaussian, U-Net, diffusion samplers
    python benchmarks/model_quality.py eval SITE/manifest.csv --unet OUT/unet.pt \
        --diffusion OUT/diff.pt --grid quality --json OUT/quality.json

Checkpoints are the library's own (``save_checkpoint``), so ``fed-ndif`` can load them too.
Metrics (whole test volumes, SUV, against full count): PSNR / SSIM
(fed_ndif.image_metrics.volume_metrics), lesion SUVmax bias over lesions of at least 10 mm
(fed_ndif.evaluation.lesions.lesion_summary: mean |bias| and signed mean),
liver NSTD (fed_ndif.data.nstd.liver_nstd with the subject's liver mask). The Gaussian FWHM is
tuned on the validation split by PSNR (fed_ndif.evaluation.filters.tune_filter).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from fed_ndif.checkpoints import build_state, load_checkpoint, sampler_config, save_checkpoint
from fed_ndif.config import load_config
from fed_ndif.data.dataset import SliceStackDataset
from fed_ndif.data.nifti import load_nifti
from fed_ndif.data.nstd import liver_nstd
from fed_ndif.data.volume import Volume
from fed_ndif.evaluation.filters import tune_filter
from fed_ndif.evaluation.lesions import lesion_summary
from fed_ndif.image_metrics import volume_metrics
from fed_ndif.models.denoise_volume import denoise_volume
from fed_ndif.models.sampling import SamplerConfig
from fed_ndif.training.trainer import make_train_batches, train_steps

log = logging.getLogger("model_quality")


# --------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> None:
    cfg = load_config("train_local", [f"model={args.model}", f"model.kind={args.kind}",
                                      "train.device=cpu", f"train.seed={args.seed}",
                                      f"data.count_levels=[{args.level}]", *args.overrides])
    bundle = build_state(cfg)
    data = SliceStackDataset(args.manifest, split="train", k=bundle.k,
                             normalization=bundle.normalization, count_levels=[args.level])
    batches = make_train_batches(bundle, data)
    history = []
    start, cpu_start = time.perf_counter(), time.process_time()

    def within_budget() -> bool:
        if args.cpu_minutes is not None:  # CPU time: other processes on the machine do not count
            return time.process_time() - cpu_start < args.cpu_minutes * 60
        return time.perf_counter() - start < args.minutes * 60

    while within_budget():
        m = train_steps(bundle, batches, args.chunk)
        history.append({"step": bundle.step, "loss": m["loss"],
                        "elapsed_s": time.perf_counter() - start})
        log.info("%s step %d loss %.4g (%.0f s)", args.kind, bundle.step, m["loss"],
                 history[-1]["elapsed_s"])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    save_checkpoint(bundle, args.out)
    summary = {"kind": args.kind, "model": args.model,
               "params": sum(p.numel() for p in bundle.model.parameters()),
               "train_slices": len(data), "steps": bundle.step, "wall_s": wall,
               "cpu_s": cpu,  # < wall on a shared machine: the CPU time this run really got
               "batch": int(bundle.cfg["train"]["batch_size"]),
               "epochs": bundle.step * int(bundle.cfg["train"]["batch_size"]) / len(data),
               "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
               "history": history}
    Path(args.out).with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


# ---------------------------------------------------------------------------------------- eval
def score(pred: np.ndarray, ref: np.ndarray, lesions: np.ndarray, liver: np.ndarray,
          spacing: tuple[float, float, float]) -> dict[str, float]:
    m = volume_metrics(pred, ref)
    s = lesion_summary(pred, ref, lesions, spacing)
    return {"psnr": m["psnr"], "ssim": m["ssim"],
            "abs_suvmax_bias_pct": s.get("abs_suvmax_bias_pct_ge10", float("nan")),
            "suvmax_bias_pct": s.get("suvmax_bias_pct_ge10", float("nan")),
            "lesions": s.get("lesions_ge10", 0.0),
            "liver_nstd": liver_nstd(pred, liver)}


# Cost sweep (CPU budget: warm starts stop at 10 steps; 4 samples only at 1 and 2 steps, i.e.
# 4 and 8 evaluations, the range the <= 10-evaluation goal is about).
STEPS_K1 = {"noise": (1, 2, 5, 10, 25, 50), "low": (1, 2, 5, 10), "unet": (1, 2, 5, 10)}
STEPS_K4 = (1, 2)


def sampler_grid(base: SamplerConfig, grid: str, t_start: int) -> dict[str, SamplerConfig]:
    """name -> sampler. 'quality': the default sampler only; 'cost': the cost sweep."""
    def make(**kw) -> SamplerConfig:
        return SamplerConfig(**{**base.__dict__, **kw})
    if grid == "quality":
        return {f"noise_s{base.steps}_k{base.samples}": base}
    out = {}
    starts = {"noise": {"warm_start": "none", "t_start": None},
              "low": {"warm_start": "low_count", "t_start": t_start},
              "unet": {"warm_start": "unet", "t_start": t_start}}
    for start_name, start_kw in starts.items():
        for steps in STEPS_K1[start_name]:
            out[f"{start_name}_s{steps}_k1"] = make(steps=steps, samples=1, **start_kw)
        for steps in STEPS_K4:
            out[f"{start_name}_s{steps}_k4"] = make(steps=steps, samples=4, **start_kw)
    # The field's references (issue 9): ancestral DDPM on 100 of the 1000 times, and a
    # DDPET-style sampler (25 DDIM steps warm-started from the U-Net, 2 seeds averaged).
    out["ddpm_s100_k1"] = make(name="ddpm", steps=100, samples=1, **starts["noise"])
    # A second-order ODE solver on the same times (fed_ndif.models.sampling._dpmpp_2m).
    for steps in (3, 5, 10):
        out[f"dpmnoise_s{steps}_k1"] = make(name="dpmpp_2m", steps=steps, samples=1,
                                            **starts["noise"])
    for steps in (3, 5):
        out[f"dpmlow_s{steps}_k1"] = make(name="dpmpp_2m", steps=steps, samples=1,
                                          **starts["low"])
    out["ddpet_s25_k2"] = make(steps=25, samples=2, **starts["unet"])
    return out


def cmd_eval(args: argparse.Namespace) -> None:
    unet = load_checkpoint(args.unet, device="cpu") if args.unet else None
    diff = load_checkpoint(args.diffusion, device="cpu") if args.diffusion else None
    ref_bundle = diff or unet
    norm, k = ref_bundle.normalization, ref_bundle.k
    if unet is not None and diff is not None and unet.k != diff.k:
        raise SystemExit("U-Net and diffusion k differ")
    test = SliceStackDataset(args.manifest, split="test", k=k, normalization=norm,
                             count_levels=[args.level])
    val = SliceStackDataset(args.manifest, split="val", k=k, normalization=norm,
                            count_levels=[args.level])

    def spacing(s) -> tuple[float, float, float]:
        return load_nifti(s.study.low_count).spacing

    gauss = tune_filter("gaussian", [(norm.inverse(s.low), norm.inverse(s.full), spacing(s))
                                     for s in val.studies])
    log.info("gaussian tuned on %d val volumes: FWHM %.1f mm (val PSNR %.2f)",
             len(val.studies), gauss.value, gauss.validation_psnr)
    samplers = {}
    if diff is not None:
        samplers = sampler_grid(sampler_config(diff.cfg), args.grid, args.t_start)
        if args.only:
            samplers = {n: s for n, s in samplers.items()
                        if any(n.startswith(p) for p in args.only)}
        if unet is None:
            samplers = {n: s for n, s in samplers.items() if s.warm_start != "unet"}
    rows: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    evals: dict[str, int] = {}
    for s in test.studies:
        ref, low = norm.inverse(s.full), norm.inverse(s.low)
        lesions = load_nifti(s.study.lesion_mask).array
        liver = load_nifti(s.study.liver_mask).array
        # Slab: networks see slices [lo, hi) (k context slices beyond the slab on each side, so
        # the slab's slices get exactly the 2.5D input they get in the whole volume); every
        # method is scored on slices [z0, z1) only.
        depth = low.shape[0]
        z0, z1 = args.slab if args.slab else (0, depth)
        lo, hi = max(0, z0 - k), min(depth, z1 + k)
        net_in = low[lo:hi]

        def crop(v: np.ndarray, *, from_net: bool = False, z0: int = z0, z1: int = z1,
                 lo: int = lo) -> np.ndarray:
            return v[z0 - lo:z1 - lo] if from_net else v[z0:z1]
        ref_c, lesions_c, liver_c = crop(ref), crop(lesions), crop(liver)
        preds: dict[str, np.ndarray] = {}
        if not args.skip_baselines:
            preds["full_count_ref"] = ref_c
            preds["input"] = crop(low)
            preds[f"gaussian_fwhm{gauss.value:g}mm"] = crop(gauss.apply(low, spacing(s)))
            if unet is not None:
                t0 = time.perf_counter()
                out, _ = denoise_volume(unet.ema.model, net_in, nstd=s.nstd,
                                        normalization=norm, k=k, device="cpu",
                                        batch_size=args.batch, progress=False)
                preds["unet"] = crop(out, from_net=True)
                seconds["unet"] = seconds.get("unet", 0.0) + time.perf_counter() - t0
        for name, sc in samplers.items():
            t0 = time.perf_counter()
            out, _ = denoise_volume(
                diff.ema.model, net_in, nstd=s.nstd, normalization=norm, k=k,
                process=diff.process, sampler=sc, warm_model=unet.ema.model if unet else None,
                device="cpu", batch_size=args.batch, seed=args.seed, progress=False)
            preds[f"diffusion_{name}"] = crop(out, from_net=True)
            dt = time.perf_counter() - t0
            seconds[f"diffusion_{name}"] = seconds.get(f"diffusion_{name}", 0.0) + dt
            evals[f"diffusion_{name}"] = sc.steps * sc.samples
            log.info("%s %s: %.1f s", s.study.subject, name, dt)
        for name, pred in preds.items():
            rows.setdefault(name, []).append(score(pred, ref_c, lesions_c, liver_c,
                                                   Volume(s.low, s.affine).spacing))
    results = {}
    for name, rs in rows.items():
        r = {key: float(np.nanmean([x[key] for x in rs])) for key in rs[0]}
        r["lesions"] = float(np.sum([x["lesions"] for x in rs]))
        if name in evals:
            r["evals_per_slice"] = evals[name]
        if name in seconds:
            r["s_per_volume"] = seconds[name] / len(rs)
        results[name] = r
    report = {"test_studies": [s.study.subject for s in test.studies],
              "val_studies": [s.study.subject for s in val.studies],
              "gaussian": gauss.__dict__, "lesions": "equivalent diameter >= 10 mm",
              "t_start": args.t_start, "seed": args.seed, "slab": args.slab,
              "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print("| method | evals/slice | PSNR dB | SSIM | mean abs SUVmax bias % | signed SUVmax bias % "
          "| liver NSTD | s/volume |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r.get('evals_per_slice', '')} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
              f"{r['abs_suvmax_bias_pct']:.1f} | {r['suvmax_bias_pct']:+.1f} | "
              f"{r['liver_nstd']:.3f} | {r.get('s_per_volume', float('nan')):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("manifest")
    t.add_argument("out", help="checkpoint path (.pt); a .json summary is written beside it")
    t.add_argument("--kind", choices=["diffusion", "unet"], required=True)
    budget = t.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-clock training budget")
    budget.add_argument("--cpu-minutes", type=float,
                        help="CPU-time budget of this process (fair on a shared machine)")
    t.add_argument("--model", default="small")
    t.add_argument("--level", type=float, default=0.1)
    t.add_argument("--chunk", type=int, default=25, help="steps between clock checks")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("overrides", nargs="*", help="train_local config overrides, key=value")
    e = sub.add_parser("eval")
    e.add_argument("manifest")
    e.add_argument("--unet")
    e.add_argument("--diffusion")
    e.add_argument("--level", type=float, default=0.1)
    e.add_argument("--grid", choices=["quality", "cost"], default="quality")
    e.add_argument("--only", nargs="*", help="sampler name prefixes to run (cost grid)")
    e.add_argument("--skip-baselines", action="store_true")
    e.add_argument("--t-start", type=int, default=300)
    e.add_argument("--slab", type=int, nargs=2, metavar=("Z0", "Z1"),
                   help="score only axial slices [Z0, Z1) (networks run on them + k context)")
    e.add_argument("--batch", type=int, default=64, help="slices per batch at inference")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json")
    for p in (t, e):
        p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    {"train": cmd_train, "eval": cmd_eval}[args.cmd](args)


if __name__ == "__main__":
    main()

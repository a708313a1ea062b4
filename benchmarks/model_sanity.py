"""Quick quality sanity check of one site: input vs Gaussian vs U-Net vs diffusion (CPU).

Trains a U-Net and a diffusion model for a fixed wall-clock budget each on the train split at
one count level, then scores the test split against full count (whole volumes, SUV):
PSNR / SSIM (data range = full-count volume max), lesion SUVmax bias, liver NSTD.

    python benchmarks/model_sanity.py SITE/manifest.csv --level 0.1 --minutes 4
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch
from scipy import ndimage

from fed_ndif.checkpoints import build_state, sampler_config
from fed_ndif.config import load_config
from fed_ndif.data.dataset import SliceStackDataset
from fed_ndif.data.nifti import load_nifti
from fed_ndif.data.nstd import liver_nstd
from fed_ndif.image_metrics import volume_metrics
from fed_ndif.models.denoise_volume import denoise_volume
from fed_ndif.training.trainer import make_train_batches, train_steps

log = logging.getLogger("sanity")


def train_for(bundle, dataset, seconds: float) -> dict:
    batches = make_train_batches(bundle, dataset)
    start, history = time.perf_counter(), []
    while time.perf_counter() - start < seconds:
        history.append(train_steps(bundle, batches, 25)["loss"])
    log.info("%s: %d steps in %.0f s, loss %.4g -> %.4g", bundle.kind, bundle.step,
             time.perf_counter() - start, history[0], history[-1])
    return {"steps": bundle.step, "first_loss": history[0], "last_loss": history[-1]}


def score(pred, ref, lesions, liver) -> dict:
    m = volume_metrics(pred, ref)
    biases = []
    for label in np.unique(lesions[lesions > 0]):
        mask = lesions == label
        biases.append((pred[mask].max() - ref[mask].max()) / ref[mask].max())
    m["lesion_suvmax_bias_pct"] = 100 * float(np.mean(biases)) if biases else float("nan")
    m["lesion_suvmax_absbias_pct"] = (100 * float(np.mean(np.abs(biases))) if biases
                                      else float("nan"))
    m["liver_nstd"] = liver_nstd(pred, liver)
    return m


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("--level", type=float, default=0.1)
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget per model")
    parser.add_argument("--model", default="small")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    cfg = load_config("train_local", [f"model={args.model}", "train.device=cpu",
                                      f"data.count_levels=[{args.level}]", *args.overrides])
    unet = build_state({**cfg, "model": {**cfg.model, "kind": "unet"}})
    diff = build_state(cfg)
    k = diff.k
    train = SliceStackDataset(args.manifest, split="train", k=k, normalization=diff.normalization,
                              count_levels=[args.level])
    test = SliceStackDataset(args.manifest, split="test", k=k, normalization=diff.normalization,
                             count_levels=[args.level])
    val = SliceStackDataset(args.manifest, split="val", k=k, normalization=diff.normalization,
                            count_levels=[args.level])
    report = {"train_slices": len(train), "train": {}}
    report["train"]["unet"] = train_for(unet, train, args.minutes * 60)
    report["train"]["diffusion"] = train_for(diff, train, args.minutes * 60)
    norm = diff.normalization

    # Gaussian sigma (voxels, 3D) tuned on validation PSNR.
    def gauss(v, s):
        return ndimage.gaussian_filter(v, s)
    sigmas = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
    val_psnr = [np.mean([volume_metrics(gauss(norm.inverse(s.low), sg), norm.inverse(s.full))
                         ["psnr"] for s in val.studies]) for sg in sigmas]
    sigma = sigmas[int(np.argmax(val_psnr))]

    base = sampler_config(diff.cfg)
    samplers = {
        "ddim1": base.__class__(**{**base.__dict__, "steps": 1}),
        "ddim10": base.__class__(**{**base.__dict__, "steps": 10}),
        "ddim10_k4": base.__class__(**{**base.__dict__, "steps": 10, "samples": 4}),
        "warm_unet_t300_s5": base.__class__(**{**base.__dict__, "steps": 5,
                                              "warm_start": "unet", "t_start": 300}),
        "warm_low_t300_s5": base.__class__(**{**base.__dict__, "steps": 5,
                                             "warm_start": "low_count", "t_start": 300}),
    }
    rows: dict[str, list[dict]] = {}
    for s in test.studies:
        ref = norm.inverse(s.full)
        low = norm.inverse(s.low)
        lesions = load_nifti(s.study.lesion_mask).array
        liver = load_nifti(s.study.liver_mask).array
        preds = {"full_count_ref": ref, "input": low, f"gaussian_s{sigma}": gauss(low, sigma)}
        preds["unet"], _ = denoise_volume(unet.ema.model, low, nstd=s.nstd, normalization=norm,
                                          k=k, device="cpu", progress=False)
        for name, sc in samplers.items():
            t0 = time.perf_counter()
            preds[f"diffusion_{name}"], _ = denoise_volume(
                diff.ema.model, low, nstd=s.nstd, normalization=norm, k=k, process=diff.process,
                sampler=sc, warm_model=unet.ema.model, device="cpu", progress=False)
            log.info("%s: %.1f s per volume", name, time.perf_counter() - t0)
        for name, pred in preds.items():
            rows.setdefault(name, []).append(score(pred, ref, lesions, liver))
    report["results"] = {name: {key: round(float(np.mean([r[key] for r in rs])), 4)
                                for key in rs[0]} for name, rs in rows.items()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

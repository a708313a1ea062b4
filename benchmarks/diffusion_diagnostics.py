"""Does a trained x0-predicting diffusion model use its noisy input x_t? (why sampling helps or not)

For each t, the test slab's full-count slices are noised to x_t = q_sample(full, t) (an oracle:
the chain at step t if it were on the true image) and the network's x0 prediction is scored
against full count. A model that uses x_t recovers nearly everything at small t (PSNR rises
steeply as t -> 0, lesion bias -> 0); one that ignores x_t gives the same posterior-mean image at
every t, and then no sampler (steps, warm start, K samples) can change its output much.

    python benchmarks/diffusion_diagnostics.py SITE/manifest.csv CKPT.pt --slab 24 41
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fed_ndif.checkpoints import load_checkpoint
from fed_ndif.data.dataset import SliceStackDataset, stack_indices
from fed_ndif.data.nifti import load_nifti
from fed_ndif.data.volume import Volume
from fed_ndif.evaluation.lesions import lesion_summary
from fed_ndif.image_metrics import volume_metrics
from fed_ndif.models.sampling import _model_x0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest")
    parser.add_argument("checkpoint")
    parser.add_argument("--level", type=float, default=0.1)
    parser.add_argument("--slab", type=int, nargs=2, default=[24, 41])
    parser.add_argument("--times", type=int, nargs="+", default=[0, 10, 50, 150, 300, 600, 999])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    b = load_checkpoint(args.checkpoint, device="cpu")
    norm, k, model = b.normalization, b.k, b.ema.model.eval()
    test = SliceStackDataset(args.manifest, split="test", k=k, normalization=norm,
                             count_levels=[args.level])
    z0, z1 = args.slab
    print("| t | PSNR dB | SSIM | mean abs SUVmax bias % | signed % | mean abs(x0 - low) (norm.) |")
    print("|---|---|---|---|---|---|")
    for t in args.times:
        rows = []
        for s in test.studies:
            zs = np.arange(z0, z1)
            idx = np.stack([stack_indices(z, k=k, depth=s.low.shape[0]) for z in zs])
            low = torch.from_numpy(s.low[idx])
            full = torch.from_numpy(s.full[zs][:, None])
            g = torch.Generator().manual_seed(args.seed)
            tt = torch.full((len(zs),), t, dtype=torch.long)
            x_t = b.process.q_sample(full, tt, torch.randn(full.shape, generator=g))
            with torch.no_grad():
                x0, _ = _model_x0(model, b.process, x_t, t, low,
                                  torch.full((len(zs),), s.nstd), norm.range)
            pred = norm.inverse(x0[:, 0].numpy())
            ref = norm.inverse(s.full[zs])
            lesions = load_nifti(s.study.lesion_mask).array[zs]
            m = volume_metrics(pred, ref)
            les = lesion_summary(pred, ref, lesions, Volume(s.low, s.affine).spacing)
            rows.append((m["psnr"], m["ssim"], les["abs_suvmax_bias_pct_ge10"],
                         les["suvmax_bias_pct_ge10"],
                         float((x0[:, 0] - low[:, k]).abs().mean())))
        r = np.mean(rows, axis=0)
        print(f"| {t} | {r[0]:.2f} | {r[1]:.4f} | {r[2]:.1f} | {r[3]:+.1f} | {r[4]:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()

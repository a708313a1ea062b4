"""Small model configs and helpers shared by the model / trainer tests."""

from __future__ import annotations

import copy

import torch

from fed_ndif.models.networks import ConditionalDiffusionUNet

TINY_MODEL = {
    "kind": "diffusion", "k": 1, "noise_embedding": True, "nstd_features": 8, "residual": False,
    "diffusion_net": {"channels": [8, 16, 16], "attention_levels": [False, False, True],
                      "num_res_blocks": 1, "num_head_channels": 8, "norm_num_groups": 4,
                      "use_flash_attention": False},
    "unet": {"channels": [8, 16, 16], "strides": [1, 2], "num_res_units": 1},
}

TINY_CFG = {
    "model": TINY_MODEL,
    "diffusion": {"num_train_timesteps": 1000, "schedule": "cosine", "prediction_type": "sample",
                  "loss": "l2",
                  "sampler": {"name": "ddim", "steps": 2, "spacing": "quadratic", "eta": 0.0,
                              "warm_start": "none", "t_start": None, "samples": 1,
                              "clip_x0": True}},
    "train": {"seed": 0, "steps": 4, "batch_size": 4, "lr": 1e-3, "weight_decay": 1e-4,
              "grad_clip": 1.0, "ema_decay": 0.99, "unet_loss": "l1", "augment_flip": True,
              "log_every": 2, "val_every": 0, "val_max_studies": 1, "checkpoint_every": 0,
              "workers": 0, "device": "cpu", "init_from": None},
    "data": {"count_levels": None,
             "normalization": {"clip_min": 0.0, "clip_max": 50.0, "scale": 1.0}},
}


def tiny_cfg(**model_changes) -> dict:
    cfg = copy.deepcopy(TINY_CFG)
    cfg["model"].update(model_changes)
    return cfg


def wake_output(model: ConditionalDiffusionUNet, seed: int = 0) -> None:
    """MONAI zero-initialises the diffusion U-Net's output conv and every residual block's second
    conv (the output is 0 at init, and the time/NSTD embedding has no
    effect yet); give those random weights so tests can see how the output depends on inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

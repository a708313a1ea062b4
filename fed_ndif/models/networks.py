"""Networks: the noise-embedded 2.5D conditional diffusion U-Net and the 2.5D U-Net baseline.

Channel layout shared by both (and by :mod:`fed_ndif.data.dataset`):

* diffusion model input: ``[noisy full-count slice, low-count slice -k, ..., centre, ..., +k]``
  (``2k + 2`` channels); the liver NSTD of the low-count study enters as an embedding.
* U-Net baseline input: the ``2k + 1`` low-count slices, plus one constant channel holding
  ``log(NSTD)`` when ``nstd_input`` is on.

Both networks are fully convolutional and pad any in-plane size up to the multiple their
down-sampling needs (then crop back), so one federated model serves every site's matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet, UNet
from torch import nn

from fed_ndif.errors import FedNdifError

# Clamp NSTD before the log: a perfect (noise-free) or absurd input must not give inf features.
NSTD_MIN, NSTD_MAX = 1e-3, 10.0


@dataclass
class DiffusionNetConfig:
    """Size of the diffusion U-Net (presets in configs/model/*.yaml)."""

    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, True])
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 16
    use_flash_attention: bool = False


@dataclass
class UNetConfig:
    """Size of the deterministic baseline (MONAI UNet, first stride 1 = full resolution)."""

    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    strides: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_units: int = 2


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad H and W up to ``multiple`` (replicate: no artificial edge in noisy inputs)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return F.pad(x, pad, mode="replicate"), (h, w)


def _crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = size
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top:top + h, left:left + w]


def log_nstd(nstd: torch.Tensor) -> torch.Tensor:
    """``log`` of NSTD, clamped; NSTD spans decades across count levels, so the log is linear."""
    return torch.log(nstd.float().clamp(NSTD_MIN, NSTD_MAX))


class NstdEmbedding(nn.Module):
    """Continuous noise-level embedding: sinusoidal features of log(NSTD) -> small MLP.

    Frequencies are geometric so that both coarse (1 % vs 50 % counts) and fine (scanner to
    scanner) differences in NSTD are resolved.
    """

    def __init__(self, *, out_dim: int, num_features: int = 16) -> None:
        super().__init__()
        if num_features % 2:
            raise ValueError("num_features must be even (sin and cos pairs)")
        half = num_features // 2
        self.register_buffer(
            "frequencies", torch.exp(torch.linspace(math.log(0.5), math.log(32.0), half)),
            persistent=False,
        )
        self.mlp = nn.Sequential(
            nn.Linear(num_features + 1, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, nstd: torch.Tensor) -> torch.Tensor:
        u = log_nstd(nstd.reshape(-1))[:, None]
        angles = u * self.frequencies[None, :]
        features = torch.cat([u, torch.sin(angles), torch.cos(angles)], dim=1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def install_scalar_embedding(unet: DiffusionModelUNet, embedding: nn.Module) -> None:
    """Put ``embedding`` where MONAI's ``DiffusionModelUNet`` adds its class embedding.

    The ONE place that relies on MONAI internals: ``DiffusionModelUNet.forward`` computes
    ``emb = time_embed(t) + class_embedding(class_labels)`` when ``num_class_embeds`` is set, so
    a module mapping a float tensor (N,) to (N, time_embed_dim) in ``class_embedding`` makes the
    class label a continuous scalar. Checked here so a MONAI change fails loudly, not silently.
    """
    if getattr(unet, "num_class_embeds", None) is None or not hasattr(unet, "class_embedding"):
        raise RuntimeError("this MONAI DiffusionModelUNet has no class_embedding slot; the NSTD "
                           "embedding cannot be installed (MONAI internals changed)")
    time_dim = unet.time_embed[-1].out_features
    probe = embedding(torch.ones(2))
    if probe.shape != (2, time_dim):
        raise RuntimeError(f"NSTD embedding gives {tuple(probe.shape)}, the time embedding "
                           f"needs (2, {time_dim})")
    unet.class_embedding = embedding


class ConditionalDiffusionUNet(nn.Module):
    """Noise-embedded 2.5D conditional diffusion U-Net.

    ``forward(x, timesteps, nstd)``: ``x`` is (N, 2k+2, H, W) = noisy slice + low-count stack.
    With ``noise_embedding=False`` the NSTD is ignored (the ablation), and the network holds
    no embedding parameters at all. ``residual`` (only for x0 / "sample" prediction) adds the
    centre low-count slice to the output, so the network predicts a correction to it.
    """

    def __init__(self, *, k: int, net: DiffusionNetConfig, noise_embedding: bool = True,
                 nstd_features: int = 16, residual: bool = False) -> None:
        super().__init__()
        self.k = k
        self.noise_embedding = noise_embedding
        self.residual = residual
        self.in_channels = 2 * k + 2
        self.multiple = 2 ** (len(net.channels) - 1)
        self.unet = DiffusionModelUNet(
            spatial_dims=2, in_channels=self.in_channels, out_channels=1,
            channels=tuple(net.channels), attention_levels=tuple(net.attention_levels),
            num_res_blocks=net.num_res_blocks, num_head_channels=net.num_head_channels,
            norm_num_groups=net.norm_num_groups, use_flash_attention=net.use_flash_attention,
            num_class_embeds=1 if noise_embedding else None,
        )
        if noise_embedding:
            install_scalar_embedding(self.unet, NstdEmbedding(
                out_dim=self.unet.time_embed[-1].out_features, num_features=nstd_features))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                nstd: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} channels (k={self.k}), got {x.shape[1]}")
        x_in = x
        x, size = _pad_to_multiple(x, self.multiple)
        labels = None
        if self.noise_embedding:
            if nstd is None:
                raise ValueError("this model is noise-embedded: pass the liver NSTD")
            labels = nstd.reshape(-1).to(x.device).expand(x.shape[0])
        out = _crop(self.unet(x, timesteps.reshape(-1).expand(x.shape[0]), class_labels=labels),
                    size)
        return out + x_in[:, 1 + self.k:2 + self.k] if self.residual else out


class UNet25D(nn.Module):
    """Deterministic 2.5D U-Net baseline: low-count stack (+ log NSTD channel) -> full count.

    ``residual``: predict a correction to the centre low-count slice, which a small network
    learns far faster than the image itself.
    """

    def __init__(self, *, k: int, net: UNetConfig, nstd_input: bool = True,
                 residual: bool = True) -> None:
        super().__init__()
        if net.strides[0] != 1:
            raise FedNdifError("model.unet.strides[0] must be 1 (a first stride of 2 halves the "
                               "output resolution)")
        self.k = k
        self.nstd_input = nstd_input
        self.residual = residual
        self.in_channels = 2 * k + 1 + int(nstd_input)
        self.multiple = int(math.prod(net.strides))
        # MONAI's UNet normalizes (instance norm) and activates its top up-sampling layer even
        # when that layer has one output channel, which squeezes a 1-channel output through a
        # per-slice unit-variance bottleneck. So the UNet returns channels[0] feature maps and a
        # 1x1 head maps them to the image. Residual: the head starts at zero, so the network
        # starts as the identity on the centre slice (as MONAI's diffusion U-Net does with its
        # zeroed output conv) and its gradient reaches every layer from the first step.
        self.unet = UNet(spatial_dims=2, in_channels=self.in_channels,
                         out_channels=net.channels[0], channels=tuple(net.channels),
                         strides=tuple(net.strides), num_res_units=net.num_res_units)
        self.head = nn.Conv2d(net.channels[0], 1, kernel_size=1)
        if residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, low: torch.Tensor, nstd: torch.Tensor | None = None) -> torch.Tensor:
        if low.shape[1] != 2 * self.k + 1:
            raise ValueError(f"expected {2 * self.k + 1} low-count slices (k={self.k}), "
                             f"got {low.shape[1]}")
        x = low
        if self.nstd_input:
            if nstd is None:
                raise ValueError("this U-Net takes the liver NSTD as input: pass it")
            u = log_nstd(nstd.reshape(-1).to(low.device)).expand(low.shape[0]).to(low.dtype)
            x = torch.cat([low, u[:, None, None, None].expand_as(low[:, :1])], dim=1)
        x, size = _pad_to_multiple(x, self.multiple)
        out = self.head(_crop(self.unet(x), size))
        return out + low[:, self.k:self.k + 1] if self.residual else out


def build_model(model_cfg, *, prediction_type: str = "sample") -> nn.Module:
    """The network a ``model`` config describes (``kind``: diffusion | unet)."""
    kind = model_cfg["kind"]
    k = int(model_cfg["k"])
    if k < 0:
        raise FedNdifError(f"model.k must be >= 0, got {k}")
    if kind == "diffusion":
        residual = bool(model_cfg.get("residual", False))
        if residual and prediction_type != "sample":
            raise FedNdifError("model.residual needs diffusion.prediction_type=sample (a "
                               "residual over the low-count slice is an x0 prediction)")
        net = DiffusionNetConfig(**dict(model_cfg["diffusion_net"]))
        return ConditionalDiffusionUNet(
            k=k, net=net, noise_embedding=bool(model_cfg["noise_embedding"]),
            nstd_features=int(model_cfg.get("nstd_features", 16)), residual=residual)
    if kind == "unet":
        net = UNetConfig(**dict(model_cfg["unet"]))
        return UNet25D(k=k, net=net, nstd_input=bool(model_cfg["noise_embedding"]),
                       residual=bool(model_cfg.get("residual", True)))
    raise FedNdifError(f"model.kind must be 'diffusion' or 'unet', got {kind!r}")

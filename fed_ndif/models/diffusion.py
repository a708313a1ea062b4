"""The diffusion process, separate from the network: noise schedule, training loss, EMA.

Prediction type defaults to ``sample`` (the network predicts x0, the clean full-count slice).
On CPU budgets x0 prediction learned where epsilon prediction did not (sampling from noise
diverged): with a strong conditioning signal the clean image is an easy target, while epsilon
targets force the network to resolve noise at low t. ``epsilon`` and ``v_prediction`` remain
available for GPU runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from fed_ndif.errors import FedNdifError

PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")
LOSSES = ("l2", "l1")


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    schedule: str = "cosine"
    prediction_type: str = "sample"
    loss: str = "l2"
    # The part of training draws whose step is one the sampler evaluates (the process's
    # ``focus_timesteps``, from the sampler's config); the rest are uniform over all steps.
    focus_fraction: float = 0.0
    # min-SNR-gamma loss weighting (Hang et al. 2023); None: every step weighs the same.
    min_snr_gamma: float | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise FedNdifError(f"diffusion.prediction_type must be one of {PREDICTION_TYPES}, "
                               f"got {self.prediction_type!r}")
        if self.loss not in LOSSES:
            raise FedNdifError(f"diffusion.loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.focus_fraction <= 1.0:
            raise FedNdifError("diffusion.focus_fraction must be in [0, 1], got "
                               f"{self.focus_fraction}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise FedNdifError("diffusion.min_snr_gamma must be positive or null, got "
                               f"{self.min_snr_gamma}")


class DiffusionProcess:
    """Forward noising and the conversions between the three parameterisations.

    The schedule comes from MONAI (``DDPMScheduler`` computes betas / alphas_cumprod for the
    named schedule); everything else is a few lines of closed-form algebra kept here so that
    training and every sampler agree on it.
    """

    def __init__(self, cfg: DiffusionConfig, *, focus_timesteps: tuple[int, ...] = ()) -> None:
        if cfg.focus_fraction > 0 and not focus_timesteps:
            raise FedNdifError("diffusion.focus_fraction > 0 needs the sampler's timesteps")
        if any(not 0 <= t < cfg.num_train_timesteps for t in focus_timesteps):
            raise FedNdifError(f"focus timesteps {focus_timesteps} outside "
                               f"[0, {cfg.num_train_timesteps})")
        self.cfg = cfg
        self.focus_timesteps = tuple(focus_timesteps)
        # prediction_type="sample": samplers hand this scheduler an x0 estimate whatever the
        # network predicts (conversion in to_x0_eps); clipping is done by the samplers.
        self.scheduler = DDPMScheduler(
            num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
            prediction_type="sample", clip_sample=False)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.double()

    @property
    def num_train_timesteps(self) -> int:
        return self.cfg.num_train_timesteps

    def _coef(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(like.device)[t.to(like.device).long()]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (a.sqrt().to(like.dtype).reshape(shape),
                (1 - a).sqrt().to(like.dtype).reshape(shape))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        sa, sb = self._coef(t, x0)
        return sa * x0 + sb * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.prediction_type == "sample":
            return x0
        if self.cfg.prediction_type == "epsilon":
            return noise
        sa, sb = self._coef(t, x0)
        return sa * noise - sb * x0

    def to_x0_eps(self, output: torch.Tensor, x_t: torch.Tensor,
                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted x0, predicted noise) from a network output at step ``t``."""
        sa, sb = self._coef(t, x_t)
        kind = self.cfg.prediction_type
        if kind == "sample":
            x0 = output
            eps = (x_t - sa * x0) / sb.clamp_min(1e-8)
        elif kind == "epsilon":
            eps = output
            x0 = (x_t - sb * eps) / sa.clamp_min(1e-8)
        else:
            x0 = sa * x_t - sb * output
            eps = sa * output + sb * x_t
        return x0, eps

    def loss(self, model: nn.Module, *, low: torch.Tensor, full: torch.Tensor, nstd: torch.Tensor,
             generator: torch.Generator, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss for one batch; ``generator`` (CPU) fixes t and noise, for exact resume.
        ``weight``: per-pixel weights of the loss (shaped like ``full``, mean about 1)."""
        n = full.shape[0]
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        noise = torch.randn(full.shape, generator=generator).to(full.device, full.dtype)
        t = self._focus(t, generator).to(full.device)
        x_t = self.q_sample(full, t, noise)
        output = model(torch.cat([x_t, low], dim=1), t, nstd)
        target = self.target(full, noise, t)
        step_weight = self._min_snr_weight(t, like=full)
        if step_weight is not None:
            weight = step_weight if weight is None else weight * step_weight
        return pixel_loss(output, target, kind=self.cfg.loss, weight=weight)

    def _min_snr_weight(self, t: torch.Tensor, *, like: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights that give every parameterisation the x0 loss weighted by
        min(SNR_t, gamma): steps near pure noise, where x0 can hardly be known, stop dominating
        the gradient. Written here because MONAI's schedulers have no loss weighting. The x0
        form is divided by gamma so that no weight exceeds 1 (the learning rate keeps its
        meaning); the epsilon and v forms are at most 1 already."""
        gamma = self.cfg.min_snr_gamma
        if gamma is None:
            return None
        a = self.alphas_cumprod.to(like.device)[t.long()]
        snr = a / (1 - a).clamp_min(1e-12)
        capped = snr.clamp_max(gamma)
        kind = self.cfg.prediction_type
        weight = (capped / gamma if kind == "sample" else capped / snr if kind == "epsilon"
                  else capped / (snr + 1))
        return weight.to(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))

    def _focus(self, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Moves ``focus_fraction`` of the draws onto the sampler's steps: a few-step sampler
        asks the network about three or so steps of the thousand, and a short training run
        spends most of its uniform draws elsewhere. Drawn after t and the noise, so that
        ``focus_fraction=0`` leaves every draw of a seed as it was."""
        if self.cfg.focus_fraction == 0:
            return t
        focus = torch.tensor(self.focus_timesteps, dtype=t.dtype)
        moved = torch.rand(t.shape, generator=generator) < self.cfg.focus_fraction
        pick = torch.randint(0, len(focus), t.shape, generator=generator)
        return torch.where(moved, focus[pick], t)


def pixel_loss(output: torch.Tensor, target: torch.Tensor, *, kind: str,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean L1 or L2 error, optionally weighted per pixel."""
    difference = output.float() - target.float()
    error = difference.abs() if kind == "l1" else difference ** 2
    return (error * weight).mean() if weight is not None else error.mean()


class EMA:
    """Exponential moving average of a model's parameters and buffers.

    The decay warms up as ``(1 + n) / (10 + n)`` so short CPU runs are not dominated by the
    random initial weights.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.999) -> None:
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_state = self.model.state_dict()
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if target.dtype.is_floating_point:
                target.lerp_(value.detach(), 1 - decay)
            else:
                target.copy_(value)

    def state_dict(self) -> dict:
        return {"weights": self.model.state_dict(), "num_updates": self.num_updates,
                "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])

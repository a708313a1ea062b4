"""Samplers: DDIM with N steps, DDPM, warm start, K-sample mean and per-voxel std.

Written by hand, on purpose, where MONAI's schedulers get it wrong (MONAI 1.6.1):

* ``DDIMScheduler.set_timesteps`` spaces steps with ``linspace(T-1, 0, N)`` but ``step`` jumps
  to ``t - T // N``: for few steps the two disagree (N=3: visits 999, 500, 0 but steps 999 -> 666),
  so the chain is evaluated at times it never reaches. Our DDIM steps from each scheduled time
  to exactly the next scheduled one, so the steps follow the schedule we set (linear or
  quadratic spacing; quadratic is denser near t=0, which few-step DDIM needs).
* ``DDPMScheduler.step`` always uses ``t - 1`` as the previous time, so with fewer inference
  steps than training steps it is not a valid sampler. We use it only for the full chain (every
  time from ``t_start`` to 0), and for a shorter DDPM we take the generalised DDIM step with
  eta=1, which is the DDPM posterior on the sub-sequence.

``dpmpp_2m`` is DPM-Solver++(2M) (Lu et al. 2022), the deterministic second-order multistep
solver of the same probability-flow ODE as DDIM, on the same times; also by hand, since MONAI
has no such scheduler. Its first step is a DDIM step.

Each step is exactly one network evaluation; ``len(ddim_timesteps(...)) == steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fed_ndif.errors import FedNdifError
from fed_ndif.models.diffusion import DiffusionProcess

SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")
WARM_STARTS = ("none", "low_count", "unet")
SPACINGS = ("linear", "quadratic")


@dataclass
class SamplerConfig:
    """How to sample (defaults: see configs/diffusion/default.yaml for the reasons)."""

    name: str = "dpmpp_2m"
    steps: int = 3
    spacing: str = "quadratic"
    eta: float = 0.0
    warm_start: str = "low_count"
    t_start: int | None = 150  # None: T-1 from noise; a warm start needs an intermediate t
    samples: int = 1
    clip_x0: bool = True

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise FedNdifError(f"sampler.name must be one of {SAMPLERS}, got {self.name!r}")
        if self.warm_start not in WARM_STARTS:
            raise FedNdifError(f"sampler.warm_start must be one of {WARM_STARTS}, "
                               f"got {self.warm_start!r}")
        if self.spacing not in SPACINGS:
            raise FedNdifError(f"sampler.spacing must be one of {SPACINGS}, got {self.spacing!r}")
        if self.steps < 1 or self.samples < 1:
            raise FedNdifError("sampler.steps and sampler.samples must be >= 1")


def ddim_timesteps(*, t_start: int, steps: int, spacing: str = "quadratic") -> list[int]:
    """``steps`` strictly decreasing times from ``t_start`` towards 0 (one network call each)."""
    if steps > t_start + 1:
        raise FedNdifError(f"sampler.steps={steps} is more than the {t_start + 1} times from "
                           f"t_start={t_start} down to 0")
    power = 2.0 if spacing == "quadratic" else 1.0
    # The last evaluation is at t_start / N (to the power), not at 0 where x_t is already clean.
    times = [t_start]
    for i in range(1, steps):
        ideal = round(t_start * ((steps - i) / steps) ** power)
        # strictly decreasing, and leaving room for the steps still to come
        times.append(min(max(ideal, steps - 1 - i), times[-1] - 1))
    return times


def sampler_timesteps(cfg: SamplerConfig, *, num_train_timesteps: int) -> list[int]:
    """The times at which a sampler of ``cfg`` evaluates the network (full DDPM: every one)."""
    t_start = _resolve_t_start(num_train_timesteps, cfg)
    if cfg.name == "ddpm" and cfg.steps >= t_start + 1:
        return list(range(t_start, -1, -1))
    return ddim_timesteps(t_start=t_start, steps=cfg.steps, spacing=cfg.spacing)


def _resolve_t_start(num_train_timesteps: int, cfg: SamplerConfig) -> int:
    last = num_train_timesteps - 1
    if cfg.warm_start == "none":
        if cfg.t_start not in (None, last):
            raise FedNdifError(f"sampler.t_start={cfg.t_start} needs a warm start (from pure noise "
                               f"the chain starts at {last}); set sampler.warm_start")
        return last
    if cfg.t_start is None:
        raise FedNdifError("a warm start needs sampler.t_start (an intermediate step, e.g. 300)")
    if not 0 <= cfg.t_start <= last:
        raise FedNdifError(f"sampler.t_start must be in [0, {last}], got {cfg.t_start}")
    return int(cfg.t_start)


def _model_x0(model: nn.Module, process: DiffusionProcess, x_t: torch.Tensor, t: int,
              low: torch.Tensor, nstd: torch.Tensor, x0_range: tuple[float, float] | None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    out = model(torch.cat([x_t, low.to(x_t.dtype)], dim=1), tt, nstd).float()
    x0, eps = process.to_x0_eps(out, x_t, tt)
    if x0_range is not None:
        x0 = x0.clamp(*x0_range)
        # Keep eps consistent with the clamped x0 (else the next x_t drifts off the manifold).
        sa, sb = process._coef(tt, x_t)
        eps = (x_t - sa * x0) / sb.clamp_min(1e-8)
    return x0, eps


def _alpha(process: DiffusionProcess, t: int) -> float:
    return 1.0 if t < 0 else float(process.alphas_cumprod[t])


# The next noise draw, shaped (N, 1, H, W) like the batch's slices.
NoiseDraw = Callable[[], torch.Tensor]


def generator_noise(shape: tuple[int, ...], generator: torch.Generator) -> NoiseDraw:
    """Draws from one generator, in the order they are asked for (the noise depends on which
    images share the batch)."""
    return lambda: torch.randn(shape, generator=generator)


class SliceNoise:
    """Noise that belongs to a voxel, not to a batch: the j-th draw of slice z is one fixed field
    over the whole slice, from a generator seeded by (seed, z, j), cut to the batch's box.

    So a volume's output does not depend on how its slices are batched or cropped: body-only
    inference and the whole field of view draw the same noise on the body, and any batch size
    gives the same result (a comparison of the two then measures the cropping, not the noise).
    """

    def __init__(self, *, seed: int, slices: np.ndarray, field: tuple[int, int],
                 box: tuple[slice, slice] = (slice(None), slice(None))) -> None:
        self.seed, self.slices, self.field, self.box = int(seed), slices, field, box
        self.draws = 0

    def __call__(self) -> torch.Tensor:
        fields = []
        for z in self.slices:
            state = np.random.SeedSequence([self.seed, int(z), self.draws]).generate_state(1)
            generator = torch.Generator().manual_seed(int(state[0]))
            fields.append(torch.randn(self.field, generator=generator)[self.box])
        self.draws += 1
        return torch.stack(fields)[:, None]


def _noise(draw: NoiseDraw, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the CPU, so results are identical on every device for a given seed.
    return draw().to(like.device, like.dtype)


@torch.no_grad()
def sample_once(model: nn.Module, process: DiffusionProcess, *, low: torch.Tensor,
                nstd: torch.Tensor, cfg: SamplerConfig, generator: torch.Generator,
                init: torch.Tensor | None = None,
                x0_range: tuple[float, float] | None = None,
                noise: NoiseDraw | None = None) -> torch.Tensor:
    """One sample (N, 1, H, W), normalized units. ``init``: the warm-start image (x0 estimate).
    ``noise``: where the draws come from (default: ``generator``, in order); the full DDPM
    chain always draws from ``generator`` (MONAI's step draws its own)."""
    times = sampler_timesteps(cfg, num_train_timesteps=process.num_train_timesteps)
    t_start = times[0]
    shape = (low.shape[0], 1, *low.shape[-2:])
    noise = noise or generator_noise(shape, generator)
    x0_range = x0_range if cfg.clip_x0 else None
    ref = low.float()
    if cfg.warm_start == "none":
        x = _noise(noise, ref)
    else:
        if init is None:
            raise FedNdifError(f"sampler.warm_start={cfg.warm_start} needs an initial image")
        tt = torch.full((shape[0],), t_start, dtype=torch.long)
        x = process.q_sample(init.float().to(ref.device), tt.to(ref.device),
                             _noise(noise, ref))

    if cfg.name == "ddpm" and len(times) == t_start + 1:
        # The full chain: MONAI's DDPM step is correct for it (previous time = t - 1).
        scheduler = process.scheduler
        x0 = x
        for t in times:
            x0, _ = _model_x0(model, process, x, t, low, nstd, x0_range)
            if t == 0:
                return x0
            # The scheduler was built with prediction_type="sample": it turns our (clamped) x0
            # into the DDPM posterior. Its noise comes from our generator on CPU; on a GPU MONAI
            # cannot take a CPU generator, so the global CUDA RNG (torch.manual_seed) is used.
            gen = generator if x.device.type == "cpu" else None
            x, _ = scheduler.step(x0, t, x, generator=gen)
        return x0

    if cfg.name == "dpmpp_2m":
        return _dpmpp_2m(model, process, x, times, low, nstd, x0_range)
    eta = 1.0 if cfg.name == "ddpm" else cfg.eta
    x0 = x
    for i, t in enumerate(times):
        t_prev = times[i + 1] if i + 1 < len(times) else -1
        x0, eps = _model_x0(model, process, x, t, low, nstd, x0_range)
        if t_prev < 0:
            return x0
        a_t, a_prev = _alpha(process, t), _alpha(process, t_prev)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev ** 0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * _noise(noise, ref)
    return x0


def _dpmpp_2m(model: nn.Module, process: DiffusionProcess, x: torch.Tensor, times: list[int],
              low: torch.Tensor, nstd: torch.Tensor,
              x0_range: tuple[float, float] | None) -> torch.Tensor:
    """DPM-Solver++(2M) in data (x0) prediction, variance-preserving form:
    x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) D, h = lambda_s - lambda_t,
    lambda = log(alpha / sigma); D is x0 (first step) or the 2nd-order extrapolation of the
    last two x0 predictions. Returns the x0 prediction at the last time, as DDIM does."""
    def parts(t: int) -> tuple[float, float, float]:
        a = _alpha(process, t)
        alpha, sigma = a ** 0.5, (1 - a) ** 0.5
        return alpha, sigma, math.log(alpha / sigma)

    previous: tuple[torch.Tensor, float] | None = None  # (x0, h) of the step before
    x0 = x
    for i, t in enumerate(times):
        x0, _ = _model_x0(model, process, x, t, low, nstd, x0_range)
        if i + 1 == len(times):
            break
        _, sigma_t, lambda_t = parts(t)
        alpha_s, sigma_s, lambda_s = parts(times[i + 1])
        h = lambda_s - lambda_t
        direction = x0
        if previous is not None:
            r = previous[1] / h
            direction = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous[0]
        x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * direction
        previous = (x0, h)
    return x0


@torch.no_grad()
def sample(model: nn.Module, process: DiffusionProcess, *, low: torch.Tensor, nstd: torch.Tensor,
           cfg: SamplerConfig, generator: torch.Generator, init: torch.Tensor | None = None,
           x0_range: tuple[float, float] | None = None,
           noise: NoiseDraw | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and per-voxel standard deviation (uncertainty) over ``cfg.samples`` samples.

    Samples are drawn one after another (Welford's running moments), so memory does not grow
    with K. The std is the sample std (ddof=1); zero when K=1.
    """
    mean = m2 = None
    for n in range(1, cfg.samples + 1):
        x = sample_once(model, process, low=low, nstd=nstd, cfg=cfg, generator=generator,
                        init=init, x0_range=x0_range, noise=noise).float()
        if mean is None:
            mean, m2 = x.clone(), torch.zeros_like(x)
            continue
        delta = x - mean
        mean += delta / n
        m2 += delta * (x - mean)
    std = (m2 / (cfg.samples - 1)).sqrt() if cfg.samples > 1 else torch.zeros_like(mean)
    return mean, std

"""Samplers: step counts, exactness with an oracle, warm start, K samples, whole volumes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from fed_ndif.data.normalization import Normalization
from fed_ndif.errors import FedNdifError
from fed_ndif.models.denoise_volume import denoise_volume
from fed_ndif.models.diffusion import DiffusionConfig, DiffusionProcess
from fed_ndif.models.networks import build_model
from fed_ndif.models.sampling import (
    SamplerConfig,
    SliceNoise,
    ddim_timesteps,
    sample,
    sample_once,
)
from tests.helpers.models import TINY_MODEL

# The sampler from pure noise (the default starts from the low-count input).
FROM_NOISE = {"warm_start": "none", "t_start": None}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class Oracle(nn.Module):
    """Knows the clean image: returns x0 (or the matching eps / v) and counts its calls."""

    def __init__(self, x0: torch.Tensor, process: DiffusionProcess) -> None:
        super().__init__()
        self.x0, self.process, self.calls, self.times = x0, process, 0, []

    def forward(self, x, t, nstd):
        self.calls += 1
        self.times.append(int(t[0]))
        x_t = x[:, :1]
        sa, sb = self.process._coef(t, x_t)
        eps = (x_t - sa * self.x0) / sb
        return self.process.target(self.x0, eps, t)


class Shrink(nn.Module):
    """A stand-in network whose x0 depends on x_t, so samples differ with the noise."""

    def forward(self, x, t, nstd):
        return 0.5 * x[:, :1] + x[:, 1:2]


@pytest.mark.parametrize("spacing", ["linear", "quadratic"])
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 25, 50])
def test_ddim_timesteps_follow_the_requested_count(spacing, steps):
    for t_start in (999, 300, 49):
        times = ddim_timesteps(t_start=t_start, steps=steps, spacing=spacing)
        assert len(times) == steps
        assert times[0] == t_start and times[-1] >= 0
        assert all(a > b for a, b in itertools.pairwise(times))


def test_quadratic_spacing_is_denser_near_zero():
    times = ddim_timesteps(t_start=999, steps=10, spacing="quadratic")
    assert times[-1] < 20 and times[1] > 800


def test_too_many_steps_is_an_error():
    with pytest.raises(FedNdifError, match="steps"):
        ddim_timesteps(t_start=3, steps=5)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("kind", ["sample", "epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_ode_samplers_honour_step_count_and_are_exact_with_an_oracle(name, kind, steps):
    process = DiffusionProcess(DiffusionConfig(prediction_type=kind))
    x0 = torch.rand(2, 1, 8, 8)
    oracle = Oracle(x0, process)
    cfg = SamplerConfig(name=name, steps=steps, samples=2, **FROM_NOISE)
    mean, std = sample(oracle, process, low=torch.zeros(2, 3, 8, 8), nstd=torch.ones(2), cfg=cfg,
                       generator=torch.Generator().manual_seed(0))
    assert oracle.calls == steps * 2
    assert oracle.times[:steps] == ddim_timesteps(t_start=999, steps=steps)
    # epsilon -> x0 at t=999 divides by sqrt(alpha_bar) ~ 0.006: float32 rounding shows.
    tol = 1e-2 if kind == "epsilon" else 1e-3
    torch.testing.assert_close(mean, x0, atol=tol, rtol=0)
    assert std.abs().max() < tol


class GaussianDenoiser(nn.Module):
    """The exact x0 = E[x0 | x_t] for data x0 ~ N(mu, s^2) per pixel: its probability-flow
    ODE is known, so a solver's error can be measured."""

    def __init__(self, process: DiffusionProcess, mu: float = 0.4, s: float = 0.3) -> None:
        super().__init__()
        self.process, self.mu, self.s = process, mu, s

    def forward(self, x, t, nstd):
        a = self.process.alphas_cumprod[t].reshape(-1, 1, 1, 1).to(x.dtype)
        gain = a.sqrt() * self.s ** 2 / (a * self.s ** 2 + 1 - a)
        return self.mu + gain * (x[:, :1] - a.sqrt() * self.mu)


def test_second_order_solver_is_closer_to_the_exact_ode_than_ddim_at_few_steps():
    process = DiffusionProcess(DiffusionConfig(prediction_type="sample"))
    model = GaussianDenoiser(process)
    low = torch.zeros(64, 3, 4, 4)

    def run(name: str, steps: int) -> torch.Tensor:
        cfg = SamplerConfig(name=name, steps=steps, spacing="quadratic", clip_x0=False,
                            warm_start="low_count", t_start=600)
        return sample_once(model, process, low=low, nstd=torch.ones(64), cfg=cfg,
                           generator=torch.Generator().manual_seed(3),
                           init=torch.full((64, 1, 4, 4), 0.4))

    exact = run("ddim", 601)  # every time step: the ODE solved to float precision
    ddim_error = (run("ddim", 4) - exact).abs().mean()
    dpm_error = (run("dpmpp_2m", 4) - exact).abs().mean()
    assert dpm_error < 0.5 * ddim_error  # measured: 0.010 against 0.053
    # Its first step is a DDIM step: with 2 evaluations the two solvers agree.
    torch.testing.assert_close(run("dpmpp_2m", 2), run("ddim", 2))


def test_ddpm_full_chain_uses_monai_and_short_chain_honours_steps():
    process = DiffusionProcess(DiffusionConfig())
    x0 = torch.rand(1, 1, 8, 8)
    low = x0.repeat(1, 3, 1, 1)
    full = Oracle(x0, process)
    cfg = SamplerConfig(name="ddpm", steps=21, warm_start="low_count", t_start=20)
    out = sample_once(full, process, low=low, nstd=torch.ones(1), cfg=cfg,
                      generator=torch.Generator().manual_seed(0), init=x0)
    assert full.calls == 21 and full.times == list(range(20, -1, -1))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    short = Oracle(x0, process)
    cfg = SamplerConfig(name="ddpm", steps=4, warm_start="low_count", t_start=20)
    sample_once(short, process, low=low, nstd=torch.ones(1), cfg=cfg,
                generator=torch.Generator().manual_seed(0), init=x0)
    assert short.calls == 4


def test_warm_start_needs_t_start_and_image():
    process = DiffusionProcess(DiffusionConfig())
    low, nstd, g = torch.zeros(1, 3, 8, 8), torch.ones(1), torch.Generator()
    with pytest.raises(FedNdifError, match="t_start"):
        sample_once(Shrink(), process, low=low, nstd=nstd, generator=g,
                    cfg=SamplerConfig(warm_start="low_count", t_start=None),
                    init=low[:, :1])
    with pytest.raises(FedNdifError, match="initial image"):
        sample_once(Shrink(), process, low=low, nstd=nstd, generator=g,
                    cfg=SamplerConfig(warm_start="unet", t_start=300))
    with pytest.raises(FedNdifError, match="warm start"):
        sample_once(Shrink(), process, low=low, nstd=nstd, generator=g,
                    cfg=SamplerConfig(warm_start="none", t_start=300))


def test_seeds_give_identical_samples_and_k_samples_give_an_uncertainty():
    process = DiffusionProcess(DiffusionConfig())
    low = torch.rand(2, 3, 8, 8)
    cfg = SamplerConfig(steps=3, eta=1.0, samples=3, warm_start="low_count", t_start=300)
    run = [sample(Shrink(), process, low=low, nstd=torch.ones(2), cfg=cfg, init=low[:, 1:2],
                  generator=torch.Generator().manual_seed(s)) for s in (4, 4, 5)]
    torch.testing.assert_close(run[0][0], run[1][0], rtol=0, atol=0)
    torch.testing.assert_close(run[0][1], run[1][1], rtol=0, atol=0)
    assert (run[0][0] - run[2][0]).abs().max() > 0
    assert run[0][1].shape == (2, 1, 8, 8) and run[0][1].min() >= 0 and run[0][1].max() > 0


def test_x0_is_clamped_to_the_normalization_range():
    process = DiffusionProcess(DiffusionConfig())

    class Wild(nn.Module):
        def forward(self, x, t, nstd):
            return torch.full_like(x[:, :1], -3.0)

    out = sample_once(Wild(), process, low=torch.zeros(1, 3, 4, 4), nstd=torch.ones(1),
                      cfg=SamplerConfig(steps=2, **FROM_NOISE), generator=torch.Generator(),
                      x0_range=(0.0, 10.0))
    assert out.min() == 0.0


def _volume(depth: int = 7) -> np.ndarray:
    rng = np.random.default_rng(0)
    vol = rng.gamma(2.0, 1.0, size=(depth, 12, 16)).astype(np.float32)
    vol[2, 5, 5] = 80.0  # above the clip: comes back clipped at 50 SUV
    return vol


def test_whole_volume_identity_model_returns_the_input_in_suv():
    # A residual x0 model at init (MONAI's zero-initialised output) is the identity on the
    # centre slice: any sampler must then give back the low-count volume, in SUV, whatever the
    # batch size (stacking, edges and normalization inverted correctly).
    torch.manual_seed(0)
    model = build_model({**TINY_MODEL, "residual": True})
    process = DiffusionProcess(DiffusionConfig())
    norm = Normalization()
    vol = _volume()
    for batch_size in (3, 16):
        mean, std = denoise_volume(model, vol, nstd=0.2, normalization=norm, k=1,
                                   process=process,
                                   sampler=SamplerConfig(steps=2, samples=2, **FROM_NOISE),
                                   batch_size=batch_size, device="cpu", progress=False)
        np.testing.assert_allclose(mean, np.clip(vol, 0, 50), rtol=1e-5, atol=1e-5)
        assert std.shape == vol.shape and np.abs(std).max() < 1e-4


def test_whole_volume_unet_matches_slicewise_calls():
    torch.manual_seed(0)
    unet = build_model({**TINY_MODEL, "kind": "unet"}).eval()
    norm = Normalization()
    vol = _volume(5)
    out, std = denoise_volume(unet, vol, nstd=0.2, normalization=norm, k=1, batch_size=2,
                              device="cpu", progress=False)
    assert std is None
    low = torch.from_numpy(norm.forward(vol))
    idx = [0, 0, 1]  # slice 0 with the edge slice repeated
    with torch.no_grad():
        first = unet(low[idx][None], torch.tensor([0.2]))[0, 0].numpy() * norm.scale
    np.testing.assert_allclose(out[0], first, rtol=1e-4, atol=1e-4)


def test_cpu_denoising_leaves_the_callers_network_layout_and_ignores_batch_size():
    torch.manual_seed(0)
    unet = build_model({**TINY_MODEL, "kind": "unet"}).eval()
    vol = _volume(7)
    kwargs = {"nstd": 0.2, "normalization": Normalization(), "k": 1, "device": "cpu",
              "progress": False}
    default, _ = denoise_volume(unet, vol, **kwargs)  # CPU default: batches of 4, channels_last
    single, _ = denoise_volume(unet, vol, batch_size=1, **kwargs)
    np.testing.assert_allclose(default, single, rtol=1e-5, atol=1e-6)
    # channels_last is for the duration of the call only (the trainer's EMA model is passed in)
    assert all(p.is_contiguous() for p in unet.parameters())


def test_whole_volume_unet_warm_start_and_dtype_checks():
    torch.manual_seed(0)
    model = build_model(TINY_MODEL)
    process = DiffusionProcess(DiffusionConfig())
    cfg = SamplerConfig(steps=2, warm_start="unet", t_start=200)
    with pytest.raises(FedNdifError, match="warm_model"):
        denoise_volume(model, _volume(3), nstd=0.2, normalization=Normalization(), k=1,
                       process=process, sampler=cfg, device="cpu", progress=False)
    unet = build_model({**TINY_MODEL, "kind": "unet"})
    mean, _ = denoise_volume(model, _volume(3), nstd=0.2, normalization=Normalization(), k=1,
                             process=process, sampler=cfg, warm_model=unet, device="cpu",
                             dtype="bfloat16", progress=False)
    assert mean.shape == (3, 12, 16) and np.isfinite(mean).all()
    with pytest.raises(FedNdifError, match="dtype"):
        denoise_volume(unet, _volume(3), nstd=0.2, normalization=Normalization(), k=1,
                       device="cpu", dtype="int8", progress=False)


class NoisePassThrough(nn.Module):
    """Returns the noisy input as x0: the output is then the sampler's noise itself."""

    def forward(self, x, t, nstd):
        return x[:, :1]


def test_a_slices_noise_does_not_depend_on_its_batch_or_crop():
    process = DiffusionProcess(DiffusionConfig(prediction_type="sample"))
    vol = _volume(6)
    kwargs = {"nstd": 0.2, "normalization": Normalization(), "k": 1, "process": process,
              "sampler": SamplerConfig(name="ddim", steps=2, eta=1.0, samples=2,
                                       clip_x0=False, **FROM_NOISE),
              "device": "cpu", "progress": False, "body_only": False}
    runs = [denoise_volume(NoisePassThrough(), vol, batch_size=b, seed=s, **kwargs)[0]
            for b, s in ((1, 3), (4, 3), (4, 4))]
    assert np.abs(runs[0]).max() > 0.1  # it is noise, not zeros
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - runs[2]).max() > 0.1  # another seed, other noise
    # A crop of the slice gets the crop of the same field.
    zs = np.array([1, 4])
    full = SliceNoise(seed=3, slices=zs, field=(12, 16))
    box = (slice(2, 9), slice(5, 16))
    crop = SliceNoise(seed=3, slices=zs, field=(12, 16), box=box)
    for _ in range(2):  # and every later draw too
        torch.testing.assert_close(full()[..., 2:9, 5:16], crop(), rtol=0, atol=0)

"""Diffusion process: parameterisations, loss determinism, EMA, and that a tiny model learns."""

from __future__ import annotations

import pytest
import torch

from fed_ndif.checkpoints import diffusion_process, plain_config
from fed_ndif.config import load_config
from fed_ndif.errors import FedNdifError
from fed_ndif.models.diffusion import EMA, DiffusionConfig, DiffusionProcess
from fed_ndif.models.networks import DiffusionNetConfig, UNet25D, UNetConfig, build_model
from tests.helpers.models import TINY_MODEL


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("kind", ["sample", "epsilon", "v_prediction"])
def test_targets_invert_to_x0_and_noise(kind):
    process = DiffusionProcess(DiffusionConfig(prediction_type=kind))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([1, 400, 990])
    x_t = process.q_sample(x0, t, noise)
    x0_hat, eps_hat = process.to_x0_eps(process.target(x0, noise, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(eps_hat, noise, atol=2e-3, rtol=0)


def test_config_rejects_unknown_names():
    with pytest.raises(FedNdifError, match="prediction_type"):
        DiffusionConfig(prediction_type="x0")
    with pytest.raises(FedNdifError, match="loss"):
        DiffusionConfig(loss="huber")


def _batch(n: int = 4, k: int = 1, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    radius = 0.3 + 0.4 * torch.rand(n, generator=g)
    full = ((xx**2 + yy**2)[None] < radius[:, None, None] ** 2).float()[:, None] * 0.6
    low = full.repeat(1, 2 * k + 1, 1, 1) + 0.1 * torch.randn(n, 2 * k + 1, size, size,
                                                              generator=g)
    return {"low": low, "full": full, "nstd": torch.full((n,), 0.3)}


def test_loss_is_deterministic_for_a_seed():
    process = DiffusionProcess(DiffusionConfig())
    torch.manual_seed(0)
    model = build_model(TINY_MODEL)
    b = _batch()
    losses = [process.loss(model, low=b["low"], full=b["full"], nstd=b["nstd"],
                           generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert losses[0].item() == losses[1].item()


def test_ema_warms_up_and_follows_the_model():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # warm-up decay (1+1)/(10+1) = 2/11
    expected = ema.model.weight  # already updated
    assert torch.all(expected != 1.0)
    for _ in range(300):
        ema.update(model)
    torch.testing.assert_close(ema.model.weight, model.weight, atol=1e-2, rtol=0)
    state = ema.state_dict()
    other = EMA(torch.nn.Linear(2, 1))
    other.load_state_dict(state)
    assert other.num_updates == 301
    torch.testing.assert_close(other.model.weight, ema.model.weight)


OVERFIT_FACTOR = 5.0  # a tiny model must cut its loss on one fixed batch at least this much


def test_tiny_diffusion_model_overfits_a_tiny_set():
    torch.manual_seed(0)
    process = DiffusionProcess(DiffusionConfig(prediction_type="sample"))
    model = build_model(TINY_MODEL)  # residual off: it has to learn the image itself
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    b = _batch()
    losses = []
    for step in range(60):
        loss = process.loss(model, low=b["low"], full=b["full"], nstd=b["nstd"],
                            generator=torch.Generator().manual_seed(step % 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last * OVERFIT_FACTOR < first, (first, last)


def test_tiny_unet_overfits_a_tiny_set():
    torch.manual_seed(0)
    model = UNet25D(k=1, net=UNetConfig(**TINY_MODEL["unet"]), residual=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    b = _batch()
    losses = []
    for _ in range(100):
        loss = torch.nn.functional.l1_loss(model(b["low"], b["nstd"]), b["full"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] * OVERFIT_FACTOR < losses[0], (losses[0], losses[-1])


def test_diffusion_net_config_defaults_build_a_working_network():
    from fed_ndif.models.networks import ConditionalDiffusionUNet

    model = ConditionalDiffusionUNet(k=1, net=DiffusionNetConfig()).eval()
    x = torch.randn(2, 4, 20, 28)  # not a multiple of the network's stride: padded and cropped
    with torch.no_grad():
        out = model(x, torch.tensor([10, 500]), torch.tensor([0.1, 0.3]))
    assert out.shape == (2, 1, 20, 28) and torch.isfinite(out).all()


class _StepRecorder(torch.nn.Module):
    """Stands in for a network: records the steps the loss asks about, predicts zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    def forward(self, x, t, nstd):
        self.steps += t.tolist()
        return torch.zeros_like(x[:, :1])


def _drawn_steps(process: DiffusionProcess, draws: int = 50) -> list[int]:
    recorder = _StepRecorder()
    low, full, nstd = torch.zeros(8, 1, 4, 4), torch.zeros(8, 1, 4, 4), torch.ones(8)
    for seed in range(draws):
        process.loss(recorder, low=low, full=full, nstd=nstd,
                     generator=torch.Generator().manual_seed(seed))
    return recorder.steps


def test_focus_puts_its_fraction_of_training_steps_on_the_sampler_steps():
    cfg = plain_config(load_config("train_local", ["diffusion.focus_fraction=0.75"]))
    process = diffusion_process(cfg)
    assert process.focus_timesteps == (150, 67, 17)  # 3 quadratic steps from the warm start
    steps = _drawn_steps(process)
    on_focus = sum(t in process.focus_timesteps for t in steps) / len(steps)
    assert 0.65 < on_focus < 0.85
    # The uniform draws are the ones an unfocused process makes, so focus 0 changes no seed.
    uniform = _drawn_steps(DiffusionProcess(DiffusionConfig()))
    assert all(a == b for a, b in zip(steps, uniform, strict=True)
                        if a not in process.focus_timesteps)
    with pytest.raises(FedNdifError, match="focus_fraction"):
        DiffusionConfig(focus_fraction=1.5)
    with pytest.raises(FedNdifError, match="sampler's timesteps"):
        DiffusionProcess(DiffusionConfig(focus_fraction=0.5))


def test_min_snr_weights_every_parameterisation_as_the_capped_x0_error():
    """An x0 error d costs SNR x d² as an epsilon error and (SNR + 1) x d² as a v error; with
    the weights each form must cost min(SNR, gamma) x d² (the x0 form divided by gamma)."""
    t = torch.tensor([0, 5, 150, 400, 999])
    full = torch.zeros(5, 1, 2, 2)
    weights = {kind: DiffusionProcess(DiffusionConfig(prediction_type=kind, min_snr_gamma=5.0))
               ._min_snr_weight(t, like=full).flatten().double()
               for kind in ("sample", "epsilon", "v_prediction")}
    a = DiffusionProcess(DiffusionConfig()).alphas_cumprod[t]
    snr = a / (1 - a)
    capped = snr.clamp_max(5.0)
    torch.testing.assert_close(weights["sample"] * 5.0, capped, rtol=1e-5, atol=0)
    torch.testing.assert_close(weights["epsilon"] * snr, capped, rtol=1e-5, atol=0)
    torch.testing.assert_close(weights["v_prediction"] * (snr + 1), capped, rtol=1e-5, atol=0)
    assert weights["sample"][0] == pytest.approx(1.0) and weights["sample"][-1] < 1e-3
    # Off by default: the loss of a seed is the unweighted one.
    assert DiffusionProcess(DiffusionConfig())._min_snr_weight(t, like=full) is None
    low, nstd = torch.zeros(5, 1, 2, 2), torch.ones(5)
    plain, weighted = (DiffusionProcess(DiffusionConfig(min_snr_gamma=gamma)).loss(
        _StepRecorder(), low=low, full=full + 1, nstd=nstd,
        generator=torch.Generator().manual_seed(0)) for gamma in (None, 5.0))
    assert weighted < plain
    with pytest.raises(FedNdifError, match="min_snr_gamma"):
        DiffusionConfig(min_snr_gamma=0.0)

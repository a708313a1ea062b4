"""Networks: NSTD embedding, its ablation switch, shapes for several k and matrix sizes."""

from __future__ import annotations

import pytest
import torch

from fed_ndif.errors import FedNdifError
from fed_ndif.models.networks import (
    ConditionalDiffusionUNet,
    DiffusionNetConfig,
    NstdEmbedding,
    UNet25D,
    UNetConfig,
    build_model,
    install_scalar_embedding,
)
from tests.helpers.models import TINY_MODEL, wake_output

NET = DiffusionNetConfig(**TINY_MODEL["diffusion_net"])
UNET = UNetConfig(**TINY_MODEL["unet"])


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def _inputs(k: int, size: tuple[int, int] = (24, 24), n: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 2 * k + 2, *size, generator=g), torch.tensor([10, 700][:n]))


def test_nstd_embedding_changes_output_and_receives_gradients():
    model = ConditionalDiffusionUNet(k=1, net=NET, noise_embedding=True)
    wake_output(model)
    x, t = _inputs(1)
    low_noise = model(x, t, torch.tensor([0.05, 0.05]))
    high_noise = model(x, t, torch.tensor([0.5, 0.5]))
    assert (low_noise - high_noise).abs().max() > 1e-4
    high_noise.pow(2).mean().backward()
    mlp = model.unet.class_embedding.mlp
    assert isinstance(model.unet.class_embedding, NstdEmbedding)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())


def test_noise_embedding_switch_off_removes_it():
    model = ConditionalDiffusionUNet(k=1, net=NET, noise_embedding=False)
    wake_output(model)
    assert not any("class_embedding" in name for name, _ in model.named_parameters())
    x, t = _inputs(1)
    a = model(x, t, torch.tensor([0.05, 0.05]))
    torch.testing.assert_close(a, model(x, t, torch.tensor([0.9, 0.9])), rtol=0, atol=0)
    torch.testing.assert_close(a, model(x, t, None), rtol=0, atol=0)


def test_noise_embedded_model_needs_nstd():
    model = ConditionalDiffusionUNet(k=1, net=NET)
    with pytest.raises(ValueError, match="NSTD"):
        model(*_inputs(1), None)


def test_install_scalar_embedding_checks_the_monai_slot():
    from monai.networks.nets import DiffusionModelUNet

    plain = DiffusionModelUNet(spatial_dims=2, in_channels=2, out_channels=1, channels=(8, 8),
                               attention_levels=(False, False), num_res_blocks=1,
                               num_head_channels=8, norm_num_groups=4)
    with pytest.raises(RuntimeError, match="class_embedding"):
        install_scalar_embedding(plain, NstdEmbedding(out_dim=32))
    slotted = DiffusionModelUNet(spatial_dims=2, in_channels=2, out_channels=1, channels=(8, 8),
                                 attention_levels=(False, False), num_res_blocks=1,
                                 num_head_channels=8, norm_num_groups=4, num_class_embeds=1)
    with pytest.raises(RuntimeError, match="time embedding"):
        install_scalar_embedding(slotted, NstdEmbedding(out_dim=7))


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("size", [(24, 24), (22, 30), (17, 20)])
def test_shapes_for_several_k_and_sizes(k, size):
    x, t = _inputs(k, size)
    diffusion = ConditionalDiffusionUNet(k=k, net=NET)
    assert diffusion(x, t, torch.tensor([0.1, 0.2])).shape == (2, 1, *size)
    unet = UNet25D(k=k, net=UNET, nstd_input=True)
    assert unet(x[:, 1:], torch.tensor([0.1, 0.2])).shape == (2, 1, *size)


def test_wrong_channel_count_is_named():
    model = ConditionalDiffusionUNet(k=2, net=NET)
    with pytest.raises(ValueError, match="k=2"):
        model(*_inputs(1), torch.tensor([0.1, 0.1]))


def test_unet_nstd_input_and_residual():
    unet = UNet25D(k=1, net=UNET, nstd_input=True, residual=True)
    low = torch.rand(2, 3, 16, 16)
    # the residual U-Net starts as the identity on the centre slice
    torch.testing.assert_close(unet(low, torch.tensor([0.1, 0.1])), low[:, 1:2])
    unet = UNet25D(k=1, net=UNET, nstd_input=True, residual=False)
    a, b = unet(low, torch.tensor([0.05, 0.05])), unet(low, torch.tensor([0.6, 0.6]))
    assert (a - b).abs().max() > 0
    plain = UNet25D(k=1, net=UNET, nstd_input=False, residual=False)
    assert plain.in_channels == 3
    torch.testing.assert_close(plain(low), plain(low, torch.tensor([0.9, 0.9])))


def test_diffusion_residual_starts_at_the_low_count_slice():
    # MONAI zero-initialises the output conv, so a residual x0 model starts as the identity.
    model = ConditionalDiffusionUNet(k=1, net=NET, residual=True)
    x, t = _inputs(1)
    torch.testing.assert_close(model(x, t, torch.tensor([0.1, 0.1])), x[:, 2:3])


def test_build_model_validates():
    assert isinstance(build_model(TINY_MODEL), ConditionalDiffusionUNet)
    assert isinstance(build_model({**TINY_MODEL, "kind": "unet"}), UNet25D)
    with pytest.raises(FedNdifError, match="kind"):
        build_model({**TINY_MODEL, "kind": "gan"})
    with pytest.raises(FedNdifError, match="prediction_type=sample"):
        build_model({**TINY_MODEL, "residual": True}, prediction_type="epsilon")
    with pytest.raises(FedNdifError, match="strides"):
        build_model({**TINY_MODEL, "kind": "unet",
                     "unet": {"channels": [8, 16], "strides": [2], "num_res_units": 0}})


def test_presets_build_and_run_and_grow_in_size():
    from fed_ndif.config import load_config

    sizes = {"diffusion": [], "unet": []}
    for preset in ("tiny", "small", "base"):
        cfg = load_config("train_local", [f"model={preset}"])
        k = int(cfg.model.k)
        low, nstd = torch.rand(1, 2 * k + 1, 24, 24), torch.tensor([0.2])
        for kind in ("diffusion", "unet"):
            model = build_model({**cfg.model, "kind": kind}).eval()
            with torch.no_grad():
                out = (model(torch.cat([torch.randn(1, 1, 24, 24), low], 1), torch.tensor([5]),
                             nstd) if kind == "diffusion" else model(low, nstd))
            assert out.shape == (1, 1, 24, 24) and torch.isfinite(out).all(), (preset, kind)
            sizes[kind].append(sum(p.numel() for p in model.parameters()))
    for kind, counts in sizes.items():
        assert counts == sorted(counts) and counts[0] < counts[-1], (kind, counts)

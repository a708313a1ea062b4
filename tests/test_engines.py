"""ONNX Runtime runs the same network as eager PyTorch: same numbers, any size, a fallback."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fed_ndif.data.normalization import Normalization
from fed_ndif.errors import FedNdifError
from fed_ndif.models import engines
from fed_ndif.models.denoise_volume import denoise_volume
from fed_ndif.models.diffusion import DiffusionConfig, DiffusionProcess
from fed_ndif.models.engines import OnnxCore, choose_engine, inference_network
from fed_ndif.models.networks import build_model
from fed_ndif.models.sampling import SamplerConfig
from tests.helpers.models import TINY_MODEL


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _inputs(model, batch: int, height: int, width: int):
    g = torch.Generator().manual_seed(batch * 1000 + height)
    channels = model.in_channels - (1 if getattr(model, "nstd_input", False) else 0)
    x = torch.randn(batch, channels, height, width, generator=g)
    nstd = torch.full((batch,), 0.15)
    if hasattr(model, "noise_embedding"):  # diffusion: (x, t, nstd)
        return x, torch.randint(0, 1000, (batch,), generator=g), nstd
    return x, nstd


@pytest.mark.parametrize("changes", [{}, {"noise_embedding": False}, {"residual": True},
                                     {"kind": "unet"}, {"kind": "unet", "noise_embedding": False}])
def test_onnxruntime_gives_the_eager_networks_numbers_at_any_size(changes):
    torch.manual_seed(0)
    model = build_model({**TINY_MODEL, **changes}).eval()
    if changes.get("kind") == "unet":  # its head starts at zero: give it something to say
        torch.nn.init.normal_(model.head.weight)
    runner = inference_network(model, engine="onnxruntime", threads=1)
    assert isinstance(runner.unet, OnnxCore) and not isinstance(model.unet, OnnxCore)
    # Sizes that need padding to the down-sampling's multiple, batches other than the export's.
    for batch, height, width in ((1, 16, 16), (3, 21, 34), (5, 40, 12)):
        args = _inputs(model, batch, height, width)
        with torch.no_grad():
            expected = model(*args)
            got = runner(*args)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_volume_denoised_under_onnxruntime_matches_eager_pytorch():
    torch.manual_seed(0)
    model = build_model(TINY_MODEL).eval()
    vol = np.random.default_rng(1).gamma(2.0, 1.0, size=(6, 20, 24)).astype(np.float32)
    kwargs = {"nstd": 0.2, "normalization": Normalization(), "k": 1,
              "process": DiffusionProcess(DiffusionConfig()),
              "sampler": SamplerConfig(steps=3), "device": "cpu", "progress": False,
              "body_only": False}
    eager, _ = denoise_volume(model, vol, **kwargs)
    onnx, _ = denoise_volume(inference_network(model, engine="onnxruntime", threads=1), vol,
                             **kwargs)
    np.testing.assert_allclose(onnx, eager, atol=1e-4, rtol=1e-4)
    assert np.abs(eager - vol).max() > 0.1  # the network did something to compare


def test_the_engine_is_chosen_by_device_and_precision():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_engine("auto", device=cpu, precision="fp32") == "onnxruntime"
    assert choose_engine("auto", device=cpu, precision="bf16") == "torch"
    assert choose_engine("auto", device=cuda, precision="fp32") == "torch"
    assert choose_engine("torch", device=cpu, precision="fp32") == "torch"
    with pytest.raises(FedNdifError, match="float32 on a CPU"):
        choose_engine("onnxruntime", device=cuda, precision="fp32")
    with pytest.raises(FedNdifError, match="--engine"):
        choose_engine("tensorrt", device=cpu, precision="fp32")


def test_auto_falls_back_to_pytorch_without_onnxruntime(monkeypatch):
    real = engines.importlib.util.find_spec
    monkeypatch.setattr(engines.importlib.util, "find_spec",
                        lambda name: None if name == "onnxruntime" else real(name))
    assert choose_engine("auto", device=torch.device("cpu"), precision="fp32") == "torch"


def test_a_failed_export_leaves_the_eager_network_with_a_warning(monkeypatch, caplog):
    def broken(model):
        raise RuntimeError("unsupported operator\nmore detail")

    monkeypatch.setattr(engines, "onnx_export", broken)
    model = build_model(TINY_MODEL)
    with caplog.at_level(logging.WARNING):
        assert inference_network(model, engine="onnxruntime", threads=1) is model
    assert "(RuntimeError: unsupported operator); running eager PyTorch" in caplog.text


def test_pytorch_keeps_one_thread_beside_onnxruntime_and_all_of_them_alone():
    model = build_model(TINY_MODEL)
    inference_network(model, engine="onnxruntime", threads=2)
    assert torch.get_num_threads() == 1  # the cores are ONNX Runtime's
    assert inference_network(model, engine="torch", threads=2) is model
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(("files", "expected"), [
    ({}, None),  # no cgroup files: the affinity alone
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: two threads
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
])
def test_threads_follow_the_affinity_capped_by_a_cpu_quota(tmp_path, monkeypatch, files,
                                                           expected):
    monkeypatch.setattr(engines.os, "sched_getaffinity", lambda pid: set(range(8)))
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert engines.available_threads(tmp_path) == (expected or 8)

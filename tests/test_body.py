"""The body region: the network runs only there, air keeps the input, so no offset in air."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from fed_ndif.checkpoints import build_state, sampler_config
from fed_ndif.data.dataset import SliceStackDataset
from fed_ndif.data.normalization import Normalization
from fed_ndif.models.body import EDGE_PX, body_mask, bounding_box
from fed_ndif.models.denoise_volume import denoise_volume
from fed_ndif.training.trainer import make_train_batches, train_steps
from tests.helpers.models import tiny_cfg
from tests.helpers.synthetic import write_site


def _torso(shape=(6, 64, 64)) -> np.ndarray:
    """1 SUV ellipse with two cold 'lungs' inside, in air; slice 0 is all air."""
    _, y, x = np.indices(shape)
    body = ((y - 32) / 14.0) ** 2 + ((x - 32) / 20.0) ** 2 <= 1
    lungs = (((y - 31) / 6.0) ** 2 + ((np.abs(x - 32) - 9) / 5.0) ** 2) <= 1
    volume = np.where(body & ~lungs, 1.0, np.where(lungs, 0.01, 0.0)).astype(np.float32)
    volume[0] = 0.0
    return volume


def test_the_body_includes_the_lungs_and_leaves_out_the_air():
    volume = _torso()
    mask = body_mask(volume, margin_px=0)
    assert not mask[0].any()
    assert mask[1:, 31, 23].all() and mask[1:, 31, 41].all()  # lung centres: holes filled
    assert not mask[1:, 5, 5].any() and not mask[1:, 32, 62].any()  # air
    grown = body_mask(volume, margin_px=3)
    assert grown.sum() > mask.sum() and (grown >= mask).all()


def test_the_box_holds_the_body_its_margin_and_at_least_a_window():
    mask = np.zeros((2, 100, 80), bool)
    mask[1, 40:50, 30:35] = True
    rows, cols = bounding_box(mask, margin=4, minimum=8)
    assert (rows.start, rows.stop) == (36, 54) and (cols.start, cols.stop) == (26, 39)
    rows, cols = bounding_box(mask, margin=0, minimum=64)
    assert rows.stop - rows.start == 64 and cols.stop - cols.start == 64
    assert rows.start <= 40 and rows.stop >= 50 and 0 <= cols.start <= 30 and cols.stop <= 80
    rows, cols = bounding_box(mask, margin=0, minimum=200)  # the slice is the limit
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 100, 0, 80)
    assert bounding_box(np.zeros((3, 9, 9), bool), minimum=4) is None


class _Offset(nn.Module):
    """A 'denoiser' that adds 0.5 everywhere and records the slice sizes it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x, nstd):
        self.seen.append(tuple(x.shape))
        return x[:, x.shape[1] // 2:x.shape[1] // 2 + 1] * self.scale + 0.5


def test_air_keeps_the_input_and_all_air_slices_skip_the_network():
    volume = _torso()
    net = _Offset()
    out, _ = denoise_volume(net, volume, nstd=0.2, normalization=Normalization(), k=1,
                            device="cpu", batch_size=2, progress=False)
    body = body_mask(volume)
    np.testing.assert_array_equal(out[~body], volume[~body])
    np.testing.assert_allclose(out[body], volume[body] + 0.5, atol=1e-6)
    # A whole-slice network sees whole slices (its normalization learnt on them)...
    assert all(shape[-2:] == (64, 64) for shape in net.seen)
    assert sum(shape[0] for shape in net.seen) == 5  # ...but the all-air slice 0 never went in
    whole, _ = denoise_volume(net, volume, nstd=0.2, normalization=Normalization(), k=1,
                              device="cpu", progress=False, body_only=False)
    np.testing.assert_allclose(whole, volume + 0.5, atol=1e-6)


def test_a_windowed_network_runs_only_over_the_body():
    volume = _torso()
    windows = {}
    for body_only in (True, False):
        net = _Offset()
        out, _ = denoise_volume(net, volume, nstd=0.2, normalization=Normalization(), k=1,
                                device="cpu", batch_size=2, progress=False, window=16,
                                body_only=body_only)
        windows[body_only] = sum(shape[0] for shape in net.seen)
        body = body_mask(volume) if body_only else np.ones(volume.shape, bool)
        np.testing.assert_allclose(out[body], volume[body] + 0.5, atol=1e-5)
        np.testing.assert_array_equal(out[~body], volume[~body])
    # The torso's box with its context (about 57 x 45 px) against the whole 64 x 64 field of
    # view, and 5 slices of 6: 210 windows against 294.
    assert windows[True] < 0.75 * windows[False], windows


@pytest.fixture(scope="module")
def patch_site(tmp_path_factory):
    return write_site(tmp_path_factory.mktemp("body"), splits=("train", "train", "test"),
                      levels=(0.1,), matrix=48, slices=12)


def test_a_patch_trained_network_leaves_no_offset_in_air(patch_site):
    """An under-trained patch network answers all-air windows with a constant; run on the
    whole field of view it lifts the air by ~0.1 SUV (an eighth of the body's mean)."""
    torch.set_num_threads(1)
    train = SliceStackDataset(patch_site, split="train", k=1, normalization=Normalization())
    test = SliceStackDataset(patch_site, split="test", k=1, normalization=Normalization())
    cfg = tiny_cfg()
    cfg["data"].update(patch_size=24, foreground_fraction=0.5)
    cfg["diffusion"]["sampler"].update(name="dpmpp_2m", steps=5)
    cfg["train"]["lr"] = 2e-3
    state = build_state(cfg)
    train_steps(state, make_train_batches(state, train), 200)
    study = test.studies[0]
    air = ~ndimage.binary_dilation(study.full > 0.05, iterations=EDGE_PX + 1)
    outputs = {}
    for body_only in (False, True):
        outputs[body_only], _ = denoise_volume(
            state.ema.model, study.low, nstd=study.nstd, normalization=Normalization(), k=1,
            process=state.process, sampler=sampler_config(state.cfg), device="cpu", window=24,
            progress=False, body_only=body_only)
    input_air = float(study.low[air].mean())
    assert float(outputs[False][air].mean()) - input_air > 0.03  # the offset this guards against
    assert abs(float(outputs[True][air].mean()) - input_air) < 0.005

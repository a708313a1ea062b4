"""Patch training and windowed inference: crops with foreground oversampling, exact on resume;
whole slices go through the network in the windows it was trained on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fed_ndif.data.dataset import SliceStackDataset
from fed_ndif.data.normalization import Normalization
from fed_ndif.errors import FedNdifError
from fed_ndif.models.windowed import SlidingWindow
from fed_ndif.training.batches import PatchBatchSampler, batch_sampler
from tests.helpers.models import tiny_cfg
from tests.helpers.synthetic import write_site

PATCH = 24


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    manifest = write_site(tmp_path_factory.mktemp("patches"), splits=("train", "train"),
                          levels=(0.1,), matrix=48, slices=12)
    return SliceStackDataset(manifest, split="train", k=1, normalization=Normalization())


def _is_foreground(dataset, key) -> bool:
    item, y0, x0, size = key
    study, z = dataset.index[item]
    voxels = dataset.studies[study].foreground
    inside = ((voxels[:, 0] == z) & (voxels[:, 1] >= y0) & (voxels[:, 1] < y0 + size)
              & (voxels[:, 2] >= x0) & (voxels[:, 2] < x0 + size))
    return bool(inside.any())


def test_patches_are_crops_of_the_whole_slice(dataset):
    whole = dataset[5]
    patch = dataset[(5, 7, 11, PATCH)]
    assert patch["low"].shape == (3, PATCH, PATCH) and patch["full"].shape == (1, PATCH, PATCH)
    torch.testing.assert_close(patch["low"], whole["low"][:, 7:7 + PATCH, 11:11 + PATCH])
    torch.testing.assert_close(patch["full"], whole["full"][:, 7:7 + PATCH, 11:11 + PATCH])
    assert patch["nstd"] == whole["nstd"]


def test_patch_batches_depend_on_seed_and_step_only_and_oversample_lesions(dataset):
    def sampler(fraction, start=0):
        return PatchBatchSampler(dataset, batch_size=16, seed=3, patch=PATCH,
                                 foreground_fraction=fraction, start_step=start)

    assert sampler(0.5).batch(7) == sampler(0.5, start=7).batch(7)  # exact on resume
    assert next(iter(sampler(0.5, start=7))) == sampler(0.5).batch(7)
    assert sampler(0.5).batch(7) != sampler(0.5).batch(8)
    height, width = dataset.slice_shape
    for keys in (sampler(1.0).batch(s) for s in range(5)):
        assert all(0 <= y0 <= height - PATCH and 0 <= x0 <= width - PATCH
                   for _, y0, x0, _ in keys)
    hits = {f: np.mean([_is_foreground(dataset, key) for s in range(10)
                        for key in sampler(f).batch(s)]) for f in (0.0, 1.0)}
    assert hits[1.0] > 0.9 and hits[1.0] > 3 * hits[0.0], hits


def test_bad_patch_settings_are_named(dataset):
    cfg = tiny_cfg(k=1)
    cfg["data"].update(patch_size=4, foreground_fraction=0.5)
    with pytest.raises(FedNdifError, match="patch_size"):
        batch_sampler(dataset, cfg, seed=0)
    cfg["data"].update(patch_size=PATCH, foreground_fraction=1.5)
    with pytest.raises(FedNdifError, match="foreground_fraction"):
        batch_sampler(dataset, cfg, seed=0)


def test_a_slice_smaller_than_the_patch_is_taken_whole(dataset):
    cfg = tiny_cfg(k=1)
    cfg["data"].update(patch_size=4096, foreground_fraction=0.5)
    height, width = dataset.slice_shape
    keys = batch_sampler(dataset, cfg, seed=0).batch(0)
    assert all(key[1:] == (0, 0, min(height, width)) for key in keys)


class _LocalNet(nn.Module):
    """Translation-equivariant, 5x5 receptive field, no normalization; adds t and NSTD."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(),
                                  nn.Conv2d(4, 1, 3, padding=1))

    def forward(self, x, t, nstd):
        return self.conv(x) + (t.float() * 0.01 + nstd)[:, None, None, None]


def test_windowed_whole_slice_equals_the_network_on_the_whole_slice_for_a_local_network():
    net = _LocalNet()
    x = torch.randn(3, 2, 70, 53)
    t, nstd = torch.full((3,), 40), torch.full((3,), 0.25)
    with torch.no_grad():
        direct = net(x, t, nstd)
        windowed = SlidingWindow(net, patch=PATCH)(x, t, nstd)
    assert windowed.shape == direct.shape
    # Within the receptive field (2 px) of the image border the network's own zero padding of
    # its hidden layer differs from padding the input; elsewhere only the windows' cut edges
    # differ, and the gaussian blending weighs them ~1 % of the window that sees them whole.
    error = (windowed - direct)[..., 2:-2, 2:-2].abs()
    assert float(error.max()) < 0.02 and float(error.mean()) < 1e-3, (error.max(), error.mean())


def test_windows_get_each_images_own_values():
    net = _LocalNet()
    x = torch.zeros(2, 2, 60, 60)
    t, nstd = torch.tensor([0, 100]), torch.tensor([0.1, 0.9])
    with torch.no_grad():
        windowed = SlidingWindow(net, patch=PATCH)(x, t, nstd)
        direct = net(x, t, nstd)
    error = (windowed - direct)[..., 2:-2, 2:-2].abs()
    assert float(error.max()) < 0.02, float(error.max())
    assert float((windowed[1] - windowed[0]).mean()) > 1.0  # image 1's own t and NSTD


def test_a_side_shorter_than_the_window_is_taken_whole_not_padded():
    class Recording(_LocalNet):
        def forward(self, x, t, nstd):
            self.seen.append(tuple(x.shape[-2:]))
            return super().forward(x, t, nstd)

    net = Recording()
    net.seen = []
    x = torch.randn(1, 2, 3 * PATCH, PATCH // 2)  # tall and narrower than a window
    t, nstd = torch.full((1,), 40), torch.full((1,), 0.25)
    with torch.no_grad():
        windowed = SlidingWindow(net, patch=PATCH)(x, t, nstd)
        direct = net(x, t, nstd)
    assert set(net.seen[:-1]) == {(PATCH, PATCH // 2)}  # no zero columns added
    error = (windowed - direct)[..., 2:-2, 2:-2].abs()
    assert float(error.max()) < 0.02, float(error.max())

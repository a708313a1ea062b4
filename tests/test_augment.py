"""Lesion insertion: a 3D sphere, the same in input and target, in the body, with count noise."""

from __future__ import annotations

import pytest
import torch

from fed_ndif.errors import FedNdifError
from fed_ndif.training.augment import LesionInsertion, insert_lesions

K = 2
SIZE = 48


def _pair(n: int = 4, *, noise: float = 0.1, seed: int = 0):
    """A uniform 1-SUV 'body' disc of radius 18 px in air, and a noisy low-count copy."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    body = (((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2) <= 18 ** 2).float()
    full = body.expand(n, 1, SIZE, SIZE).clone()
    low = body * (1 + noise * torch.randn(n, 2 * K + 1, SIZE, SIZE, generator=g))
    spacing = torch.tensor([[3.0, 3.2, 3.2]]).expand(n, 3)
    return low, full, spacing, body.bool()


def _insert(low, full, spacing, *, seed=1, **settings):
    settings = {"probability": 1.0, "radius_mm": (2.5, 10.0), "contrast": (0.5, 4.0),
                "fwhm_mm": 6.0, **settings}
    n = low.shape[0]
    return insert_lesions(low, full, full_stack=full.expand_as(low).clone(), spacing=spacing,
                          fwhm=torch.zeros(n, 3), count_level=torch.full((n,), 0.1),
                          settings=LesionInsertion(**settings), body_level=0.3,
                          generator=torch.Generator().manual_seed(seed))


def test_off_leaves_the_pair_as_it_is():
    low, full, spacing, _ = _pair()
    new_low, new_full = _insert(low, full, spacing, probability=0.0)
    assert torch.equal(new_low, low) and torch.equal(new_full, full)


def test_the_same_sphere_goes_into_input_and_target_inside_the_body():
    low, full, spacing, body = _pair(noise=0.0)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    interior = ((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2) <= 14 ** 2
    new_low, new_full = _insert(low, full, spacing, radius_mm=(8.0, 8.0), contrast=(3.0, 3.0))
    added_full = new_full - full
    added_low = new_low - low
    for i in range(low.shape[0]):
        peak = added_full[i, 0].argmax()
        assert body.flatten()[peak], "lesion centre outside the body"
        # Radius 8 mm against a 2.5 mm blur sigma: the centre keeps nearly the full contrast
        # (background 1 SUV), unless the target slice cuts the sphere off its centre.
        assert 1.5 < float(added_full[i].max()) <= 3.0 + 1e-5
        # Noise-free input: its centre slice gets exactly the target's sphere...
        torch.testing.assert_close(added_low[i, K][interior], added_full[i, 0][interior],
                                   atol=0.01, rtol=0)
        # ...and the neighbouring slices the same sphere's cross-sections at their depths.
        assert float(added_low[i, K - 2].sum()) != pytest.approx(float(added_low[i, K].sum()))
        assert all(float(added_low[i, c].sum()) > 0 for c in range(2 * K + 1))
        assert float(added_full[i, 0][~body].abs().max()) < 0.5  # only the blurred edge leaks


def test_the_sphere_has_its_size_in_mm():
    low, full, _, _ = _pair(noise=0.0)
    fine = torch.tensor([[3.0, 2.0, 2.0]]).expand(low.shape[0], 3)
    coarse = torch.tensor([[3.0, 4.0, 4.0]]).expand(low.shape[0], 3)
    areas = []
    for spacing in (fine, coarse):
        _, new_full = _insert(low, full, spacing, radius_mm=(9.0, 9.0), contrast=(2.0, 2.0))
        areas.append(float(((new_full - full) > 1.0).sum()))
    assert areas[0] > 2.5 * areas[1]  # twice the pixel size: a quarter of the pixels


def test_the_input_gets_the_noise_of_a_hotter_region():
    low, full, spacing, _ = _pair(n=8, noise=0.2)
    new_low, new_full = _insert(low, full, spacing, radius_mm=(10.0, 10.0),
                                contrast=(4.0, 4.0))
    inside = (new_full - full)[:, 0] > 3.0
    before = (low[:, K] - full[:, 0])[inside].std()
    after = (new_low[:, K] - new_full[:, 0])[inside].std()
    # Poisson-like: 5x the mean inside the lesion, so about sqrt(5) x the noise (here the
    # input's noise is all in low - full, so a little more: sqrt(1 + 4 / 0.9)).
    assert 2.0 < float(after / before) < 2.6


def test_draws_depend_on_the_generator_only():
    low, full, spacing, _ = _pair()
    first = _insert(low, full, spacing, probability=0.5, seed=7)
    again = _insert(low, full, spacing, probability=0.5, seed=7)
    other = _insert(low, full, spacing, probability=0.5, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[1], other[1])


def test_a_patch_of_air_gets_no_lesion():
    low, full, spacing, _ = _pair()
    air_low, air_full = torch.zeros_like(low), torch.zeros_like(full)
    new_low, new_full = _insert(air_low, air_full, spacing)
    assert not new_low.any() and not new_full.any()


@pytest.mark.parametrize("settings, word", [
    ({"probability": 1.5}, "probability"),
    ({"radius_mm": [5, 2]}, "radius_mm"),
    ({"radius": 3}, "radius"),
    ({"probability": 0.5}, "missing"),
    ({"probability": 0.5, "radius_mm": "big"}, "radius_mm"),
])
def test_bad_settings_are_named(settings, word):
    with pytest.raises(FedNdifError, match=f"train.insert_lesions.*{word}"):
        LesionInsertion.from_config({"insert_lesions": {
            "probability": 0.5, "radius_mm": [2.5, 10.0], "contrast": [0.5, 4.0], "fwhm_mm": 6.0,
            **settings} if word != "missing" else settings})

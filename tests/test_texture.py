"""Noise texture (NPS) summaries: power and grain against full count's."""

import numpy as np
import pytest
from scipy import ndimage

from fed_ndif.evaluation.texture import KEYS, texture_metrics


@pytest.fixture
def scan():
    rng = np.random.default_rng(0)
    ideal = np.full((6, 40, 40), 2.0)
    full = ideal + rng.normal(0, 0.3, ideal.shape)
    masks = {"liver": np.zeros(ideal.shape, bool), "body": np.ones(ideal.shape, bool)}
    masks["liver"][:, 10:30, 8:32] = True
    return ideal, full, masks


def test_full_count_is_one_and_scaled_noise_keeps_its_grain(scan):
    ideal, full, masks = scan
    same = texture_metrics(full, full, ideal, masks=masks, spacing_yx=(4.0, 4.0))
    assert set(same) == set(KEYS)
    assert all(v == pytest.approx(1.0) for v in same.values())
    half = texture_metrics(ideal + 0.5 * (full - ideal), full, ideal, masks=masks,
                           spacing_yx=(4.0, 4.0))
    assert half["nps_power_liver"] == pytest.approx(0.25, rel=1e-6)
    assert half["nps_frequency_body"] == pytest.approx(1.0, rel=1e-6)


def test_smoothing_makes_the_grain_coarser_and_the_noise_smaller(scan):
    ideal, full, masks = scan
    blotchy = ideal + ndimage.gaussian_filter(full - ideal, sigma=(0, 1.5, 1.5)) * 3.0
    texture = texture_metrics(blotchy, full, ideal, masks=masks, spacing_yx=(4.0, 4.0))
    for region in ("liver", "body"):
        assert texture[f"nps_frequency_{region}"] < 0.6
    smooth = texture_metrics(ideal + ndimage.gaussian_filter(full - ideal, sigma=(0, 1.5, 1.5)),
                             full, ideal, masks=masks, spacing_yx=(4.0, 4.0))
    assert smooth["nps_power_body"] < 0.2
    # The same images at twice the pixel size: frequencies halve for both, ratios stay.
    coarse = texture_metrics(blotchy, full, ideal, masks=masks, spacing_yx=(8.0, 8.0))
    assert coarse["nps_frequency_liver"] == pytest.approx(texture["nps_frequency_liver"])

"""The small-lesion model observer: its AUC against theory, and its lesions in real studies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fed_ndif.config import load_config
from fed_ndif.errors import FedNdifError
from fed_ndif.evaluation.compare import input_method, load_studies, noise_free_method
from fed_ndif.evaluation.detectability import (
    CONTEXT_SLICES,
    DetectionTask,
    channel_outputs,
    detectability,
    laguerre_gauss,
    place_lesions,
    score_detection,
)

ROI = 15
SIGMA_PX = 2.0


def _white_noise_rows(amplitude: float, *, subjects: int = 20, per_subject: int = 10,
                      seed: int = 0) -> list[dict]:
    """Signal-known-exactly in white gaussian noise (sd 1): a gaussian blob or nothing."""
    rng = np.random.default_rng(seed)
    r = np.arange(ROI) - ROI // 2
    blob = amplitude * np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * SIGMA_PX ** 2))
    # Laguerre-Gauss channel 0 is this blob when a = sigma * sqrt(2 pi): the CHO can reach
    # the ideal observer.
    profiles = laguerre_gauss(ROI, 5, SIGMA_PX * math.sqrt(2 * math.pi))
    rows = []
    for subject in range(subjects):
        for present in (1, 0):
            volume = rng.normal(size=(per_subject, ROI, ROI)) + present * blob
            centres = [(z, ROI // 2, ROI // 2) for z in range(per_subject)]
            for lesion, v in enumerate(channel_outputs(volume, centres, ROI, profiles)):
                rows.append({"site": "site_a" if subject % 2 else "site_b",
                             "subject": f"sub-{subject:03d}", "method": "m", "lesion": lesion,
                             "present": present, **{f"c{j}": v[j] for j in range(5)}})
    return rows, float(np.sqrt((blob ** 2).sum()))


def test_cho_auc_matches_the_ideal_observer_in_white_noise():
    rows, d_prime = _white_noise_rows(0.45)
    expected = stats.norm.cdf(d_prime / math.sqrt(2))
    result = detectability(rows, "m")
    assert 0.75 < expected < 0.95
    assert abs(result.auc - expected) < 0.05, (result, expected)
    assert result.low < expected < result.high
    assert result.lesions == 200 and result.subjects == 20


def test_cho_auc_is_chance_without_a_signal():
    rows, _ = _white_noise_rows(0.0, seed=3)
    result = detectability(rows, "m")
    assert abs(result.auc - 0.5) < 0.08
    assert result.low < 0.5 < result.high


def test_settings_are_checked():
    assert DetectionTask.from_config(None) is None
    assert DetectionTask.from_config({"enabled": False, "lesions": 3}) is None
    task = DetectionTask.from_config(load_config("simulate").compare.detectability)
    assert task is not None and task.lesions >= 1
    with pytest.raises(FedNdifError, match="unknown settings"):
        DetectionTask.from_config({"enabled": True, "lesion": 3})
    with pytest.raises(FedNdifError, match="positive"):
        DetectionTask.from_config({"enabled": True, "lesions": 3, "radius_mm": -1,
                                   "contrast": 1, "slab_slices": 20, "channels": 5,
                                   "fwhm_mm": 6})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from fed_ndif.data.sites import make_sites

    root = tmp_path_factory.mktemp("detect") / "sites"
    make_sites(root, overrides=["sites=tiny"])
    return load_studies(root / "site_a" / "manifest.csv", "test")[0]


def test_lesions_are_inserted_at_their_places_in_a_slab_that_keeps_the_nstd(study):
    task = DetectionTask(lesions=4, radius_mm=5.0, contrast=2.0, slab_slices=16, channels=5,
                         fwhm_mm=6.0)
    placed = place_lesions(study, task, k=CONTEXT_SLICES)
    assert placed is not None and 1 <= len(placed.centres) <= 4
    depth = placed.present.low.shape[0]
    assert depth == min(16, study.low.shape[0])
    assert placed.present.nstd == placed.absent.nstd == study.nstd
    difference = placed.present.low - placed.absent.low
    ideal_gain = placed.present.ideal - placed.absent.ideal
    for z, y, x in placed.centres:
        assert CONTEXT_SLICES <= z < depth - CONTEXT_SLICES
        assert ideal_gain[int(z), int(y), int(x)] > 0.3 * ideal_gain.max()
        # the input gains the sphere (and its noise) around the centre
        assert difference[int(z), int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2].mean() > 0
    far = ideal_gain[:, :2, :2]
    assert np.all(far == 0)
    # the same study gives the same places (a reproducible task)
    again = place_lesions(study, task, k=CONTEXT_SLICES)
    assert again.centres == placed.centres


def test_the_noise_free_image_finds_the_lesions_better_than_the_input(study):
    task = DetectionTask(lesions=6, radius_mm=5.0, contrast=3.0, slab_slices=16, channels=3,
                         fwhm_mm=6.0)
    rows = score_detection("site_a", [study], [input_method(), noise_free_method()], task)
    assert {r["method"] for r in rows} == {"input", "noise_free"}
    assert {r["present"] for r in rows} == {0, 1}
    # One subject: no subject to fit a template on, so no score; the channel outputs still
    # show the lesion: its first channel is larger with the lesion than without.
    for method in ("input", "noise_free"):
        mine = [r for r in rows if r["method"] == method]
        gain = np.mean([r["c0"] for r in mine if r["present"]]) - np.mean(
            [r["c0"] for r in mine if not r["present"]])
        assert gain > 0, method
    assert math.isnan(detectability(rows, "input").auc)

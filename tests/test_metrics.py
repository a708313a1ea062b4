"""Metric functions against hand-computed cases and against MONAI's implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import PSNRMetric, SSIMMetric

from fed_ndif.evaluation.lesions import lesion_metrics, summarize_lesions
from fed_ndif.image_metrics import volume_metrics


def test_psnr_nmse_hand_computed():
    reference = np.zeros((8, 16, 16))
    reference[2:6, 4:12, 4:12] = 4.0  # data range = 4 SUV
    output = reference + 0.1  # every voxel off by 0.1 -> MSE 0.01
    m = volume_metrics(output, reference)
    assert m["psnr"] == pytest.approx(10 * math.log10(16 / 0.01))
    assert m["nmse"] == pytest.approx(0.01 / np.mean(reference**2))
    assert volume_metrics(reference, reference)["ssim"] == pytest.approx(1.0)
    assert volume_metrics(reference, reference)["psnr"] == math.inf


def test_psnr_and_ssim_agree_with_monai():
    rng = np.random.default_rng(0)
    reference = np.clip(rng.gamma(2.0, 1.0, (12, 24, 24)), 0, None)
    output = reference + rng.normal(0, 0.3, reference.shape)
    ours = volume_metrics(output, reference)
    data_range = float(reference.max())
    as_tensor = [torch.as_tensor(a, dtype=torch.float64)[None, None] for a in (output, reference)]
    monai_psnr = PSNRMetric(max_val=data_range)(*as_tensor).item()
    monai_ssim = SSIMMetric(spatial_dims=3, data_range=data_range, kernel_type="uniform",
                            win_size=7)(*as_tensor).item()
    assert ours["psnr"] == pytest.approx(monai_psnr, abs=1e-6)
    assert ours["ssim"] == pytest.approx(monai_ssim, abs=1e-3)


def _lesion_case():
    z, y, x = np.mgrid[:12, :32, :32]
    lesion = ((z - 6) ** 2 + (y - 16) ** 2 + (x - 16) ** 2) <= 9
    reference = np.full((12, 32, 32), 2.0)
    reference[lesion] = 10.0
    return reference, lesion.astype(np.uint16)


def test_lesion_bias_and_contrast_recovery_on_a_known_case():
    reference, lesions = _lesion_case()
    output = reference.copy()
    output[lesions > 0] = 9.0  # peak and mean both 10 % low; background exact
    (result,) = lesion_metrics(output, reference, lesions)
    assert result.suvmax_bias_pct == pytest.approx(-10.0)
    assert result.suvmean_bias_pct == pytest.approx(-10.0)
    # contrast: reference 10/2 - 1 = 4, output 9/2 - 1 = 3.5
    assert result.contrast_recovery == pytest.approx(3.5 / 4.0)
    assert math.isnan(result.cnr)  # no background noise at all
    summary = summarize_lesions([result])
    assert summary["abs_suvmax_bias_pct"] == pytest.approx(10.0)
    assert summary["lesions"] == 1


def test_cnr_falls_as_background_noise_rises():
    reference, lesions = _lesion_case()
    rng = np.random.default_rng(1)
    quiet = reference + rng.normal(0, 0.2, reference.shape)
    noisy = reference + rng.normal(0, 1.0, reference.shape)
    (q,) = lesion_metrics(quiet, reference, lesions)
    (n,) = lesion_metrics(noisy, reference, lesions)
    assert q.cnr > 3 * n.cnr > 0
    assert abs(q.suvmean_bias_pct) < 2


def test_contrast_recovery_is_left_out_for_lesions_invisible_at_full_count():
    reference, lesions = _lesion_case()
    reference[lesions > 0] = 2.2  # lesion/background 1.1: not a visible lesion
    (result,) = lesion_metrics(reference * 1.0, reference, lesions)
    assert math.isnan(result.contrast_recovery)
    assert result.suvmax_bias_pct == pytest.approx(0.0)


def test_metrics_csv_round_trip_keeps_missing_lesion_metrics_as_nan(tmp_path):
    from fed_ndif.evaluation.compare import read_rows, write_rows
    from fed_ndif.evaluation.report import metric_table

    rows = [{"site": "a", "subject": "s1", "count_level": 0.1, "method": "input",
             "label": "Low-count input", "psnr": 30.0, "ssim": 0.9, "nmse": 0.1,
             "liver_nstd": 0.3, "full_count_liver_nstd": 0.1}]
    write_rows(tmp_path / "m.csv", rows)
    (back,) = read_rows(tmp_path / "m.csv")
    assert back["psnr"] == 30.0 and back["count_level"] == 0.1
    assert math.isnan(back["abs_suvmax_bias_pct"])
    assert "| Low-count input | 30.00 |" in metric_table([back], ["input"])

"""Metric functions against hand-computed cases and against MONAI's implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import PSNRMetric, SSIMMetric

from fed_ndif.evaluation.lesions import (
    LesionSet,
    lesion_metrics,
    peak_kernel,
    summarize_lesions,
    summary_keys,
)
from fed_ndif.image_metrics import volume_metrics
from fed_ndif.models.body import body_mask


def test_psnr_nmse_hand_computed():
    reference = np.zeros((8, 16, 16))
    reference[2:6, 4:12, 4:12] = 4.0  # data range = 4 SUV
    output = reference + 0.1  # every voxel off by 0.1 -> MSE 0.01
    m = volume_metrics(output, reference)
    assert m["psnr"] == pytest.approx(10 * math.log10(16 / 0.01))
    assert m["psnr_field"] == pytest.approx(10 * math.log10(16 / 0.01))
    assert m["nmse_field"] == pytest.approx(0.01 / np.mean(reference**2))
    # Inside the body (the block, and its blurred edge where the smoothed reference is above
    # air's level) the reference's mean square is higher than over the field.
    body = body_mask(reference, margin_px=0)
    assert body[reference > 0].all() and body.sum() < reference.size / 2
    assert m["nmse"] == pytest.approx(0.01 / np.mean(reference[body] ** 2))
    assert volume_metrics(reference, reference)["ssim"] == pytest.approx(1.0)
    assert volume_metrics(reference, reference)["psnr"] == math.inf


def test_image_metrics_are_taken_inside_the_body():
    reference = np.zeros((8, 32, 32))
    reference[1:7, 8:24, 8:24] = 2.0
    body = body_mask(reference, margin_px=0)
    in_air, in_body = reference.copy(), reference.copy()
    in_air[~body] += 0.2
    in_body[body] += 0.2 * math.sqrt((~body).sum() / body.sum())  # the same total error
    air, tissue = volume_metrics(in_air, reference), volume_metrics(in_body, reference)
    assert air["psnr_field"] == pytest.approx(tissue["psnr_field"])
    assert air["psnr"] == math.inf and math.isfinite(tissue["psnr"])
    assert tissue["psnr"] < tissue["psnr_field"]  # air dilutes the error over the field


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
    assert ours["psnr_field"] == pytest.approx(monai_psnr, abs=1e-6)
    assert ours["ssim_field"] == pytest.approx(monai_ssim, abs=1e-3)


SPACING = (3.0, 2.0, 2.0)


def _lesion_case():
    z, y, x = np.mgrid[:12, :32, :32]
    lesion = ((z - 6) ** 2 + (y - 16) ** 2 + (x - 16) ** 2) <= 9
    reference = np.full((12, 32, 32), 2.0)
    reference[lesion] = 10.0
    return reference, lesion.astype(np.uint16)


def _measure(output, reference, lesions, ideal=None):
    lesion_set = LesionSet(lesions, SPACING, reference)
    return lesion_metrics(lesion_set, lesion_set.uptake(output), lesion_set.uptake(reference),
                          lesion_set.uptake(ideal) if ideal is not None else None)


def test_lesion_bias_and_contrast_recovery_on_a_known_case():
    reference, lesions = _lesion_case()
    output = reference.copy()
    output[lesions > 0] = 9.0  # max and mean both 10 % low; background exact
    (result,) = _measure(output, reference, lesions, ideal=reference * 0.9)
    assert result["suvmax_bias_pct"] == pytest.approx(-10.0)
    assert result["suvmean_bias_pct"] == pytest.approx(-10.0)
    assert result["suvmean_ideal_bias_pct"] == pytest.approx(0.0)
    assert -10.0 < result["suvpeak_bias_pct"] < 0  # the peak sphere also holds background
    # contrast: reference 10/2 - 1 = 4, output 9/2 - 1 = 3.5
    assert result["contrast_recovery"] == pytest.approx(3.5 / 4.0)
    assert math.isnan(result["cnr"])  # no background noise at all
    summary = summarize_lesions([result])
    # 123 voxels of 12 mm3: an equivalent sphere of 14.1 mm, the large group
    assert int((lesions > 0).sum()) == 123
    assert result["diameter_mm"] == pytest.approx((6 * 123 * 12 / math.pi) ** (1 / 3))
    assert summary["lesions_ge10"] == 1 and summary["lesions_lt10"] == 0
    assert summary["abs_suvmax_bias_pct_ge10"] == pytest.approx(10.0)
    assert math.isnan(summary["suvmax_bias_pct_lt10"])
    assert set(summary) == set(summary_keys())


def test_without_a_noise_free_image_its_columns_are_missing():
    reference, lesions = _lesion_case()
    (result,) = _measure(reference, reference, lesions)
    assert math.isnan(result["suvpeak_ideal_bias_pct"])
    assert result["suvpeak_bias_pct"] == pytest.approx(0.0)


def test_cnr_falls_as_background_noise_rises():
    reference, lesions = _lesion_case()
    rng = np.random.default_rng(1)
    quiet = reference + rng.normal(0, 0.2, reference.shape)
    noisy = reference + rng.normal(0, 1.0, reference.shape)
    (q,) = _measure(quiet, reference, lesions)
    (n,) = _measure(noisy, reference, lesions)
    assert q["cnr"] > 3 * n["cnr"] > 0
    assert abs(q["suvmean_bias_pct"]) < 2


def test_contrast_recovery_is_left_out_for_lesions_invisible_at_full_count():
    reference, lesions = _lesion_case()
    reference[lesions > 0] = 2.2  # lesion/background 1.1: not a visible lesion
    (result,) = _measure(reference * 1.0, reference, lesions)
    assert math.isnan(result["contrast_recovery"])
    assert result["suvmax_bias_pct"] == pytest.approx(0.0)


def _sphere(radius_mm, spacing, *, size_mm=60.0, lesion=10.0, background=1.0):
    shape = [int(size_mm / s) for s in spacing]
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    inside = z**2 + y**2 + x**2 <= radius_mm**2
    volume = np.where(inside, lesion, background)
    return volume, inside.astype(np.uint16), inside


@pytest.mark.parametrize("spacing", [(2.0, 0.8, 1.2), (1.0, 1.0, 1.0), (3.0, 1.5, 1.5)])
def test_suvpeak_of_an_analytic_sphere_on_anisotropic_voxels(spacing):
    radius = (3 * 1000 / (4 * math.pi)) ** (1 / 3)  # the 1 cm3 peak sphere: 6.2 mm
    kernel = peak_kernel(spacing)
    assert kernel.sum() == pytest.approx(1.0)
    # A lesion far larger than the peak sphere: SUVpeak is the lesion's own uptake.
    big, lesions, _ = _sphere(15.0, spacing)
    (uptake,) = LesionSet(lesions, spacing, big).uptake(big)
    assert uptake.suvpeak == pytest.approx(10.0, rel=0.01)
    # A lesion smaller than the peak sphere: the sphere, centred on it, also holds background.
    # Known value: (lesion x V_lesion + background x (1 cm3 - V_lesion)) / 1 cm3, with
    # V_lesion the voxelized lesion's volume.
    small, lesions, inside = _sphere(4.0, spacing)
    v_lesion = inside.sum() * float(np.prod(spacing))
    assert v_lesion < 1000
    expected = (10.0 * v_lesion + 1.0 * (1000.0 - v_lesion)) / 1000.0
    (uptake,) = LesionSet(lesions, spacing, small).uptake(small)
    assert uptake.suvpeak == pytest.approx(expected, rel=0.03)
    assert uptake.suvmax == 10.0 and uptake.suvpeak < 10.0
    assert 2 * radius > 12.0


def test_suvpeak_ignores_a_hot_spot_outside_the_lesion():
    spacing = (2.0, 2.0, 2.0)
    volume, lesions, _ = _sphere(8.0, spacing, lesion=5.0)
    hot = volume.copy()
    hot[2:6, 2:6, 2:6] = 50.0  # a hot corner far from the lesion
    lesion_set = LesionSet(lesions, spacing, volume)
    assert lesion_set.uptake(hot)[0].suvpeak == pytest.approx(
        lesion_set.uptake(volume)[0].suvpeak)


def test_metrics_csv_round_trip_keeps_missing_lesion_metrics_as_nan(tmp_path):
    from fed_ndif.evaluation.compare import read_rows, write_rows
    from fed_ndif.evaluation.report import quality_table

    rows = [{"site": "a", "subject": "s1", "count_level": 0.1, "method": "input",
             "label": "Low-count input", "psnr": 30.0, "ssim": 0.9, "nmse": 0.1,
             "liver_nstd": 0.3, "full_count_liver_nstd": 0.1}]
    write_rows(tmp_path / "m.csv", rows)
    (back,) = read_rows(tmp_path / "m.csv")
    assert back["psnr"] == 30.0 and back["count_level"] == 0.1
    assert math.isnan(back["abs_suvmax_bias_pct_ge10"])
    assert "| Low-count input | – | 30.00 |" in quality_table([back], ["input"])


def test_the_lesion_background_lies_one_fwhm_outside_the_lesion():
    from scipy import ndimage

    reference, lesions = _lesion_case()
    # The lesion's uptake blurred by a 6 mm FWHM scanner spills into its surroundings.
    sigma = [6.0 / 2.355 / s for s in SPACING]
    blurred = ndimage.gaussian_filter(reference, sigma)
    distance = ndimage.distance_transform_edt(lesions == 0, sampling=SPACING)
    for fwhm in (6.0, 9.0):
        lesion_set = LesionSet(lesions, SPACING, blurred, fwhm_mm=(fwhm, fwhm, fwhm))
        (shell,) = lesion_set.shells
        assert distance.ravel()[shell].min() > fwhm and len(shell) >= 50
        (uptake,) = lesion_set.uptake(blurred)
        # Beyond one FWHM the spill-in is a few percent of the 2 SUV background at most.
        assert uptake.background_mean == pytest.approx(2.0, rel=0.06)
    ring = distance.ravel() <= 2.0
    assert blurred.ravel()[ring & (lesions.ravel() == 0)].mean() > 2.6  # what a close ring saw

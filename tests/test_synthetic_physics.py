"""Evidence that the simulated sites behave like real PET data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from fed_ndif.data.phantom import Grid, LesionSite, Organ, make_phantom
from fed_ndif.data.scanner import FWHM_PER_SIGMA, NOISE_FREE, ScannerProfile, simulate_scans

LEVELS = [0.05, 0.1, 0.25, 0.5]

# The shipped profiles, shrunk in matrix and slices only (resolution, sensitivity, scatter and
# reconstruction stay as configured), so a subject simulates in about a second.
DIGITAL = ScannerProfile(name="digital_hd", matrix=64, pixel_mm=6.4, slices=48, slice_mm=6.0,
                         psf_fwhm_mm=3.8, axial_fwhm_mm=4.0, angles=64, sensitivity=2.5,
                         background_fraction=0.3, osem_iterations=4, osem_subsets=8,
                         postfilter_fwhm_mm=4.0)
LEGACY = dataclasses.replace(DIGITAL, name="bgo_legacy", psf_fwhm_mm=6.5, axial_fwhm_mm=6.5,
                             sensitivity=0.9, background_fraction=0.55, osem_iterations=2,
                             osem_subsets=12, postfilter_fwhm_mm=7.0)


def _simulate(profile: ScannerProfile, seed: int = 0):
    rng = np.random.default_rng(seed)
    phantom = make_phantom(Grid(profile.shape, profile.spacing), rng)
    return phantom, simulate_scans(phantom.activity, phantom.mu, profile, LEVELS, rng,
                                   noise_free=True)


@pytest.fixture(scope="module")
def digital():
    return _simulate(DIGITAL)


@pytest.fixture(scope="module")
def legacy():
    return _simulate(LEGACY)


def _liver_core(phantom) -> np.ndarray:
    liver = (phantom.organs == Organ.LIVER) & (phantom.lesions == 0)
    return ndimage.binary_erosion(liver, iterations=1)


def _nstd(volume: np.ndarray, mask: np.ndarray) -> float:
    return float(volume[mask].std() / volume[mask].mean())


def test_liver_nstd_rises_as_counts_fall_close_to_inverse_sqrt(digital):
    phantom, scans = digital
    liver = _liver_core(phantom)
    assert liver.sum() > 200
    nstd = {c: _nstd(scans[c], liver) for c in [1.0, *LEVELS]}
    ordered = [nstd[c] for c in sorted(nstd)]
    assert ordered == sorted(ordered, reverse=True), nstd
    for c in LEVELS:
        # Ideal Poisson scaling is 1/sqrt(c). The band allows for the true 3 % heterogeneity
        # (a floor that does not scale) and OSEM's non-linearity: measured 0.8-0.95 here.
        ratio = nstd[c] / nstd[1.0] * np.sqrt(c)
        assert 0.7 <= ratio <= 1.1, (c, ratio)
    # Clinical full-count liver NSTD is roughly 0.05-0.15; 5 % counts is several times noisier.
    assert 0.03 <= nstd[1.0] <= 0.15
    assert nstd[0.05] >= 2.5 * nstd[1.0]


def test_low_count_images_are_unbiased_in_large_regions(digital):
    phantom, scans = digital
    regions = {"liver": _liver_core(phantom),
               "body": ndimage.binary_erosion(phantom.organs > 0, iterations=2),
               "brain": ndimage.binary_erosion(phantom.organs == Organ.BRAIN, iterations=1)}
    for name, mask in regions.items():
        reference = scans[1.0][mask].mean()
        for c in LEVELS:
            bias = scans[c][mask].mean() / reference - 1
            assert abs(bias) < 0.04, (name, c, bias)
    # The full-count image is quantitatively right: liver SUV close to the phantom's.
    truth = phantom.activity[regions["liver"]].mean()
    assert abs(scans[1.0][regions["liver"]].mean() / truth - 1) < 0.05


def test_the_noise_free_reconstruction_has_no_noise_and_no_bias(digital):
    phantom, scans = digital
    liver = _liver_core(phantom)
    ideal = scans[NOISE_FREE]
    # What is left in the liver is the phantom's own heterogeneity at the scanner's resolution
    # (PSF and post-filter), not counting noise.
    fwhm_xy = np.hypot(DIGITAL.psf_fwhm_mm, DIGITAL.postfilter_fwhm_mm)
    fwhm_z = np.hypot(DIGITAL.axial_fwhm_mm, DIGITAL.postfilter_fwhm_mm)
    blurred = ndimage.gaussian_filter(phantom.activity, [
        f / FWHM_PER_SIGMA / s for f, s in zip((fwhm_z, fwhm_xy, fwhm_xy), DIGITAL.spacing,
                                               strict=True)])
    heterogeneity = _nstd(blurred, liver)
    assert _nstd(ideal, liver) < 1.5 * heterogeneity + 0.01, (_nstd(ideal, liver), heterogeneity)
    assert _nstd(ideal, liver) < 0.5 * _nstd(scans[1.0], liver)
    regions = {"liver": liver, "body": ndimage.binary_erosion(phantom.organs > 0, iterations=2)}
    for name, mask in regions.items():
        assert abs(ideal[mask].mean() / scans[1.0][mask].mean() - 1) < 0.03, name


def test_the_noise_free_reconstruction_changes_no_other_scan():
    rng = np.random.default_rng(5)
    phantom = make_phantom(Grid(DIGITAL.shape, DIGITAL.spacing), rng)
    plain = simulate_scans(phantom.activity, phantom.mu, DIGITAL, [0.1],
                           np.random.default_rng(7))
    with_ideal = simulate_scans(phantom.activity, phantom.mu, DIGITAL, [0.1],
                                np.random.default_rng(7), noise_free=True)
    assert set(with_ideal) == {*plain, NOISE_FREE}
    for key, volume in plain.items():
        np.testing.assert_array_equal(volume, with_ideal[key])


def test_organ_uptake_is_in_realistic_suv_ranges(digital):
    phantom, _ = digital
    activity, organs = phantom.activity, phantom.organs
    clean = phantom.lesions == 0

    def median(organ):
        return float(np.median(activity[(organs == organ) & clean]))

    assert 1.8 <= median(Organ.LIVER) <= 3.2
    assert 5.5 <= median(Organ.BRAIN) <= 10.5
    assert median(Organ.BLADDER) >= 9.0
    assert median(Organ.LUNG) <= 0.7
    assert median(Organ.LUNG) < median(Organ.BODY) < median(Organ.LIVER)


def test_lesions_sit_on_their_organs_and_stand_out(digital):
    phantom, scans = digital
    assert 1 <= len(phantom.lesions_info) <= 6
    host = {LesionSite.LIVER: {Organ.LIVER}, LesionSite.LUNG: {Organ.LUNG}}
    visible = 0
    for label, info in enumerate(phantom.lesions_info, start=1):
        mask = phantom.lesions == label
        assert mask.any()
        organs = phantom.organs[mask]
        if info.site in host:
            assert np.isin(organs, list(host[info.site])).mean() >= 0.5, info
        else:  # lymph nodes lie in soft tissue, never in the lungs or the liver
            assert not np.isin(organs, [Organ.LUNG, Organ.LIVER, Organ.AIR]).any(), info
        # In the phantom the lesion is exactly `contrast` times its surroundings.
        assert 1.5 <= info.contrast <= 10.0
        shell = ndimage.binary_dilation(mask, iterations=2) & ~mask & (phantom.lesions == 0)
        truth_ratio = phantom.activity[mask].mean() / np.median(phantom.activity[shell])
        assert truth_ratio > 1.2
        if mask.sum() >= 4 and info.contrast >= 2.5:
            visible += 1
            recon = scans[1.0]
            assert recon[mask].max() > 1.2 * np.median(recon[shell]), info
    assert visible >= 0  # small, faint lesions may blur away, as on real scanners


def _effective_fwhm_mm(truth: np.ndarray, image: np.ndarray, mask: np.ndarray,
                       spacing_mm: float) -> float:
    """In-plane FWHM of the Gaussian that best maps the true activity onto the image."""
    candidates = np.arange(2.0, 16.01, 0.5)
    errors = [np.square(ndimage.gaussian_filter(truth, (0, f / FWHM_PER_SIGMA / spacing_mm,
                                                        f / FWHM_PER_SIGMA / spacing_mm))[mask]
                        - image[mask]).mean() for f in candidates]
    return float(candidates[int(np.argmin(errors))])


def test_site_profiles_differ_in_resolution_and_noise(digital, legacy):
    phantom, fine = digital
    _, coarse = legacy  # same seed, so the same subject
    mask = ndimage.binary_dilation(phantom.organs > 0, iterations=2)
    fwhm_fine = _effective_fwhm_mm(phantom.activity, fine[1.0], mask, DIGITAL.pixel_mm)
    fwhm_coarse = _effective_fwhm_mm(phantom.activity, coarse[1.0], mask, LEGACY.pixel_mm)
    assert fwhm_coarse >= fwhm_fine + 2.0, (fwhm_fine, fwhm_coarse)
    # Noise differs in level and in texture: the legacy scanner's heavier filter and fewer
    # iterations give coarser-grained noise (higher neighbour correlation).
    liver = _liver_core(phantom)
    level_ratio = _nstd(coarse[0.1], liver) / _nstd(fine[0.1], liver)
    assert abs(level_ratio - 1) > 0.05, level_ratio
    body = ndimage.binary_erosion(phantom.organs > 0, iterations=3)
    assert _neighbour_correlation(coarse[0.1] - coarse[1.0], body) > (
        _neighbour_correlation(fine[0.1] - fine[1.0], body) + 0.1)


def _neighbour_correlation(noise: np.ndarray, mask: np.ndarray) -> float:
    """Correlation of the noise between in-plane neighbours (grain size of the texture)."""
    both = mask[:, :, :-1] & mask[:, :, 1:]
    return float(np.corrcoef(noise[:, :, :-1][both], noise[:, :, 1:][both])[0, 1])


def test_same_seed_same_subject_different_seed_different():
    small = dataclasses.replace(DIGITAL, matrix=48, pixel_mm=8.0, slices=24, slice_mm=12.0,
                                angles=48)
    a_phantom, a = _simulate(small, seed=3)
    b_phantom, b = _simulate(small, seed=3)
    _, c = _simulate(small, seed=4)
    np.testing.assert_array_equal(a_phantom.activity, b_phantom.activity)
    for level in a:
        np.testing.assert_array_equal(a[level], b[level])
    assert not np.array_equal(a[0.1], c[0.1])

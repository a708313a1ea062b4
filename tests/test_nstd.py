"""Liver NSTD: the automatic liver VOI against the phantom's liver mask."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from scipy import ndimage

from fed_ndif.data import nstd as nstd_module
from fed_ndif.data.nstd import find_liver_voi, liver_nstd, measure_liver_nstd
from fed_ndif.data.phantom import Grid, Organ, make_phantom
from fed_ndif.data.scanner import ScannerProfile, simulate_scans
from fed_ndif.data.volume import Volume, affine_from_lps, axial_affine
from fed_ndif.errors import FedNdifError

# Coarse but whole-body long (160 x 6 mm): the phantom scales its anatomy with the axial field of
# view, so a short scan squeezes the liver to a few slices packed against heart and kidneys.
PROFILE = ScannerProfile(
    name="test", matrix=64, pixel_mm=6.25, slices=160, slice_mm=6.0, psf_fwhm_mm=6.5,
    axial_fwhm_mm=6.5, angles=64, sensitivity=1.5, background_fraction=0.4, osem_iterations=2,
    osem_subsets=8, postfilter_fwhm_mm=6.0,
)
LOW_COUNTS = (0.1, 0.25)


@functools.lru_cache(maxsize=4)
def _subject(seed: int):
    rng = np.random.default_rng(seed)
    phantom = make_phantom(Grid(PROFILE.shape, PROFILE.spacing), rng)
    scans = simulate_scans(phantom.activity, phantom.mu, PROFILE, list(LOW_COUNTS), rng)
    affine = axial_affine(shape_zyx=PROFILE.shape, spacing_zyx=PROFILE.spacing)
    # The reference liver mask leaves lesions out, as a reader would.
    liver = (phantom.organs == Organ.LIVER) & (phantom.lesions == 0)
    return phantom, {level: Volume(scan, affine) for level, scan in scans.items()}, liver


def _check_subject(seed: int) -> None:
    phantom, volumes, liver = _subject(seed)
    for level in LOW_COUNTS:
        volume = volumes[level]
        auto, how = measure_liver_nstd(volume)
        reference, how_mask = measure_liver_nstd(volume, liver)
        assert how_mask == "liver mask" and how.startswith("automatic liver VOI at (")
        assert auto == pytest.approx(reference, rel=0.10), (seed, level)
        voi = find_liver_voi(volume)
        assert (phantom.organs[voi] == Organ.LIVER).mean() > 0.9
        # At least a 3 cm sphere's worth of voxels.
        assert voi.sum() * np.prod(PROFILE.spacing) >= 4 / 3 * np.pi * 15.0**3


def test_automatic_nstd_matches_mask_nstd():
    _check_subject(0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_automatic_nstd_matches_mask_nstd_more_subjects(seed):
    _check_subject(seed)


def test_patient_right_comes_from_the_affine():
    """The same image stored with flipped x and reversed slices gives the same voxels."""
    _, volumes, _ = _subject(0)
    volume = volumes[0.1]
    voi = find_liver_voi(volume)
    nz, ny, nx = volume.array.shape
    dz, dy, dx = volume.spacing
    # Columns now run to the patient's right (LPS -x), slices run inferior.
    origin = np.array([(nx - 1) / 2 * dx, -(ny - 1) / 2 * dy, (nz - 1) * dz])
    flipped_affine = affine_from_lps(origin_lps=origin, row_dir=np.array([-1.0, 0, 0]),
                                     col_dir=np.array([0, 1.0, 0]),
                                     slice_dir=np.array([0, 0, -1.0]),
                                     spacing_zyx=(dz, dy, dx))
    flipped = Volume(volume.array[::-1, :, ::-1], flipped_affine)
    np.testing.assert_array_equal(find_liver_voi(flipped), voi[::-1, :, ::-1])
    # The VOI lies on the patient's right, wherever that is in the array.
    centre_x = (volume.affine @ np.array([np.nonzero(voi)[2].mean(), 0, 0, 1]))[0]
    assert centre_x > 0  # RAS: +x is the patient's right


def test_mask_nstd_and_errors():
    volume = Volume(np.zeros((20, 32, 32), np.float32),
                    axial_affine(shape_zyx=(20, 32, 32), spacing_zyx=(5.0, 6.0, 6.0)))
    with pytest.raises(FedNdifError, match="no body found"):
        measure_liver_nstd(volume)
    rng = np.random.default_rng(0)
    array = rng.normal(2.0, 0.2, (10, 12, 12)).astype(np.float32)
    mask = np.zeros(array.shape, bool)
    mask[2:8, 3:9, 3:9] = True
    value, how = measure_liver_nstd(Volume(array, np.eye(4)), mask)
    assert how == "liver mask" and value == pytest.approx(liver_nstd(array, mask))
    with pytest.raises(FedNdifError, match="does not match"):
        measure_liver_nstd(Volume(array, np.eye(4)), mask[:5])


@pytest.mark.parametrize("touches_edge", [False, True])
def test_hole_filling_and_depth_on_the_masks_box_equal_the_whole_array(touches_edge):
    rng = np.random.default_rng(3)
    mask = np.zeros((30, 40, 20), bool)
    mask[5:20, 8:30, 4:15] = ndimage.gaussian_filter(rng.random((15, 22, 11)), 1.0) > 0.5
    mask[10:14, 15:20, 8] = False  # a hole to fill
    if touches_edge:
        mask[:3, :5, :2] = True
    spacing = np.array([2.0, 3.0, 4.0])
    expected_fill = np.stack([ndimage.binary_fill_holes(mask[:, :, k])
                              for k in range(mask.shape[2])], axis=2)
    np.testing.assert_array_equal(nstd_module._fill_axial(mask), expected_fill)
    np.testing.assert_array_equal(nstd_module._depth(mask, spacing),
                                  ndimage.distance_transform_edt(mask, sampling=spacing))


def _body_and_voi(*, x: slice, z: slice, suv: float = 2.0, length: int = 40):
    """Canonical (x to the patient's right, y, z up) body box of 40 x 30 x ``length`` voxels of
    5 mm, and a VOI box in it."""
    shape = (40, 30, length)
    canon = np.full(shape, 1.0, np.float32)
    body = np.ones(shape, bool)
    voi = np.zeros(shape, bool)
    voi[x, 10:20, z] = True
    canon[voi] = suv
    return canon, voi, body, np.array([5.0, 5.0, 5.0])


def test_a_plausible_voi_passes_the_check():
    # Right of the midline (x index 20 is the middle), 1000 voxels of 0.125 ml: 125 ml.
    nstd_module.check_liver_voi(*_body_and_voi(x=slice(24, 34), z=slice(20, 30)),
                                lung_base=None)


@pytest.mark.parametrize("case, message", [
    ({"x": slice(4, 14), "z": slice(20, 30)}, "mm to the patient's left of the body's midline"),
    ({"x": slice(24, 34), "z": slice(20, 30), "suv": 9.0}, "mean SUV 9.00 is outside"),
    ({"x": slice(24, 25), "z": slice(20, 22)}, "it holds 2.5 ml"),
    ({"x": slice(24, 34), "z": slice(5, 15), "length": 160}, "it lies in the lower"),
])
def test_an_implausible_voi_is_refused_in_one_line(case, message):
    with pytest.raises(FedNdifError) as caught:
        nstd_module.check_liver_voi(*_body_and_voi(**case), lung_base=None)
    text = str(caught.value)
    assert message in text and "\n" not in text
    assert text.endswith("pass a liver mask (--liver-mask) or the noise level (--nstd)")


def test_implausible_nstd_is_refused():
    nstd_module.check_nstd(0.2, "automatic liver VOI")
    for value in (0.001, 1.5, float("nan")):
        with pytest.raises(FedNdifError, match="is implausible"):
            nstd_module.check_nstd(value, "automatic liver VOI")


def test_a_body_without_liver_uptake_is_refused_and_a_mask_overrides():
    """No liver to find (its uptake gone): the finder settles on a region left of the midline,
    far below the right lung (with a noise level of 0.2-0.4, as a liver's would be); the
    check refuses it in one line, and the user's mask still gives an NSTD."""
    phantom, volumes, liver = _subject(1)
    array = volumes[0.25].array.copy()
    array[phantom.organs == Organ.LIVER] *= 0.2
    cold = Volume(array, volumes[0.25].affine)
    with pytest.raises(FedNdifError) as caught:
        measure_liver_nstd(cold)
    text = str(caught.value)
    assert text.startswith("automatic liver VOI is implausible") and "\n" not in text
    assert "to the patient's left" in text and "below the base of the right lung" in text
    value, how = measure_liver_nstd(cold, liver)
    assert how == "liver mask" and 0 < value < 1

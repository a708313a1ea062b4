"""Reading PET DICOM series: geometry, SUV rules, hostile folders, and `fed-ndif convert`."""

from __future__ import annotations

import math
import shutil

import nibabel as nib
import numpy as np
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from fed_ndif.cli import main
from fed_ndif.data.dicom import read_pet_series
from fed_ndif.data.nifti import load_nifti
from fed_ndif.errors import FedNdifError
from tests.helpers.dicom_factory import (
    F18,
    SeriesSpec,
    make_ct_series,
    make_series,
    suv_factor_start,
)

HOUR = 3600.0


def _world_lps(affine: np.ndarray, k: int, j: int, i: int) -> np.ndarray:
    ras = affine @ np.array([i, j, k, 1.0])
    return ras[:3] * np.array([-1.0, -1.0, 1.0])


def _check_geometry_and_values(volume, made, factor: float) -> None:
    """Each source slice, found by its world position, holds its own rescaled values."""
    spec = made.spec
    iop = np.asarray(spec.iop, float)
    row, col = iop[:3], iop[3:]
    dy, dx = spec.pixel_mm
    for pos, values in zip(made.positions, made.bqml, strict=True):
        matches = [k for k in range(volume.array.shape[0])
                   if np.allclose(_world_lps(volume.affine, k, 0, 0), pos, atol=1e-3)]
        assert len(matches) == 1
        k = matches[0]
        for j, i in [(0, 0), (spec.ny - 1, 0), (0, spec.nx - 1), (3, 5)]:
            expected = pos + i * dx * row + j * dy * col
            np.testing.assert_allclose(_world_lps(volume.affine, k, j, i), expected, atol=1e-3)
        np.testing.assert_allclose(volume.array[k], values * factor, rtol=1e-5, atol=1e-6)


# -- correct handling --------------------------------------------------------------------------


def test_reads_suv_start_by_hand(tmp_path):
    made = make_series(tmp_path / "pet")
    volume, info = read_pet_series(tmp_path)
    # SeriesTime 10:00, injection 09:00: 70 kg, 370 MBq decayed over one hour.
    factor = 70_000.0 / (370e6 * 2 ** (-HOUR / F18))
    assert info.suv_factor == pytest.approx(factor, rel=1e-9)
    assert volume.array.dtype == np.float32 and volume.array.shape == (6, 8, 10)
    assert volume.spacing == pytest.approx((3.0, 4.0, 3.5))
    _check_geometry_and_values(volume, made, factor)
    assert info.decay_correction == "START"
    assert info.study_uid == made.spec.study_uid
    assert info.frame_of_reference_uid == made.spec.frame_uid
    assert "PixelData" not in info.template


def test_slice_order_ignores_file_names_and_instance_numbers(tmp_path):
    perm = [3, 0, 5, 1, 4, 2]
    made = make_series(tmp_path / "pet", names=lambda k: f"img{perm[k]:02d}.dcm",
                       instance_numbers=lambda k: 10 - perm[k])
    volume, _ = read_pet_series(tmp_path)
    factor = suv_factor_start(made.spec, HOUR)
    for k in range(6):  # sorted by position along the normal
        np.testing.assert_allclose(volume.array[k], made.bqml[k] * factor, rtol=1e-5)
    _check_geometry_and_values(volume, made, factor)


@pytest.mark.parametrize("iop", [(-1, 0, 0, 0, -1, 0), (1, 0, 0, 0, -1, 0), (0, 1, 0, 1, 0, 0)])
def test_flipped_and_transposed_axial_orientations(tmp_path, iop):
    made = make_series(tmp_path, SeriesSpec(iop=iop))
    volume, _ = read_pet_series(tmp_path)
    _check_geometry_and_values(volume, made, suv_factor_start(made.spec, HOUR))


def test_admin_decay_correction_uses_undecayed_dose(tmp_path):
    made = make_series(tmp_path, SeriesSpec(decay="ADMIN", injection_time=None))
    volume, info = read_pet_series(tmp_path)
    assert info.suv_factor == pytest.approx(70_000.0 / 370e6, rel=1e-9)
    np.testing.assert_allclose(volume.array, made.bqml * 70_000.0 / 370e6, rtol=1e-5)


@pytest.mark.parametrize("injection", [{"injection_time": "233000"},
                                       {"injection_datetime": "20240115233000",
                                        "injection_time": "233000"}])
def test_injection_before_midnight_scan_after(tmp_path, injection):
    spec = SeriesSpec(series_date="20240116", series_time="003000", **injection)
    made = make_series(tmp_path, spec)
    _, info = read_pet_series(tmp_path)
    assert info.suv_factor == pytest.approx(suv_factor_start(made.spec, HOUR), rel=1e-9)


def test_decay_none_corrects_each_slice_by_its_acquisition_time(tmp_path):
    times = ["100000", "100000", "100200", "100200", "100400", "100400"]
    made = make_series(tmp_path, SeriesSpec(decay="NONE", acquisition_times=times,
                                            frame_duration_ms=120_000))
    volume, info = read_pet_series(tmp_path)
    lam = math.log(2) / F18
    in_frame = (1 - math.exp(-lam * 120)) / (lam * 120)
    for k, t in enumerate(times):
        elapsed = HOUR + 60 * (int(t[2:4]) - 0)
        factor = 70_000.0 / (370e6 * 2 ** (-elapsed / F18) * in_frame)
        assert info.suv_factors[k] == pytest.approx(factor, rel=1e-9)
        np.testing.assert_allclose(volume.array[k], made.bqml[k] * factor, rtol=1e-5)


def test_series_time_after_acquisition_uses_acquisition_time(tmp_path):
    # A series re-created after the scan: SeriesTime 11:00, acquisition started at 10:00.
    made = make_series(tmp_path, SeriesSpec(series_time="110000",
                                            acquisition_times=["100000"] * 6))
    _, info = read_pet_series(tmp_path)
    assert info.suv_factor == pytest.approx(suv_factor_start(made.spec, HOUR), rel=1e-9)


def test_weight_and_dose_supplied_by_the_user(tmp_path):
    made = make_series(tmp_path, SeriesSpec(weight_kg=None, dose_bq=None))
    _, info = read_pet_series(tmp_path, patient_weight_kg=80.0, injected_dose_bq=300e6)
    expected = 80_000.0 / (300e6 * 2 ** (-HOUR / F18))
    assert info.suv_factor == pytest.approx(expected, rel=1e-9)
    assert (info.weight_kg, info.injected_dose_bq) == (80.0, 300e6)
    assert made.spec.weight_kg is None


def test_rescale_intercept_applied_per_slice(tmp_path):
    made = make_series(tmp_path, SeriesSpec(intercepts=[0, 10, -5, 0, 2.5, 100]))
    volume, _ = read_pet_series(tmp_path)
    np.testing.assert_allclose(volume.array, made.bqml * suv_factor_start(made.spec, HOUR),
                               rtol=1e-5)


def test_other_series_and_stray_files_are_ignored(tmp_path):
    made = make_series(tmp_path / "a" / "b" / "pet")
    make_ct_series(tmp_path / "ct")
    (tmp_path / "notes.txt").write_text("not dicom\n")
    (tmp_path / "a" / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "a" / "empty").write_bytes(b"")
    shutil.copy(made.paths[2], tmp_path / "a" / "copy-of-slice-2.dcm")  # same SOPInstanceUID
    volume, _ = read_pet_series(tmp_path)
    assert volume.array.shape == (6, 8, 10)


def test_picks_named_series_among_two(tmp_path):
    first = make_series(tmp_path / "one", SeriesSpec(description="PET AC"))
    make_series(tmp_path / "two", SeriesSpec(description="PET NAC", nz=4))
    volume, info = read_pet_series(tmp_path, series_uid=first.spec.series_uid)
    assert info.series_uid == first.spec.series_uid and volume.array.shape[0] == 6


# -- hostile input: one clear error naming the problem ---------------------------------------


def test_empty_folder(tmp_path):
    with pytest.raises(FedNdifError, match="empty"):
        read_pet_series(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(FedNdifError, match="no such folder"):
        read_pet_series(tmp_path / "nope")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(FedNdifError, match="none of its 1 files is a DICOM"):
        read_pet_series(tmp_path)


def test_no_pet_series_only_ct(tmp_path):
    make_ct_series(tmp_path)
    with pytest.raises(FedNdifError, match=r"no PET series.*CT \(1 series\)"):
        read_pet_series(tmp_path)


def test_pt_secondary_capture_is_not_a_pet_image(tmp_path):
    make_series(tmp_path, SeriesSpec(sop_class=str(SecondaryCaptureImageStorage)))
    with pytest.raises(FedNdifError, match=r"no PET series.*Secondary Capture"):
        read_pet_series(tmp_path)


def test_two_pet_series_listed(tmp_path):
    a = make_series(tmp_path / "a", SeriesSpec(description="PET AC"))
    b = make_series(tmp_path / "b", SeriesSpec(description="PET NAC"))
    with pytest.raises(FedNdifError, match="2 PET series") as err:
        read_pet_series(tmp_path)
    for made in (a, b):
        assert made.spec.series_uid in str(err.value)
    assert "PET NAC" in str(err.value) and "--series-uid" in str(err.value)
    with pytest.raises(FedNdifError, match=r"no PET series with SeriesInstanceUID 1.2.3"):
        read_pet_series(tmp_path, series_uid="1.2.3")


def test_missing_patient_weight(tmp_path):
    make_series(tmp_path, SeriesSpec(weight_kg=None))
    with pytest.raises(FedNdifError, match=r"PatientWeight \(0010,1030\).*--weight KG"):
        read_pet_series(tmp_path)


def test_missing_dose(tmp_path):
    make_series(tmp_path, SeriesSpec(dose_bq=None))
    with pytest.raises(FedNdifError, match=r"RadionuclideTotalDose.*--dose MBQ"):
        read_pet_series(tmp_path)


def test_missing_injection_time(tmp_path):
    make_series(tmp_path, SeriesSpec(injection_time=None))
    with pytest.raises(FedNdifError, match="RadiopharmaceuticalStartTime"):
        read_pet_series(tmp_path)


def test_missing_half_life(tmp_path):
    make_series(tmp_path, SeriesSpec(half_life_s=None))
    with pytest.raises(FedNdifError, match="RadionuclideHalfLife"):
        read_pet_series(tmp_path)


def test_injection_after_scan(tmp_path):
    make_series(tmp_path, SeriesSpec(injection_datetime="20240115110000"))
    with pytest.raises(FedNdifError, match=r"injection time is 60.0 min after the scan start"):
        read_pet_series(tmp_path)


@pytest.mark.parametrize("units", ["CNTS", "PROPCNTS", None])
def test_units_that_cannot_become_suv(tmp_path, units):
    make_series(tmp_path, SeriesSpec(units=units))
    with pytest.raises(FedNdifError, match=f"Units \\(0054,1001\\) is {units or 'missing'}"):
        read_pet_series(tmp_path)


def test_unknown_decay_correction(tmp_path):
    make_series(tmp_path, SeriesSpec(decay="SOMETIME"))
    with pytest.raises(FedNdifError, match=r"DecayCorrection .* is SOMETIME"):
        read_pet_series(tmp_path)


def test_inconsistent_orientation(tmp_path):
    def edit(k, ds):
        if k == 3:
            ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
    make_series(tmp_path, edit=edit)
    with pytest.raises(FedNdifError, match=r"inconsistent ImageOrientationPatient.*slice003"):
        read_pet_series(tmp_path)


def test_inconsistent_pixel_spacing(tmp_path):
    def edit(k, ds):
        if k == 2:
            ds.PixelSpacing = [4.0, 4.0]
    make_series(tmp_path, edit=edit)
    with pytest.raises(FedNdifError, match="inconsistent PixelSpacing"):
        read_pet_series(tmp_path)


def test_duplicated_slice_position(tmp_path):
    def edit(k, ds):
        if k == 4:
            ds.ImagePositionPatient = [-17.5, -14.0, -91.0]  # = slice 3
    make_series(tmp_path, edit=edit)
    with pytest.raises(FedNdifError, match="duplicated slice position"):
        read_pet_series(tmp_path)


def test_missing_slice(tmp_path):
    made = make_series(tmp_path)
    made.paths[2].unlink()
    with pytest.raises(FedNdifError, match=r"missing slice.*gap of 6.00 mm"):
        read_pet_series(tmp_path)


def test_uneven_spacing(tmp_path):
    def edit(k, ds):
        if k == 3:
            ds.ImagePositionPatient = [-17.5, -14.0, -90.5]  # 0.5 mm off
    make_series(tmp_path, edit=edit)
    with pytest.raises(FedNdifError, match="uneven slice spacing"):
        read_pet_series(tmp_path)


def test_truncated_pixel_data_names_the_file(tmp_path):
    made = make_series(tmp_path)
    data = made.paths[3].read_bytes()
    made.paths[3].write_bytes(data[:-50])
    with pytest.raises(FedNdifError, match=r"slice003.dcm: pixel data cannot be read"):
        read_pet_series(tmp_path)


def test_truncated_header_names_the_file(tmp_path):
    made = make_series(tmp_path)
    data = made.paths[1].read_bytes()
    made.paths[1].write_bytes(data[:300])
    with pytest.raises(FedNdifError, match=r"slice001.dcm: a PET DICOM file that is truncated"):
        read_pet_series(tmp_path)


@pytest.mark.parametrize("iop", [(1, 0, 0, 0, 0.9962, -0.0872),  # 5 degree gantry tilt
                                 (0, 1, 0, 0, 0, -1),  # sagittal
                                 (1, 0, 0, 0, 0, -1)])  # coronal
def test_oblique_or_non_axial_refused(tmp_path, iop):
    make_series(tmp_path, SeriesSpec(iop=iop))
    with pytest.raises(FedNdifError, match=r"not axial.*only axial PET series are supported"):
        read_pet_series(tmp_path)


def test_single_slice_refused(tmp_path):
    make_series(tmp_path, SeriesSpec(nz=1))
    with pytest.raises(FedNdifError, match="only 1 image"):
        read_pet_series(tmp_path)


def test_nifti_with_broken_affine(tmp_path):
    path = tmp_path / "broken.nii.gz"
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header.set_data_dtype(np.float32)
    header["sform_code"], header["qform_code"] = 1, 0
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = [0, 0, 0, 0]
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None, header=header), path)
    with pytest.raises(FedNdifError, match="affine is singular"):
        load_nifti(path)


# -- fed-ndif convert --------------------------------------------------------------------------


def test_convert_end_to_end(tmp_path):
    made = make_series(tmp_path / "dicom", names=lambda k: f"x{(k * 7) % 6}.dcm")
    out = tmp_path / "out" / "pet.nii.gz"
    assert main(["convert", str(tmp_path / "dicom"), str(out)]) == 0
    volume, _ = read_pet_series(tmp_path / "dicom")
    nifti = load_nifti(out)
    np.testing.assert_allclose(nifti.affine, volume.affine, atol=1e-5)
    np.testing.assert_allclose(nifti.array, volume.array, rtol=1e-6)
    _check_geometry_and_values(nifti, made, suv_factor_start(made.spec, HOUR))
    # An existing output is refused unless --overwrite.
    assert main(["convert", str(tmp_path / "dicom"), str(out)]) == 2
    assert main(["convert", str(tmp_path / "dicom"), str(out), "--overwrite"]) == 0


def test_convert_weight_and_dose_options(tmp_path):
    make_series(tmp_path / "dicom", SeriesSpec(weight_kg=None, dose_bq=None))
    out = tmp_path / "pet.nii.gz"
    assert main(["convert", str(tmp_path / "dicom"), str(out), "--weight", "80",
                 "--dose", "300"]) == 0
    volume, _ = read_pet_series(tmp_path / "dicom", patient_weight_kg=80,
                                injected_dose_bq=300e6)
    np.testing.assert_allclose(load_nifti(out).array, volume.array, rtol=1e-6)


@pytest.mark.parametrize("case", ["missing_weight", "two_series", "empty", "bad_weight"])
def test_convert_bad_input_one_line_nothing_written(tmp_path, capsys, case):
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    extra = []
    if case == "missing_weight":
        make_series(dicom, SeriesSpec(weight_kg=None))
    elif case == "two_series":
        make_series(dicom / "a")
        make_series(dicom / "b")
    elif case == "bad_weight":
        make_series(dicom)
        extra = ["--weight", "-3"]
    out = tmp_path / "out.nii.gz"
    capsys.readouterr()
    assert main(["convert", str(dicom), str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fed-ndif convert: error: ")
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dicom"]

"""Writing derived PET series: round trip, UIDs, atomicity, dciodvfy and dcm2niix."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from fed_ndif.data.dicom import SyntheticPatient, read_pet_series, write_pet_series
from fed_ndif.data.dicom.series import PET_IMAGE_STORAGE
from fed_ndif.data.volume import Volume, axial_affine
from fed_ndif.errors import FedNdifError
from tests.helpers.dicom_factory import SeriesSpec, make_series
from tests.helpers.tools import require_tool


def _synthetic_volume(shape=(6, 16, 20), spacing=(3.0, 4.0, 3.5), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.gamma(2.0, 1.0, shape).astype(np.float32)
    array[0, 0, :3] = [-0.05, 0.0, 25.0]  # small negatives survive, one hot voxel
    return Volume(array, axial_affine(shape_zyx=shape, spacing_zyx=spacing, z_origin_mm=-80.0))


def _patient() -> SyntheticPatient:
    return SyntheticPatient("SYN-0001", weight_kg=72.5, injected_dose_bq=350e6)


def _quantization_bound(array: np.ndarray) -> np.ndarray:
    """Half a quantization step per slice (slope = max|slice| / 32767), plus float32 slack."""
    peak = np.abs(array).reshape(array.shape[0], -1).max(axis=1)
    return (peak / 32767 * 0.5 + 1e-5 * peak + 1e-7)[:, None, None]


def _files(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


@pytest.fixture
def source(tmp_path):
    """A hand-made source series read back: (volume, info, folder)."""
    folder = tmp_path / "source"
    make_series(folder, SeriesSpec(nz=5, ny=12, nx=14))
    volume, info = read_pet_series(folder)
    return volume, info, folder


def test_synthetic_round_trip(tmp_path):
    volume = _synthetic_volume()
    out = write_pet_series(volume, tmp_path / "syn", template=None,
                           series_description="synthetic full count",
                           derivation_description="simulated by fed-ndif",
                           synthetic_patient=_patient())
    back, info = read_pet_series(out)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-6)
    assert np.all(np.abs(back.array - volume.array) <= _quantization_bound(volume.array))
    assert back.array[0, 0, 0] < 0
    assert info.suv_factor == pytest.approx(_patient().suv_factor, rel=1e-9)
    datasets = _files(out)
    assert len(datasets) == 6 and len({d.SOPInstanceUID for d in datasets}) == 6
    first = datasets[0]
    assert first.SOPClassUID == PET_IMAGE_STORAGE
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY"] and first.Units == "BQML"
    assert first.PixelRepresentation == 1 and first.BitsAllocated == 16
    assert "PatientPosition" not in first and "RescaleType" not in first
    for d in datasets:
        assert float(d.RescaleIntercept) == 0
        assert len(str(d.RescaleSlope)) <= 16


def test_derived_series_keeps_study_and_decay_reference(source, tmp_path):
    volume, info, folder = source
    denoised = Volume(volume.array * 0.9, volume.affine)
    out = write_pet_series(denoised, tmp_path / "derived", template=info,
                           series_description="fed-ndif denoised",
                           derivation_description="denoised by fed-ndif 2.5D diffusion model")
    derived = _files(out)
    source_files = _files(folder)
    src = source_files[0]
    assert {d.StudyInstanceUID for d in derived} == {src.StudyInstanceUID}
    assert {d.FrameOfReferenceUID for d in derived} == {src.FrameOfReferenceUID}
    assert {d.SeriesInstanceUID for d in derived}.isdisjoint({src.SeriesInstanceUID})
    assert len({d.SeriesInstanceUID for d in derived}) == 1
    source_sops = {d.SOPInstanceUID for d in source_files}
    assert {d.SOPInstanceUID for d in derived}.isdisjoint(source_sops)
    for d in derived:
        assert (d.SeriesDate, d.SeriesTime) == (src.SeriesDate, src.SeriesTime)
        assert (d.AcquisitionDate, d.AcquisitionTime) == (src.AcquisitionDate,
                                                          src.AcquisitionTime)
        assert list(d.ImageType)[:2] == ["DERIVED", "PRIMARY"]
        assert d.SeriesDescription == "fed-ndif denoised"
        assert d.DerivationDescription.startswith("denoised by fed-ndif")
        assert d.SourceImageSequence[0].ReferencedSOPInstanceUID in source_sops
    back, back_info = read_pet_series(out)
    assert back_info.suv_factor == pytest.approx(info.suv_factor, rel=1e-9)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-6)
    assert np.all(np.abs(back.array - denoised.array) <= _quantization_bound(denoised.array))


def test_decay_none_source_round_trip(tmp_path):
    times = ["100000", "100100", "100200", "100300", "100400"]
    make_series(tmp_path / "src", SeriesSpec(nz=5, decay="NONE", acquisition_times=times,
                                             frame_duration_ms=60_000))
    volume, info = read_pet_series(tmp_path / "src")
    assert np.ptp(info.suv_factors) > 0
    out = write_pet_series(volume, tmp_path / "out", template=info, series_description="d",
                           derivation_description="d")
    back, back_info = read_pet_series(out)
    np.testing.assert_allclose(back_info.suv_factors, info.suv_factors, rtol=1e-12)
    assert np.all(np.abs(back.array - volume.array) <= _quantization_bound(volume.array))


def test_supplied_weight_is_recorded_in_derived_series(tmp_path):
    make_series(tmp_path / "src", SeriesSpec(nz=3, weight_kg=None))
    volume, info = read_pet_series(tmp_path / "src", patient_weight_kg=64.0)
    out = write_pet_series(volume, tmp_path / "out", template=info, series_description="d",
                           derivation_description="d")
    back, _ = read_pet_series(out)  # no weight needed any more
    assert np.all(np.abs(back.array - volume.array) <= _quantization_bound(volume.array))


def test_flipped_geometry_round_trip(tmp_path):
    make_series(tmp_path / "src", SeriesSpec(nz=4, iop=(-1, 0, 0, 0, -1, 0)))
    volume, info = read_pet_series(tmp_path / "src")
    out = write_pet_series(volume, tmp_path / "out", template=info, series_description="d",
                           derivation_description="d")
    back, _ = read_pet_series(out)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-6)


def test_existing_output_refused_then_replaced(tmp_path):
    volume = _synthetic_volume()
    out = tmp_path / "series"
    out.mkdir()
    (out / "old.txt").write_text("old")
    kwargs = {"template": None, "series_description": "s", "derivation_description": "d",
              "synthetic_patient": _patient()}
    with pytest.raises(FedNdifError, match=r"exists.*overwrite"):
        write_pet_series(volume, out, **kwargs)
    assert (out / "old.txt").exists()
    write_pet_series(volume, out, overwrite=True, **kwargs)
    assert not (out / "old.txt").exists() and len(list(out.iterdir())) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]


def test_failure_midway_leaves_no_partial_output(tmp_path, monkeypatch):
    volume = _synthetic_volume()
    out = tmp_path / "series"
    out.mkdir()
    (out / "old.txt").write_text("old")
    calls = {"n": 0}
    original = pydicom.Dataset.save_as

    def failing_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pydicom.Dataset, "save_as", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_pet_series(volume, out, template=None, series_description="s",
                         derivation_description="d", synthetic_patient=_patient(),
                         overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_bad_volumes_refused(tmp_path):
    volume = _synthetic_volume()
    sheared = volume.affine.copy()
    sheared[0, 2] = 1.0
    kwargs = {"template": None, "series_description": "s", "derivation_description": "d",
              "synthetic_patient": _patient()}
    with pytest.raises(FedNdifError, match="sheared"):
        write_pet_series(Volume(volume.array, sheared), tmp_path / "a", **kwargs)
    bad = volume.array.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(FedNdifError, match="NaN"):
        write_pet_series(Volume(bad, volume.affine), tmp_path / "b", **kwargs)
    assert list(tmp_path.iterdir()) == []


def _dciodvfy_errors(tool: str, folder: Path) -> list[str]:
    problems = []
    for path in sorted(folder.iterdir()):
        run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
        problems += [f"{path.name}: {line}" for line in (run.stdout + run.stderr).splitlines()
                     if line.startswith("Error")]
    return problems


def test_dciodvfy_reports_no_errors(source, tmp_path):
    tool = require_tool("dciodvfy")
    synthetic = write_pet_series(_synthetic_volume(shape=(3, 8, 8)), tmp_path / "syn",
                                 template=None, series_description="synthetic",
                                 derivation_description="simulated",
                                 synthetic_patient=_patient())
    volume, info, _ = source
    derived = write_pet_series(volume, tmp_path / "derived", template=info,
                               series_description="denoised", derivation_description="test")
    # dciodvfy knows the PET IOD: a deliberately broken object must be reported.
    broken = pydicom.dcmread(next(synthetic.iterdir()))
    del broken.Units
    broken.save_as(tmp_path / "broken.dcm")
    run = subprocess.run([tool, str(tmp_path / "broken.dcm")], capture_output=True, text=True,
                         timeout=60)
    assert "Error" in run.stdout + run.stderr
    assert _dciodvfy_errors(tool, synthetic) == []
    assert _dciodvfy_errors(tool, derived) == []


def _dcm2niix(tool: str, folder: Path, out: Path) -> nib.Nifti1Image:
    out.mkdir()
    subprocess.run([tool, "-z", "y", "-b", "n", "-f", "converted", "-o", str(out), str(folder)],
                   check=True, capture_output=True, timeout=120)
    (path,) = out.glob("converted*.nii.gz")
    return nib.as_closest_canonical(nib.load(path))


@pytest.mark.parametrize("kind", ["synthetic", "derived"])
def test_dcm2niix_same_geometry(source, tmp_path, kind):
    tool = require_tool("dcm2niix")
    if kind == "synthetic":
        volume = _synthetic_volume(shape=(5, 12, 14))
        folder = write_pet_series(volume, tmp_path / "dcm", template=None, series_description="s",
                                  derivation_description="d", synthetic_patient=_patient())
        factor = _patient().suv_factor
    else:
        volume, info, _ = source
        folder = write_pet_series(volume, tmp_path / "dcm", template=info, series_description="s",
                                  derivation_description="d")
        factor = info.suv_factor
    converted = _dcm2niix(tool, folder, tmp_path / "nii")
    ours = nib.as_closest_canonical(
        nib.Nifti1Image(volume.array.transpose(2, 1, 0), volume.affine))
    np.testing.assert_allclose(converted.affine, ours.affine, atol=1e-3)
    theirs = np.asarray(converted.dataobj, np.float64) * factor  # dcm2niix keeps Bq/ml
    expected = np.asarray(ours.dataobj, np.float64)
    bound = np.abs(expected).max() / 32767 + 1e-4
    np.testing.assert_allclose(theirs, expected, atol=bound)

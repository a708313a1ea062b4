"""``make-sites write_dicom=true``: DICOM series per subject that read back as the NIfTI scans."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fed_ndif.cli import main
from fed_ndif.data.dicom import read_pet_series
from fed_ndif.data.nifti import load_nifti
from fed_ndif.data.sites import make_sites
from tests.helpers.tools import require_tool

SMALL = ["sites=tiny", "sites.site_a.subjects=1", "sites.site_b.subjects=1",
         "sites.site_c.subjects=1"]


@pytest.fixture(scope="module")
def dicom_sites(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sites") / "tiny"
    assert main(["make-sites", str(out), *SMALL, "write_dicom=true"]) == 0
    return out


def _series_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("site_*/sub-*/dicom/*") if p.is_dir())


def _quantization_bound(array: np.ndarray) -> np.ndarray:
    """Half a quantization step per slice (slope = max|slice| / 32767), plus float32 slack."""
    peak = np.abs(array).reshape(array.shape[0], -1).max(axis=1)
    return (peak / 32767 * 0.5 + 1e-5 * peak + 1e-6)[:, None, None]


def test_dicom_is_off_by_default(tmp_path):
    make_sites(tmp_path / "s", overrides=SMALL)
    assert not list((tmp_path / "s").glob("site_*/sub-*/dicom"))


def test_every_scan_is_a_series_that_reads_back_as_its_nifti(dicom_sites):
    subjects = sorted(dicom_sites.glob("site_*/sub-*"))
    assert len(subjects) == 3
    for subject in subjects:
        niftis = sorted(p.name.removesuffix(".nii.gz") for p in subject.glob("*_count*.nii.gz"))
        series = sorted(p.name for p in (subject / "dicom").iterdir())
        assert series == niftis  # full_count and every low_count_<N>pct
        studies, frames, uids, numbers, descriptions = set(), set(), set(), set(), set()
        for name in series:
            folder = subject / "dicom" / name
            volume, info = read_pet_series(folder)
            expected = load_nifti(subject / f"{name}.nii.gz")
            np.testing.assert_allclose(volume.affine, expected.affine, atol=1e-6)
            assert volume.array.shape == expected.array.shape
            assert np.all(np.abs(volume.array - expected.array)
                          <= _quantization_bound(expected.array))
            header = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
            assert header.Modality == "PT" and header.Units == "BQML"
            assert header.DecayCorrection == "START"
            assert float(header.PatientWeight) > 0
            assert name.replace("_", " ").split()[0] in header.SeriesDescription.lower()
            studies.add(info.study_uid)
            frames.add(info.frame_of_reference_uid)
            uids.add(info.series_uid)
            numbers.add(int(header.SeriesNumber))
            descriptions.add(info.series_description)
        # One study per subject, distinct series.
        assert len(studies) == 1 and len(frames) == 1
        assert len(uids) == len(numbers) == len(descriptions) == len(series)


def test_studies_differ_between_subjects(dicom_sites):
    studies = {read_pet_series(s / "dicom" / "full_count")[1].study_uid
               for s in dicom_sites.glob("site_*/sub-*")}
    assert len(studies) == 3


def test_same_seed_gives_identical_dicom_files(dicom_sites, tmp_path):
    again = tmp_path / "again"
    make_sites(again, overrides=[*SMALL, "write_dicom=true"])

    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.glob("site_*/sub-*/dicom/*/*"))}

    reference = digest(dicom_sites)
    assert reference and digest(again) == reference


def test_dciodvfy_reports_no_errors(dicom_sites):
    tool = require_tool("dciodvfy")
    problems = []
    for folder in _series_dirs(dicom_sites)[:4]:
        for path in sorted(folder.iterdir())[:3]:
            run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
            problems += [f"{path}: {line}" for line in (run.stdout + run.stderr).splitlines()
                         if line.startswith("Error")]
    assert problems == []


def test_bad_write_dicom_value_is_refused(tmp_path, capsys):
    assert main(["make-sites", str(tmp_path / "out"), *SMALL, "write_dicom=maybe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "write_dicom" in err[0]
    assert list(tmp_path.iterdir()) == []

"""Pairing rules on hand-made series summaries (what decides, what is skipped, never guessed),
pseudonyms, message scrubbing, and what the export scan keeps of each header."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from fed_ndif.data.dicom import read_pet_series
from fed_ndif.data.dicom.read import read_pet_files
from fed_ndif.data.prepare.pairing import check_pairs_file, pair_study, read_pairs_file
from fed_ndif.data.prepare.privacy import pseudonyms, scrub
from fed_ndif.data.prepare.scan import PetSeries, scan_export
from fed_ndif.errors import FedNdifError
from tests.helpers.dicom_factory import SeriesSpec, make_series
from tests.test_dicom_read_exports import _philips

GRID = ("grid-a",)
KEYS = [0, 60, 120, 180]


def _series(uid: str, durations_s: list[float] | float | None, *, counts=None,
            geometry=GRID, frame="1.2.3", corrected=True, number=1) -> PetSeries:
    if durations_s is None:
        durations = {}
    else:
        per = durations_s if isinstance(durations_s, list) else [durations_s] * len(KEYS)
        durations = {k: 1000.0 * d for k, d in zip(KEYS, per, strict=True)}
    return PetSeries(
        uid=uid, study_uid="study", patient_key="p", frame_uid=frame, number=number,
        files=[object()] * len(KEYS), geometry=geometry, geometry_problem="",
        durations=durations, counts=dict(zip(KEYS, counts, strict=True)) if counts else {},
        attenuation_corrected=corrected)


def _levels(pairs) -> dict[str, tuple[str, float]]:
    return {p.low.uid: (p.full.uid, p.level) for p in pairs}


def test_several_levels_pair_with_the_longest_series():
    pairs, skipped = pair_study([_series("low10", 12), _series("full", 120),
                                 _series("low25", 30), _series("low50", 60)])
    assert _levels(pairs) == {"low10": ("full", 0.1), "low25": ("full", 0.25),
                              "low50": ("full", 0.5)}
    assert skipped == []


def test_whole_body_beds_of_different_lengths_give_one_fraction():
    pairs, _ = pair_study([_series("full", [120, 120, 180, 180]),
                           _series("low", [24, 24, 36, 36])])
    assert _levels(pairs) == {"low": ("full", 0.2)}


def test_inconsistent_per_slice_fractions_are_skipped():
    pairs, skipped = pair_study([_series("full", 120), _series("low", [12, 12, 30, 30])])
    assert pairs == [] and "not one fraction" in skipped[0].reason


def test_counts_decide_when_durations_are_missing():
    pairs, _ = pair_study([_series("full", None, counts=[1e6] * 4),
                           _series("low", None, counts=[5e4] * 4)])
    assert _levels(pairs) == {"low": ("full", 0.05)}


def test_nothing_to_measure_is_skipped_not_guessed():
    pairs, skipped = pair_study([_series("a", None), _series("b", None)])
    assert pairs == [] and len(skipped) == 2
    assert all("count fraction is unknown" in s.reason for s in skipped)


def test_two_candidates_for_the_full_count_are_ambiguous():
    pairs, skipped = pair_study([_series("full", 120), _series("copy", 119.5),
                                 _series("low", 12)])
    assert pairs == []
    assert {s.series.uid for s in skipped} == {"full", "copy", "low"}
    assert all("ambiguous" in s.reason for s in skipped)


def test_geometry_frame_of_reference_and_correction_separate_series():
    pairs, skipped = pair_study([
        _series("full", 120), _series("low", 12),
        _series("other-grid", 12, geometry=("grid-b",)),
        _series("other-frame", 12, frame="9.9.9"),
        _series("nac", 120, corrected=False),
        _series("gated", 120, geometry=None)])
    assert _levels(pairs) == {"low": ("full", 0.1)}
    reasons = {s.series.uid: s.reason for s in skipped}
    assert "same frame of reference and voxel grid" in reasons["other-grid"]
    assert "same frame of reference and voxel grid" in reasons["other-frame"]
    assert "not attenuation-corrected" in reasons["nac"]
    assert reasons["gated"].startswith("not one regular volume")


def _pairs_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pairs.csv"
    path.write_text("low_count_series_uid,full_count_series_uid,count_level\n" + text)
    return path


def test_a_pairs_file_decides_and_is_checked(tmp_path):
    series = [_series("full", 120), _series("reduced", 120), _series("low", 12),
              _series("elsewhere", 120, geometry=("grid-b",))]
    user = read_pairs_file(_pairs_file(tmp_path, "reduced,full,0.5\nelsewhere,full,0.2\n"))
    check_pairs_file(user, {s.uid: s for s in series}, tmp_path / "pairs.csv")
    pairs, skipped = pair_study(series, user)
    assert _levels(pairs) == {"reduced": ("full", 0.5), "low": ("full", 0.1)}
    assert {p.how for p in pairs} == {"--pairs", "frame durations"}
    assert [s.series.uid for s in skipped] == ["elsewhere"]
    assert "differ in frame of reference or voxel grid" in skipped[0].reason


@pytest.mark.parametrize("text,message", [
    ("a,b,ten\n", "count_level must be a fraction"),
    ("a,b,1\n", "count_level must be a fraction"),
    ("a,a,0.1\n", "cannot be its own full count"),
    ("a,,0.1\n", "both series UIDs are needed"),
    ("a,b,0.1\na,c,0.2\n", "the low-count series of line 2 again"),
    ("", "no pairs in the file"),
])
def test_bad_pairs_files_name_the_line(tmp_path, text, message):
    with pytest.raises(FedNdifError, match=message):
        read_pairs_file(_pairs_file(tmp_path, text))


def test_pairs_file_columns_and_unknown_series(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("low,full,fraction\na,b,0.1\n")
    with pytest.raises(FedNdifError, match="lacks column"):
        read_pairs_file(bad)
    user = read_pairs_file(_pairs_file(tmp_path, "a,b,0.1\n"))
    with pytest.raises(FedNdifError, match=r"pairs.csv:2: the full-count series is not a PET"):
        check_pairs_file(user, {"a": _series("a", 1)}, tmp_path / "pairs.csv")


def test_pseudonyms_are_stable_and_carry_no_identity():
    studies = {"1.2.3.4.5": "MRN1", "1.2.3.4.6": "MRN1", "1.2.3.4.7": "MRN2"}
    salt = b"\x01" * 32
    names = pseudonyms(studies, salt)
    assert names == pseudonyms(dict(reversed(list(studies.items()))), salt)
    assert {n.subject for n in names.values()} == {"sub-001", "sub-002"}
    assert names["1.2.3.4.5"].subject == names["1.2.3.4.6"].subject
    assert {names["1.2.3.4.5"].study, names["1.2.3.4.6"].study} == {"study-1", "study-2"}


def test_scrub_removes_paths_and_uids():
    message = ("/data/DOE^JOHN/IM1: inconsistent PixelSpacing: /data/DOE^JOHN/IM1 has [1] in "
               "series 1.2.840.113619.2.55.3 (SUV 2.5, version 1.2)")
    clean = scrub(message, [Path("/data/DOE^JOHN/IM1")], [Path("/data")])
    assert "DOE" not in clean and "1.2.840" not in clean
    assert clean == ("<file>: inconsistent PixelSpacing: <file> has [1] in series <uid> "
                     "(SUV 2.5, version 1.2)")
    dated = scrub("scanned 20240115 at 2024-01-15 10:00 (scale 1.20240115, 120240115 counts)")
    assert dated == "scanned <date> at <date> 10:00 (scale 1.20240115, 120240115 counts)"


def test_one_line_never_repeats_a_quoted_value():
    from fed_ndif.data.dicom.series import one_line

    text = one_line(ValueError("Unable to convert non-conformant value '1945X2' to 'DA'"))
    assert "1945X2" not in text and text.startswith("ValueError: Unable to convert")


def test_scan_keeps_what_suv_needs_and_drops_private_blobs(tmp_path):
    made = make_series(tmp_path / "pet", SeriesSpec(units="CNTS"))
    _philips(made, 0x09, [0.5 + 0.1 * k for k in range(made.spec.nz)])
    for path in made.paths:
        ds = pydicom.dcmread(path)
        ds.private_block(0x0029, "SOME VENDOR", create=True).add_new(0x10, "OB", b"\0" * 4096)
        ds.save_as(path, enforce_file_format=True)
    scan = scan_export(tmp_path, progress=False)
    [series] = [s for study in scan.studies.values() for s in study]
    assert all((0x0029, 0x1010) not in f.header for f in series.files)
    volume, _ = read_pet_files(series.files)
    expected, _ = read_pet_series(tmp_path)
    np.testing.assert_array_equal(volume.array, expected.array)

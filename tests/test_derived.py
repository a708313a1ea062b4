"""Telling derived series from acquisitions: our own marker and the ones other software leaves."""

from __future__ import annotations

from datetime import datetime

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fed_ndif.data.dicom import read_pet_series, write_pet_series
from fed_ndif.data.dicom.derived import derived_reason, our_equipment
from fed_ndif.data.volume import Volume
from tests.helpers.dicom_factory import SeriesSpec, make_series


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _equipment(purpose: tuple[str, str, str], manufacturer: str) -> Dataset:
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = Sequence([_code(*purpose)])
    item.Manufacturer = manufacturer
    return item


def _acquisition() -> Dataset:
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Modality = "PT"
    return ds


def test_an_acquisition_is_not_derived():
    assert derived_reason(_acquisition()) is None
    assert derived_reason(Dataset()) is None  # no ImageType at all: nothing says derived


def test_de_identified_or_modified_acquisitions_stay_acquisitions():
    ds = _acquisition()
    ds.ContributingEquipmentSequence = Sequence([
        _equipment(("109104", "DCM", "De-identifying Equipment"), "Anonymizer"),
        _equipment(("109103", "DCM", "Modifying Equipment"), "PACS")])
    assert derived_reason(ds) is None


@pytest.mark.parametrize("edit,expected", [
    (lambda ds: setattr(ds, "ImageType", ["DERIVED", "PRIMARY"]), "ImageType DERIVED"),
    (lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "SECONDARY"]), "ImageType SECONDARY"),
    (lambda ds: setattr(ds, "DerivationCodeSequence",
                        Sequence([_code("113087", "DCM", "Smoothing")])), "Smoothing"),
    (lambda ds: setattr(ds, "ContributingEquipmentSequence", Sequence([_equipment(
        ("109102", "DCM", "Processing Equipment"), "OtherVendor DL")])), "OtherVendor DL"),
    (lambda ds: setattr(ds, "ContributingEquipmentSequence", Sequence([our_equipment(
        "d", datetime(2024, 1, 1))])), "fed-ndif's own output"),
])
def test_markers_of_derived_series(edit, expected):
    ds = _acquisition()  # ImageType ORIGINAL: a vendor may leave it and still mark its output
    edit(ds)
    reason = derived_reason(ds)
    assert reason is not None and expected in reason


def test_our_output_carries_our_marker_and_a_simulated_scan_does_not(tmp_path):
    make_series(tmp_path / "src", SeriesSpec(nz=4))
    volume, info = read_pet_series(tmp_path / "src")
    out = write_pet_series(Volume(volume.array * 0.5, volume.affine), tmp_path / "out",
                           template=info, series_description="fed-ndif denoised",
                           derivation_description="denoised")
    for path in sorted(out.iterdir()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert list(ds.ImageType) == ["DERIVED", "PRIMARY"]
        assert ds.DerivationCodeSequence[0].CodingSchemeDesignator == "99FEDNDIF"
        (equipment,) = ds.ContributingEquipmentSequence
        assert equipment.Manufacturer == "fed-ndif"
        assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        assert derived_reason(ds).startswith("fed-ndif's own output")
    # Its ImageType alone says DERIVED: with our marker stripped it is still refused.
    stripped = pydicom.dcmread(next(out.iterdir()), stop_before_pixels=True)
    del stripped.DerivationCodeSequence, stripped.ContributingEquipmentSequence
    assert "ImageType DERIVED" in derived_reason(stripped)
    source = pydicom.dcmread(next((tmp_path / "src").iterdir()), stop_before_pixels=True)
    assert derived_reason(source) is None

"""Reading what PACS and scanners export: compressed transfer syntaxes, implicit VR, files
without preamble or file meta, Philips counts with private scale factors, series in SUV.

Each case reads to the known SUV at the known world position, as the plain case does.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from fed_ndif.cli import main
from fed_ndif.data.dicom import read_pet_series, write_pet_series
from fed_ndif.data.nifti import load_nifti
from fed_ndif.errors import FedNdifError
from tests.helpers.dicom_factory import SeriesSpec, make_series, suv_factor_start
from tests.test_dicom_read import HOUR, _check_geometry_and_values

PHILIPS = "Philips PET Private Group"


def _rewrite(paths: list[Path], change) -> None:
    """Read each file, let ``change(ds, path)`` re-encode or re-write it."""
    for path in paths:
        change(pydicom.dcmread(path), path)


def _raw_bytes(ds: Dataset, *, implicit: bool) -> bytes:
    """The data set alone: no preamble, no 'DICM', no file meta."""
    buffer = io.BytesIO()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.preamble = None
    pydicom.filewriter.dcmwrite(buffer, ds, implicit_vr=implicit, little_endian=True,
                                enforce_file_format=False)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless],
                         ids=["rle", "jpeg-ls", "jpeg2000"])
def test_lossless_compressed_transfer_syntaxes(tmp_path, syntax):
    # OpenJPEG's default six resolution levels need at least 32 pixels a side.
    made = make_series(tmp_path / "pet", SeriesSpec(ny=32, nx=36))

    def compress(ds, path):
        ds.compress(syntax)
        ds.save_as(path, enforce_file_format=True)

    _rewrite(made.paths, compress)
    assert pydicom.dcmread(made.paths[0]).file_meta.TransferSyntaxUID == syntax
    volume, _ = read_pet_series(tmp_path)
    _check_geometry_and_values(volume, made, suv_factor_start(made.spec, HOUR))


@pytest.mark.parametrize("syntax", [DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian],
                         ids=["deflated", "big-endian"])
def test_uncompressed_transfer_syntaxes_pacs_still_send(tmp_path, syntax):
    made = make_series(tmp_path / "pet")

    def rewrite(ds, path):
        if syntax == ExplicitVRBigEndian:
            # Big endian pixels: the stored words byte-swapped (dcmwrite leaves OW as it is).
            ds.PixelData = ds.pixel_array.astype(">i2").tobytes()
            ds.file_meta.TransferSyntaxUID = syntax
            pydicom.filewriter.dcmwrite(path, ds, enforce_file_format=True)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(path, enforce_file_format=True)

    _rewrite(made.paths, rewrite)
    assert pydicom.dcmread(made.paths[0]).file_meta.TransferSyntaxUID == syntax
    volume, _ = read_pet_series(tmp_path)
    _check_geometry_and_values(volume, made, suv_factor_start(made.spec, HOUR))


def test_implicit_vr_little_endian(tmp_path):
    made = make_series(tmp_path / "pet")

    def implicit(ds, path):
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, implicit_vr=True, enforce_file_format=True)

    _rewrite(made.paths, implicit)
    volume, _ = read_pet_series(tmp_path)
    _check_geometry_and_values(volume, made, suv_factor_start(made.spec, HOUR))


@pytest.mark.parametrize("cut", [128, 132], ids=["dicm-prefix-kept", "file-meta-first"])
def test_files_without_preamble(tmp_path, cut):
    made = make_series(tmp_path / "pet")
    # An implicit VR data set behind an explicit VR file meta: only the file meta tells.
    _rewrite(made.paths, lambda ds, path: (
        setattr(ds.file_meta, "TransferSyntaxUID", ImplicitVRLittleEndian),
        ds.save_as(path, implicit_vr=True, enforce_file_format=True)))
    for path in made.paths:
        path.write_bytes(path.read_bytes()[cut:])
    volume, _ = read_pet_series(tmp_path)
    _check_geometry_and_values(volume, made, suv_factor_start(made.spec, HOUR))


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_files_without_file_meta(tmp_path, implicit):
    made = make_series(tmp_path / "pet", names=lambda k: f"{k:08X}")
    _rewrite(made.paths, lambda ds, path: path.write_bytes(_raw_bytes(ds, implicit=implicit)))
    raw = made.paths[0].read_bytes()
    assert b"DICM" not in raw[:200] and raw[:2] == b"\x08\x00"  # starts with (0008,xxxx)
    volume, _ = read_pet_series(tmp_path)
    _check_geometry_and_values(volume, made, suv_factor_start(made.spec, HOUR))


@pytest.mark.parametrize("cut", [0, 128], ids=["preamble", "no-preamble"])
def test_files_whose_file_meta_lacks_the_transfer_syntax(tmp_path, cut, capsys):
    """Old exports: a file meta without (0002,0010) before an implicit VR data set. pydicom
    reads such a file without force and leaves the transfer syntax unset; the reader takes it
    from how the data set was encoded (convert once said "pixel data cannot be read ...
    AttributeError")."""
    made = make_series(tmp_path / "pet")

    def no_syntax(ds, path):
        buffer = io.BytesIO()
        del ds.file_meta.TransferSyntaxUID
        pydicom.filewriter.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True,
                                    enforce_file_format=False)
        path.write_bytes(buffer.getvalue()[cut:])

    _rewrite(made.paths, no_syntax)
    assert "TransferSyntaxUID" not in pydicom.dcmread(made.paths[0], force=True).file_meta
    volume, _ = read_pet_series(tmp_path)
    _check_geometry_and_values(volume, made, suv_factor_start(made.spec, HOUR))
    assert main(["convert", str(tmp_path / "pet"), str(tmp_path / "out.nii.gz")]) == 0


def _philips(made, element: int, values: list[float], *, creator: bool = True,
             implicit: bool = False) -> None:
    def add(ds, path):
        k = made.paths.index(path)
        if creator:
            block = ds.private_block(0x7053, PHILIPS, create=True)
            block.add_new(element, "DS", f"{values[k]:.6g}")
        else:
            ds.add_new(0x70531000 + element, "DS", f"{values[k]:.6g}")
        if implicit:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, implicit_vr=implicit, enforce_file_format=True)

    _rewrite(made.paths, add)


@pytest.mark.parametrize("creator,implicit", [(True, False), (True, True), (False, True)],
                         ids=["explicit", "implicit", "implicit-no-creator"])
def test_philips_counts_with_activity_concentration_factor(tmp_path, creator, implicit):
    made = make_series(tmp_path / "pet", SeriesSpec(units="CNTS"))
    scales = [0.5 + 0.1 * k for k in range(made.spec.nz)]  # per slice, as Philips writes them
    _philips(made, 0x09, scales, creator=creator, implicit=implicit)
    volume, info = read_pet_series(tmp_path)
    factor = suv_factor_start(made.spec, HOUR)
    scaled = made.bqml * np.asarray(scales, float)[:, None, None]
    _check_geometry_and_values(volume, type(made)(made.paths, scaled, made.positions, made.spec),
                               factor)
    assert info.units == "BQML" and info.suv_factor == pytest.approx(factor)
    # A derived series is written in Bq/ml and reads back as the same SUV.
    write_pet_series(volume, tmp_path / "derived", template=info, series_description="d",
                     derivation_description="test")
    again, _ = read_pet_series(tmp_path / "derived")
    assert pydicom.dcmread(next((tmp_path / "derived").iterdir())).Units == "BQML"
    np.testing.assert_allclose(again.array, volume.array, atol=np.abs(volume.array).max() / 32767)


def test_philips_counts_with_only_the_suv_factor(tmp_path):
    # No dose or injection time at all: the scanner's SUV factor is all there is.
    made = make_series(tmp_path / "pet", SeriesSpec(units="CNTS", dose_bq=None,
                                                    injection_time=None, weight_kg=None))
    suv_factors = [1e-3 * (1 + 0.01 * k) for k in range(made.spec.nz)]
    _philips(made, 0x00, suv_factors)
    volume, info = read_pet_series(tmp_path)
    scaled = made.bqml * np.asarray(suv_factors)[:, None, None]
    _check_geometry_and_values(volume, type(made)(made.paths, scaled, made.positions, made.spec),
                               1.0)
    assert info.units == "GML" and info.weight_kg is None


def test_series_already_in_suv_is_taken_as_it_is(tmp_path):
    made = make_series(tmp_path / "pet", SeriesSpec(units="GML", dose_bq=None, weight_kg=None,
                                                    injection_time=None, decay=None))
    volume, info = read_pet_series(tmp_path, patient_weight_kg=80.0)  # not used: a warning
    _check_geometry_and_values(volume, made, 1.0)
    assert info.units == "GML" and np.all(info.suv_factors == 1.0)
    write_pet_series(volume, tmp_path / "derived", template=info, series_description="d",
                     derivation_description="test")
    header = pydicom.dcmread(next((tmp_path / "derived").iterdir()))
    assert header.Units == "GML"
    again, _ = read_pet_series(tmp_path / "derived")
    np.testing.assert_allclose(again.array, volume.array, atol=np.abs(volume.array).max() / 32767)


@pytest.mark.parametrize("case,match", [
    ("no-factors", r"slice000\.dcm: Units \(0054,1001\) is CNTS without the Philips private "
                   r"scale factors"),
    ("bad-factor", r"slice00\d\.dcm: Philips private factor \(7053,1009\) is '-2'"),
    ("gap", r"slice00\d\.dcm: Philips private factor \(7053,1009\) is missing on 1 of 6"),
])
def test_counts_that_cannot_become_suv_are_refused_naming_the_file(tmp_path, case, match):
    made = make_series(tmp_path / "pet", SeriesSpec(units="CNTS"))
    if case == "bad-factor":
        _philips(made, 0x09, [1.0, 1.0, -2.0, 1.0, 1.0, 1.0])
    elif case == "gap":
        _philips(made, 0x09, [1.0] * 6)
        ds = pydicom.dcmread(made.paths[3])
        del ds[ds.private_block(0x7053, PHILIPS).get_tag(0x09)]
        ds.save_as(made.paths[3], enforce_file_format=True)
    with pytest.raises(FedNdifError, match=match):
        read_pet_series(tmp_path)


def test_convert_reads_a_compressed_raw_export(tmp_path, capsys):
    made = make_series(tmp_path / "in" / "A1", SeriesSpec(ny=32, nx=32), names=lambda k: f"I{k}")

    def jpegls_then_explicit(ds, path):
        ds.compress(JPEGLSLossless)
        ds.save_as(path, enforce_file_format=True)

    _rewrite(made.paths, jpegls_then_explicit)
    (tmp_path / "in" / "DICOMDIR").write_bytes(b"not really a DICOMDIR")
    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "out.nii.gz")]) == 0
    volume = load_nifti(tmp_path / "out.nii.gz")
    _check_geometry_and_values(volume, made, suv_factor_start(made.spec, HOUR))

"""Finding the PET series in a folder.

Hospital exports are messy: a folder may hold several series, other modalities, stray files and
broken files. Files that are not DICOM are skipped, but a broken PET file is an error rather than
a silently missing slice, and when several PET series are present the user must name one.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
)

from fed_ndif.errors import FedNdifError

log = logging.getLogger(__name__)

PET_IMAGE_STORAGE = str(PositronEmissionTomographyImageStorage)
DICOMDIR_STORAGE = "1.2.840.10008.1.3.10"
# Files never force-read as preamble-less DICOM (force-parsing large non-DICOM files is slow).
_NOT_DICOM_SUFFIXES = (".nii", ".nii.gz", ".gz", ".zip", ".json", ".txt", ".csv", ".xml", ".png",
                       ".jpg", ".jpeg", ".pdf", ".html", ".yaml", ".yml", ".npy", ".npz", ".h5")


@dataclass
class DicomFile:
    """One image file of a series: its header (no pixels) and how to read it again."""

    path: Path
    header: Dataset
    force: bool  # not a standard Part 10 file (no preamble, or no file meta)


# A quoted value inside another library's message (pydicom quotes the malformed DA/TM/DT or
# name it could not convert): it may be a patient's date or name, so it is never repeated.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|b'[^']*'")


def one_line(exc: BaseException) -> str:
    """An exception as one short line, for an error message that names its cause; quoted
    values in it are left out (they can be header values)."""
    text = _QUOTED.sub("<value>", " ".join(str(exc).split()))
    return f"{exc.__class__.__name__}: {text[:160]}" if text else exc.__class__.__name__


def _set_transfer_syntax(ds: Dataset) -> None:
    """Give a data set read without file meta the transfer syntax its bytes were parsed with,
    so that its pixel data can be decoded (pydicom needs (0002,0010) for that)."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        implicit, little = True, True  # the DICOM default transfer syntax
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def open_dicom(path: Path, *, force: bool, stop_before_pixels: bool) -> Dataset:
    """Read a DICOM file: Part 10, or raw (no preamble, no 'DICM', no file meta: ``force``,
    or read by pydicom without it); a file without file meta gets the transfer syntax its
    bytes were parsed with.

    A file that starts with 'DICM' (the preamble cut off, the file meta kept) is read with a
    blank preamble put back, so its file meta, and with it the transfer syntax, is honoured.
    """
    if not force:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
        # A Part 10 file whose file meta lacks (0002,0010) (old exports) reads without force,
        # with the transfer syntax unset: take it from how the data set itself was encoded.
        _set_transfer_syntax(ds)
        return ds
    with path.open("rb") as handle:
        prefix = handle.read(4)
    if prefix == b"DICM":
        data = io.BytesIO(b"\0" * 128 + path.read_bytes())
        ds = pydicom.dcmread(data, stop_before_pixels=stop_before_pixels)
    else:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    _set_transfer_syntax(ds)
    return ds


def read_header(path: Path, errors: list[tuple[Path, str]] | None = None, *,
                 quiet: bool = False) -> DicomFile | None:
    """The header of a DICOM file, None for a non-DICOM file; corrupt PET files are errors
    (raised, or appended to ``errors`` as (path, reason) when a list is given). ``quiet``: log
    no file names (an export's folder names may name the patient)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        force = False
    except InvalidDicomError:
        # No 'DICM' prefix: raw DICOM without preamble or file meta, or not DICOM at all.
        if path.name.lower().endswith(_NOT_DICOM_SUFFIXES):
            return None
        try:
            header = open_dicom(path, force=True, stop_before_pixels=True)
        except Exception:
            return None
        if "SOPClassUID" not in header or "SeriesInstanceUID" not in header:
            return None
        force = True
    except Exception as exc:
        reason = (f"a DICOM file whose header cannot be read ({one_line(exc)}); remove or "
                  "replace it")
        if errors is None:
            raise FedNdifError(f"{path}: {reason}") from exc
        errors.append((path, reason))
        return None
    meta = getattr(header, "file_meta", None)
    media_class = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    if "SeriesInstanceUID" not in header or "SOPClassUID" not in header:
        if media_class == PET_IMAGE_STORAGE:
            # A truncated header reads silently as a partial data set.
            reason = ("a PET DICOM file that is truncated or corrupt (no SeriesInstanceUID/"
                      "SOPClassUID could be read); remove or replace it")
            if errors is None:
                raise FedNdifError(f"{path}: {reason}")
            errors.append((path, reason))
            return None
        if media_class != DICOMDIR_STORAGE and not quiet:
            log.warning("skipping %s: DICOM file without a series (incomplete?)", path)
        return None
    return DicomFile(path, header, force)


def files_under(folder: Path) -> list[Path]:
    """Every file under ``folder``, in a fixed order (names and layout mean nothing)."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def scan_folder(folder: Path) -> tuple[list[DicomFile], int]:
    """Headers of every DICOM file under ``folder`` (whatever the names and layout), and the
    number of files looked at."""
    files = files_under(folder)
    found = [f for f in (read_header(p) for p in files) if f is not None]
    return found, len(files)


def is_pet_image(f: DicomFile) -> bool:
    return (str(f.header.get("Modality", "")).upper() == "PT"
            and str(f.header.SOPClassUID) == PET_IMAGE_STORAGE)


def unique_instances(files: list[DicomFile], *, quiet: bool = False) -> list[DicomFile]:
    """One file per SOPInstanceUID: the same instance copied twice is harmless."""
    unique: dict[str, DicomFile] = {}
    for f in files:
        sop = str(f.header.get("SOPInstanceUID", f.path))
        if sop in unique:
            if not quiet:
                log.warning("%s duplicates %s (same SOPInstanceUID); using one", f.path,
                            unique[sop].path)
            continue
        unique[sop] = f
    return list(unique.values())


def pet_series(files: list[DicomFile]) -> dict[str, list[DicomFile]]:
    """SeriesInstanceUID -> the PET Image Storage files of each PET series among ``files``."""
    series: dict[str, list[DicomFile]] = {}
    for f in files:
        if is_pet_image(f):
            series.setdefault(str(f.header.SeriesInstanceUID), []).append(f)
    return series


def _describe(files: list[DicomFile]) -> str:
    first = files[0].header
    desc = str(first.get("SeriesDescription", "")).strip() or "no description"
    return f'{first.SeriesInstanceUID} ("{desc}", {len(files)} images)'


def select_pet_series(folder: Path, series_uid: str | None) -> list[DicomFile]:
    """The PET Image Storage files of the one PET series in ``folder`` (or of ``series_uid``)."""
    files, n_files = scan_folder(folder)
    if n_files == 0:
        raise FedNdifError(f"{folder}: the folder is empty; expected a PET DICOM series")
    if not files:
        raise FedNdifError(f"{folder}: none of its {n_files} files is a DICOM image")
    series: dict[str, list[DicomFile]] = {}
    for f in files:
        series.setdefault(str(f.header.SeriesInstanceUID), []).append(f)
    pet = {uid: fs for uid, fs in series.items()
           if any(is_pet_image(f) for f in fs)}
    if series_uid is not None:
        if series_uid not in pet:
            known = "; ".join(_describe(fs) for fs in pet.values()) or "none"
            raise FedNdifError(f"{folder}: no PET series with SeriesInstanceUID {series_uid}; "
                               f"PET series present: {known}")
        chosen = pet[series_uid]
    elif not pet:
        modalities: dict[str, int] = {}
        for fs in series.values():
            mod = str(fs[0].header.get("Modality", "")) or "unknown"
            sop = str(fs[0].header.SOPClassUID)
            if mod.upper() == "PT" and sop != PET_IMAGE_STORAGE:
                mod = f"PT ({UID(sop).name}, not PET Image Storage)"
            modalities[mod] = modalities.get(mod, 0) + 1
        found = ", ".join(f"{m} ({n} series)" for m, n in sorted(modalities.items()))
        raise FedNdifError(f"{folder}: no PET series (Modality PT, PET Image Storage) found; "
                           f"found {found}")
    elif len(pet) > 1:
        listing = "; ".join(_describe(fs) for fs in pet.values())
        raise FedNdifError(f"{folder}: {len(pet)} PET series found, name one with --series-uid: "
                           f"{listing}")
    else:
        chosen = next(iter(pet.values()))
    chosen = [f for f in chosen if str(f.header.SOPClassUID) == PET_IMAGE_STORAGE]
    return unique_instances(chosen)

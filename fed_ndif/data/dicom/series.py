"""Finding the PET series in a folder.

Hospital exports are messy: a folder may hold several series, other modalities, stray files and
broken files. Files that are not DICOM are skipped, but a broken PET file is an error rather than
a silently missing slice, and when several PET series are present the user must name one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, PositronEmissionTomographyImageStorage

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
    force: bool  # read with force=True (no preamble)


def one_line(exc: BaseException) -> str:
    """An exception as one short line, for an error message that names its cause."""
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:160]}" if text else exc.__class__.__name__


def _read_header(path: Path) -> DicomFile | None:
    """The header of a DICOM file, None for a non-DICOM file; corrupt PET files are errors."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        force = False
    except InvalidDicomError:
        # No 'DICM' prefix: raw DICOM without preamble, or not DICOM at all.
        if path.name.lower().endswith(_NOT_DICOM_SUFFIXES):
            return None
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            return None
        if "SOPClassUID" not in header or "SeriesInstanceUID" not in header:
            return None
        force = True
    except Exception as exc:
        raise FedNdifError(f"{path}: a DICOM file whose header cannot be read ({one_line(exc)}); "
                           "remove or replace it") from exc
    meta = getattr(header, "file_meta", None)
    media_class = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    if "SeriesInstanceUID" not in header or "SOPClassUID" not in header:
        if media_class == PET_IMAGE_STORAGE:
            # A truncated header reads silently as a partial data set.
            raise FedNdifError(f"{path}: a PET DICOM file that is truncated or corrupt (no "
                               "SeriesInstanceUID/SOPClassUID could be read); remove or replace it")
        if media_class != DICOMDIR_STORAGE:
            log.warning("skipping %s: DICOM file without a series (incomplete?)", path)
        return None
    return DicomFile(path, header, force)


def _scan_folder(folder: Path) -> tuple[list[DicomFile], int]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    found = [f for f in (_read_header(p) for p in files) if f is not None]
    return found, len(files)


def _describe(files: list[DicomFile]) -> str:
    first = files[0].header
    desc = str(first.get("SeriesDescription", "")).strip() or "no description"
    return f'{first.SeriesInstanceUID} ("{desc}", {len(files)} images)'


def select_pet_series(folder: Path, series_uid: str | None) -> list[DicomFile]:
    """The PET Image Storage files of the one PET series in ``folder`` (or of ``series_uid``)."""
    files, n_files = _scan_folder(folder)
    if n_files == 0:
        raise FedNdifError(f"{folder}: the folder is empty; expected a PET DICOM series")
    if not files:
        raise FedNdifError(f"{folder}: none of its {n_files} files is a DICOM image")
    series: dict[str, list[DicomFile]] = {}
    for f in files:
        series.setdefault(str(f.header.SeriesInstanceUID), []).append(f)
    pet = {uid: fs for uid, fs in series.items()
           if any(str(f.header.get("Modality", "")).upper() == "PT"
                  and str(f.header.SOPClassUID) == PET_IMAGE_STORAGE for f in fs)}
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
    # The same instance copied twice is harmless: keep one.
    unique: dict[str, DicomFile] = {}
    for f in chosen:
        sop = str(f.header.get("SOPInstanceUID", f.path))
        if sop in unique:
            log.warning("%s duplicates %s (same SOPInstanceUID); using one", f.path,
                        unique[sop].path)
            continue
        unique[sop] = f
    return list(unique.values())

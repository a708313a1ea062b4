"""Reading an export's headers: every PET series, what its geometry and frame durations are.

Exports come in any layout (DICOMDIR, opaque file names, CT and other modalities beside the
PET), so everything under the folder is read and grouped by StudyInstanceUID and
SeriesInstanceUID; only PET Image Storage series go on to pairing.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fed_ndif.data.dicom.derived import derived_reason
from fed_ndif.data.dicom.series import (
    DicomFile,
    files_under,
    is_pet_image,
    pet_series,
    read_header,
    unique_instances,
)
from fed_ndif.data.dicom.suv import PHILIPS_ACTIVITY_FACTOR, PHILIPS_SUV_FACTOR, positive
from fed_ndif.errors import FedNdifError

log = logging.getLogger(__name__)

PHILIPS_GROUP = 0x7053
# Positions and spacings are compared at this precision (mm) when deciding "same geometry".
GEOMETRY_MM = 0.05


@dataclass
class PetSeries:
    """One PET series of the export, summarized from its headers (no pixels read)."""

    uid: str
    study_uid: str
    patient_key: str  # PatientID, or the study when the export has none
    frame_uid: str
    number: int | None  # SeriesNumber, how a person finds the series in a viewer
    files: list[DicomFile]
    geometry: tuple | None  # hashable grid description; None when it is not one volume
    geometry_problem: str  # why geometry is None
    durations: dict[int, float]  # slice position (in GEOMETRY_MM steps) -> frame duration, ms
    counts: dict[int, float]  # slice position -> CountsAccumulated (0018,0070), where given
    attenuation_corrected: bool
    derived: str = ""  # why it is not an acquisition (fed_ndif.data.dicom.derived), or ""

    @property
    def label(self) -> str:
        """The series without identifiers: its number and size."""
        number = f"series {self.number}" if self.number is not None else "a series without number"
        return f"{number} ({len(self.files)} images)"

    def fingerprint(self) -> str:
        """Changes when the series' instances change (for resuming)."""
        sops = sorted(str(f.header.get("SOPInstanceUID", f.path)) for f in self.files)
        return hashlib.sha256("\n".join(sops).encode()).hexdigest()


def _floats(header, keyword: str, count: int) -> np.ndarray | None:
    try:
        values = np.asarray([float(v) for v in header.get(keyword)], float)
    except (TypeError, ValueError):
        return None
    return values if values.size == count and np.all(np.isfinite(values)) else None


def _geometry(files: list[DicomFile]) -> tuple[tuple | None, str, list[int]]:
    """A hashable description of the series' grid and each file's position key, or why the
    files do not form one regular volume (the reader checks the rest when it reads it)."""
    first = files[0].header
    iop = _floats(first, "ImageOrientationPatient", 6)
    spacing = _floats(first, "PixelSpacing", 2)
    matrix = (int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0))
    if iop is None or spacing is None or min(matrix) <= 0:
        return None, "ImageOrientationPatient, PixelSpacing or Rows/Columns missing", []
    normal = np.cross(iop[:3], iop[3:])
    positions = []
    for f in files:
        position = _floats(f.header, "ImagePositionPatient", 3)
        if position is None:
            return None, "an image without ImagePositionPatient", []
        positions.append(position)
    along = np.asarray(positions) @ normal
    keys = [round(float(a) / GEOMETRY_MM) for a in along]
    if len(set(keys)) != len(keys):
        return None, ("several images at one slice position (a dynamic or gated series, or "
                      "duplicates)"), []
    origin = np.asarray(positions)[int(np.argmin(along))]
    grid = (matrix, tuple(np.round(spacing / GEOMETRY_MM).astype(int).tolist()),
            tuple(np.round(iop, 3).tolist()),
            tuple(np.round(origin / GEOMETRY_MM).astype(int).tolist()), tuple(sorted(keys)))
    return grid, "", keys


def _summarize(uid: str, files: list[DicomFile]) -> PetSeries:
    files = unique_instances(files, quiet=True)
    first = files[0].header
    geometry, problem, keys = _geometry(files)
    durations, counts = {}, {}
    for key, f in zip(keys, files, strict=False):
        if (duration := positive(f.header.get("ActualFrameDuration"))) is not None:
            durations[key] = duration
        if (count := positive(f.header.get("CountsAccumulated"))) is not None:
            counts[key] = count
    corrected = first.get("CorrectedImage")
    corrected = [str(v).upper() for v in (corrected if corrected is not None else [])]
    try:
        number = int(first.get("SeriesNumber"))
    except (TypeError, ValueError):
        number = None
    study = str(first.get("StudyInstanceUID", "")).strip()
    patient = str(first.get("PatientID", "")).strip()
    return PetSeries(
        uid=uid, study_uid=study, patient_key=patient or f"study:{study}",
        frame_uid=str(first.get("FrameOfReferenceUID", "")).strip(), number=number, files=files,
        geometry=geometry, geometry_problem=problem, durations=durations, counts=counts,
        # Unknown (no CorrectedImage) counts as corrected: only a stated lack of ATTN excludes.
        attenuation_corrected=not corrected or "ATTN" in corrected,
        derived=derived_reason(first) or "")


@dataclass
class ExportScan:
    """The PET series of an export grouped by study, and what could not be read."""

    studies: dict[str, list[PetSeries]]  # StudyInstanceUID -> its PET series
    unreadable: list[tuple[Path, str]]  # (file, reason): corrupt files, never silently lost


def _slim(f: DicomFile) -> DicomFile:
    """Drop what a large export need not keep in memory: private elements (some vendors store
    whole files in them) but for the Philips scale factors, and icons."""
    header = f.header
    for element in list(header):
        tag = element.tag
        if tag.is_private and not (tag.group == PHILIPS_GROUP and (
                tag.element < 0x100 or tag.element & 0xFF in (PHILIPS_SUV_FACTOR,
                                                                PHILIPS_ACTIVITY_FACTOR))):
            del header[tag]
    if "IconImageSequence" in header:
        del header.IconImageSequence
    return f


def scan_export(export: Path, *, progress: bool = True) -> ExportScan:
    """Every PET series under ``export``, grouped by study; other modalities are counted."""
    if not export.is_dir():
        raise FedNdifError(f"{export}: no such folder (the DICOM export to prepare)")
    unreadable: list[tuple[Path, str]] = []
    paths = files_under(export)
    files = []  # PET images only: CT and the rest are counted, not kept in memory
    n_dicom = 0
    # disable=None: a bar only on a terminal (not in log files, nor around an error line).
    bar = tqdm(paths, desc="reading headers", unit="file", disable=None if progress else True)
    for path in bar:
        found = read_header(path, unreadable, quiet=True)
        if found is not None:
            n_dicom += 1
            if is_pet_image(found):
                files.append(_slim(found))
    n_files = len(paths)
    if n_files == 0:
        raise FedNdifError(f"{export}: the folder is empty; expected a DICOM export")
    if not n_dicom:
        raise FedNdifError(f"{export}: none of its {n_files} files is a DICOM image")
    studies: dict[str, list[PetSeries]] = {}
    for uid, series_files in sorted(pet_series(files).items()):
        series = _summarize(uid, series_files)
        studies.setdefault(series.study_uid, []).append(series)
    if not studies:
        raise FedNdifError(f"{export}: no PET series (Modality PT, PET Image Storage) among its "
                           f"{n_dicom} DICOM images")
    log.info("scanned %d files: %d DICOM images, %d PET series in %d studies", n_files,
             n_dicom, sum(len(s) for s in studies.values()), len(studies))
    return ExportScan(studies=studies, unreadable=unreadable)

"""Realistic hospital exports built from simulated sites' DICOM series, for prepare-site tests.

A PACS export is not what make-sites writes: files get opaque names in a flat or DICOMDIR
layout, CT and other series sit beside the PET, identities are real, and a low-count series
differs from its full count only by its frame duration (list-mode data cut shorter) and a
free-text description. This helper turns simulated series into such an export.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage, generate_uid

FULL_FRAME_MS = 120_000


@dataclass
class Export:
    root: Path
    phi: set[str] = field(default_factory=set)  # every planted identity and UID, as text
    study_of: dict[str, str] = field(default_factory=dict)  # source subject dir -> study UID
    series: dict[tuple[str, str], str] = field(default_factory=dict)  # (subject, scan) -> UID


def _opaque(*parts: str) -> str:
    return hashlib.sha1("/".join(parts).encode()).hexdigest()[:16].upper()


def plant_identity(ds: pydicom.Dataset, index: int) -> set[str]:
    """Real-looking identities on a data set; returns them (and its UIDs) as text."""
    ds.PatientName = f"Kowalczyk^Genowefa{index}"
    ds.PatientID = f"MRN{9_400_000 + index}"
    ds.PatientBirthDate = f"1951020{index}"
    ds.AccessionNumber = f"ACC77{index}31"
    ds.InstitutionName = "Sankt Irgendwo Klinikum"
    ds.ReferringPhysicianName = "Dr^Wachtel"
    ds.OtherPatientIDs = f"OPID-{index}-X"
    return {str(ds.PatientName), "Kowalczyk", f"Genowefa{index}", ds.PatientID,
            str(9_400_000 + index),
            ds.PatientBirthDate, ds.AccessionNumber, ds.InstitutionName, "Wachtel",
            ds.OtherPatientIDs, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
            ds.FrameOfReferenceUID}


def build_export(site_dir: Path, root: Path, *, extra=None) -> Export:
    """Every subject of ``site_dir`` (make-sites with write_dicom) as one flat export.

    Low-count series keep only their frame duration (the level times the full count's) and a
    free-text description; ``extra(subject_dir, index, export)`` may add series.
    """
    export = Export(root)
    root.mkdir(parents=True)
    subjects = sorted(p for p in site_dir.glob("sub-*") if (p / "dicom").is_dir())
    for index, subject in enumerate(subjects):
        for series_dir in sorted((subject / "dicom").iterdir()):
            scan = series_dir.name
            level = 1.0 if scan == "full_count" else float(scan.split("_")[-1][:-3]) / 100
            new_series = generate_uid()
            export.series[(subject.name, scan)] = new_series
            for path in sorted(series_dir.iterdir()):
                ds = pydicom.dcmread(path)
                ds.SeriesInstanceUID = new_series
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.ActualFrameDuration = round(FULL_FRAME_MS * level)
                ds.SeriesDescription = ("WB 3D AC 2 min/bed" if level == 1 else
                                        f"WB 3D AC LM {ds.ActualFrameDuration // 1000} s/bed "
                                        "Kowalczyk")
                ds.DerivationDescription = ""
                export.phi |= plant_identity(ds, index)
                export.study_of[subject.name] = ds.StudyInstanceUID
                name = _opaque(subject.name, scan, path.name)
                (root / name[:2]).mkdir(exist_ok=True)
                ds.save_as(root / name[:2] / name, enforce_file_format=True)
        add_ct(root, pydicom.dcmread(next((subject / "dicom" / "full_count").iterdir())),
               index, export)
        if extra is not None:
            extra(subject, index, export)
    return export


def add_ct(root: Path, pet: pydicom.Dataset, index: int, export: Export) -> None:
    """A three-slice CT of the same study (another modality to ignore)."""
    series = generate_uid()
    for k in range(3):
        ds = pet.copy()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesNumber = 2
        ds.SeriesDescription = "CT AC"
        export.phi |= plant_identity(ds, index)
        ds.save_as(root / _opaque("ct", series, str(k)), enforce_file_format=True)


def copy_series(subject: Path, scan: str, root: Path, index: int, export: Export, *,
                edit, number: int) -> str:
    """Another series made from a simulated one (``edit(ds)`` changes each slice)."""
    new_series = generate_uid()
    for path in sorted((subject / "dicom" / scan).iterdir()):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = new_series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = "WB 3D"
        ds.SeriesNumber = number
        export.phi |= plant_identity(ds, index)
        edit(ds)
        ds.save_as(root / _opaque("copy", new_series, path.name), enforce_file_format=True)
    return new_series

"""Small hand-made PET (and other) DICOM series for reader tests.

Independent of fed_ndif.data.dicom's writer on purpose: the stored integers, slopes and times are
chosen here, so the expected Bq/ml and SUV can be computed by hand in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)

F18 = 6586.2


@dataclass
class SeriesSpec:
    nz: int = 6
    ny: int = 8
    nx: int = 10
    pixel_mm: tuple[float, float] = (4.0, 3.5)  # PixelSpacing: (between rows, between columns)
    slice_mm: float = 3.0
    origin: tuple[float, float, float] = (-17.5, -14.0, -100.0)  # LPS of slice 0, voxel (0, 0)
    iop: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    modality: str = "PT"
    sop_class: str = str(PositronEmissionTomographyImageStorage)
    units: str | None = "BQML"
    decay: str | None = "START"
    weight_kg: float | None = 70.0
    dose_bq: float | None = 370e6
    half_life_s: float | None = F18
    injection_time: str | None = "090000"
    injection_datetime: str | None = None
    series_date: str | None = "20240115"
    series_time: str | None = "100000"
    acquisition_times: list[str] | None = None  # per slice, default = series time
    acquisition_date: str | None = None  # default = series date
    frame_duration_ms: int | None = None
    series_uid: str = field(default_factory=generate_uid)
    study_uid: str = "1.2.826.0.1.3680043.8.498.1"
    frame_uid: str = "1.2.826.0.1.3680043.8.498.2"
    description: str = "PET WB AC"
    patient_position: str | None = "HFS"
    intercepts: list[float] | None = None
    seed: int = 0


@dataclass
class Made:
    """What a test needs to know about a written series (slices in position order)."""

    paths: list[Path]
    bqml: np.ndarray  # (nz, ny, nx) float64, slice k = position k
    positions: np.ndarray  # (nz, 3) LPS
    spec: SeriesSpec


def _dataset(spec: SeriesSpec, k: int, raw: np.ndarray, slope: float, intercept: float,
             position: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = spec.sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST001"
    if spec.weight_kg is not None:
        ds.PatientWeight = str(spec.weight_kg)
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = spec.frame_uid
    ds.Modality = spec.modality
    if spec.patient_position is not None:
        ds.PatientPosition = spec.patient_position
    ds.SeriesDescription = spec.description
    ds.SeriesNumber = 3
    if spec.series_date is not None:
        ds.SeriesDate = spec.series_date
    if spec.series_time is not None:
        ds.SeriesTime = spec.series_time
    acq_date = spec.acquisition_date or spec.series_date
    if acq_date is not None:
        ds.AcquisitionDate = acq_date
    acq_time = (spec.acquisition_times[k] if spec.acquisition_times else spec.series_time)
    if acq_time is not None:
        ds.AcquisitionTime = acq_time
    if spec.frame_duration_ms is not None:
        ds.ActualFrameDuration = spec.frame_duration_ms
    if spec.units is not None:
        ds.Units = spec.units
    if spec.decay is not None:
        ds.DecayCorrection = spec.decay
    item = Dataset()
    if spec.dose_bq is not None:
        item.RadionuclideTotalDose = str(spec.dose_bq)
    if spec.half_life_s is not None:
        item.RadionuclideHalfLife = str(spec.half_life_s)
    if spec.injection_time is not None:
        item.RadiopharmaceuticalStartTime = spec.injection_time
    if spec.injection_datetime is not None:
        item.RadiopharmaceuticalStartDateTime = spec.injection_datetime
    ds.RadiopharmaceuticalInformationSequence = Sequence([item])
    ds.ImageOrientationPatient = [f"{v:g}" for v in spec.iop]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.PixelSpacing = [f"{v:g}" for v in spec.pixel_mm]
    ds.SliceThickness = f"{spec.slice_mm:g}"
    ds.InstanceNumber = k + 1
    ds.ImageIndex = k + 1
    ds.Rows, ds.Columns = spec.ny, spec.nx
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.PixelData = raw.astype("<i2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def make_series(
    folder: Path, spec: SeriesSpec | None = None, *,
    names: Callable[[int], str] | None = None,
    instance_numbers: Callable[[int], int] | None = None,
    edit: Callable[[int, Dataset], None] | None = None,
) -> Made:
    """Write ``spec`` into ``folder``; ``names``/``instance_numbers`` map position index to file
    name / InstanceNumber (to scramble them), ``edit`` changes slice k before it is saved."""
    spec = spec or SeriesSpec()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    iop = np.asarray(spec.iop, float)
    normal = np.cross(iop[:3], iop[3:])
    origin = np.asarray(spec.origin, float)
    paths, bqml, positions = [], [], []
    for k in range(spec.nz):
        raw = rng.integers(0, 30000, size=(spec.ny, spec.nx)).astype(np.int16)
        slope = 0.25 + 0.125 * k
        intercept = spec.intercepts[k] if spec.intercepts else 0.0
        position = origin + k * spec.slice_mm * normal
        ds = _dataset(spec, k, raw, slope, intercept, position)
        if instance_numbers is not None:
            ds.InstanceNumber = instance_numbers(k)
        if edit is not None:
            edit(k, ds)
        path = folder / (names(k) if names else f"slice{k:03d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        bqml.append(raw.astype(np.float64) * slope + intercept)
        positions.append(position)
    return Made(paths=paths, bqml=np.stack(bqml), positions=np.stack(positions), spec=spec)


def make_ct_series(folder: Path, n: int = 3) -> None:
    """A tiny CT series (another modality to ignore)."""
    spec = SeriesSpec(nz=n, modality="CT", sop_class=str(CTImageStorage), units=None,
                      decay=None, description="CT WB")
    make_series(folder, spec)


def suv_factor_start(spec: SeriesSpec, elapsed_s: float) -> float:
    """By hand: SUV per Bq/ml for a dose decayed over ``elapsed_s`` seconds."""
    return spec.weight_kg * 1000.0 / (spec.dose_bq * 2.0 ** (-elapsed_s / spec.half_life_s))

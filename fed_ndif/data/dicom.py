"""PET DICOM series in (a SUV volume) and derived PET series out.

Reading is defensive because hospital exports are messy: a folder may hold several series, other
modalities, stray files and broken files. Slices are ordered by ImagePositionPatient projected on
the slice normal (never by file name or InstanceNumber, which exports scramble), every geometric
assumption is checked, and anything we cannot handle is refused with one clear
:class:`~fed_ndif.errors.FedNdifError` rather than turned into a silently wrong volume.

SUV is body-weight SUV: ``SUV = activity concentration (Bq/ml) × weight (g) / decayed dose (Bq)``
(1 g/ml tissue density assumed). DecayCorrection (0054,1102) decides the decay reference
(DICOM PS3.3 C.8.9.1.1.5 and C.8.9.1.1.2):

* ``START``: pixels are decay-corrected to SeriesDate/SeriesTime (the series reference time,
  normally the scan start); the dose is decayed from injection to that time. When SeriesTime is
  later than the earliest AcquisitionTime (a series re-created after the scan), the earliest
  AcquisitionDate/Time is used instead (the QIBA vendor-neutral rule).
* ``ADMIN``: pixels are already decay-corrected to the administration time: no dose decay.
* ``NONE``: pixels are the mean concentration measured during each frame; the dose is decayed to
  each slice's own AcquisitionDate/Time (frame start) and, when ActualFrameDuration is known, by
  the mean decay over the frame ``(1 - exp(-λT)) / (λT)``.

Only patient weight and dose ever come from outside the files (``patient_weight_kg`` /
``injected_dose_bq``, the CLI's ``--weight KG`` / ``--dose MBQ``). Patient-identifying attributes
are never logged.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)
from pydicom.valuerep import DA, DT, TM, format_number_as_ds

from fed_ndif.data.volume import LPS_TO_RAS, Volume, affine_from_lps
from fed_ndif.errors import FedNdifError
from fed_ndif.staging import replace_path

log = logging.getLogger(__name__)

PET_IMAGE_STORAGE = str(PositronEmissionTomographyImageStorage)
DICOMDIR_STORAGE = "1.2.840.10008.1.3.10"
F18_HALF_LIFE_S = 6586.2  # 109.77 min
F18_POSITRON_FRACTION = 0.9673
# Largest off-axis component of a direction cosine still called axial (about 0.06 degrees).
AXIAL_TOLERANCE = 1e-3
# Largest relative deviation of one slice step from the median step.
SPACING_TOLERANCE = 0.01
INT16_MAX = 32767
# Files never force-read as preamble-less DICOM (force-parsing large non-DICOM files is slow).
_NOT_DICOM_SUFFIXES = (".nii", ".nii.gz", ".gz", ".zip", ".json", ".txt", ".csv", ".xml", ".png",
                       ".jpg", ".jpeg", ".pdf", ".html", ".yaml", ".yml", ".npy", ".npz", ".h5")
# Attributes that vary per slice in a PET series and are copied from the nearest source slice.
_PER_SLICE_KEYWORDS = ("AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime",
                       "FrameReferenceTime", "ActualFrameDuration", "DecayFactor",
                       "DoseCalibrationFactor")
# Template attributes that describe the source pixels, not the derived ones.
_DROP_KEYWORDS = ("SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue",
                  "PixelPaddingRangeLimit", "WindowCenter", "WindowWidth",
                  "WindowCenterWidthExplanation", "VOILUTFunction", "RescaleType",
                  "LossyImageCompression", "LossyImageCompressionRatio",
                  "LossyImageCompressionMethod", "SourceImageSequence", "DerivationCodeSequence",
                  "IconImageSequence", "ImagesInAcquisition", "ImageComments", "SliceLocation",
                  "PixelData", "FloatPixelData", "DoubleFloatPixelData", "NumberOfFrames",
                  "AcquisitionDateTime", "DecayFactor", "FrameReferenceTime",
                  "ActualFrameDuration", "DoseCalibrationFactor", "AcquisitionDate",
                  "AcquisitionTime", "ReferencedImageSequence", "PixelAspectRatio",
                  "PlanarConfiguration", "InstanceCreationDate", "InstanceCreationTime")


@dataclass
class PetSeriesInfo:
    """What a derived series needs from its source series (no pixel data).

    ``suv_factors[k]`` converts slice k (in volume order) from Bq/ml to SUV; it is the same for
    every slice unless DecayCorrection is NONE.
    """

    template: Dataset
    positions_lps: np.ndarray  # (nz, 3) ImagePositionPatient in volume order
    slice_attributes: list[dict[str, Any]]  # per slice: _PER_SLICE_KEYWORDS present in the file
    sop_instance_uids: list[str]
    study_uid: str
    frame_of_reference_uid: str
    series_uid: str
    series_description: str
    suv_factors: np.ndarray
    decay_correction: str
    decay_reference: str  # what the dose was decayed to, in words
    weight_kg: float
    injected_dose_bq: float

    @property
    def suv_factor(self) -> float:
        """The SUV factor (SUV per Bq/ml) of the first slice; all slices unless NONE."""
        return float(self.suv_factors[0])


@dataclass(frozen=True)
class SyntheticPatient:
    """Metadata for a PET series written without a source series (simulated subjects).

    Reuse one instance for all series of a subject, so they share study and frame of reference.
    ``scan_start`` is SeriesDate/Time and AcquisitionDate/Time (decay reference, START).
    """

    patient_id: str
    weight_kg: float
    injected_dose_bq: float
    study_uid: str = field(default_factory=generate_uid)
    frame_uid: str = field(default_factory=generate_uid)
    scan_start: datetime = datetime(2024, 1, 15, 10, 0, 0)
    injection_time: datetime = datetime(2024, 1, 15, 9, 0, 0)
    half_life_s: float = F18_HALF_LIFE_S
    frame_duration_s: float = 120.0
    patient_sex: str = "O"
    study_id: str = "1"

    @property
    def suv_factor(self) -> float:
        """SUV per Bq/ml for this subject (START decay correction at ``scan_start``)."""
        elapsed = (self.scan_start - self.injection_time).total_seconds()
        decayed = self.injected_dose_bq * 2.0 ** (-elapsed / self.half_life_s)
        return self.weight_kg * 1000.0 / decayed


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class _File:
    path: Path
    header: Dataset
    force: bool  # read with force=True (no preamble)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:160]}" if text else exc.__class__.__name__


def _read_header(path: Path) -> _File | None:
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
        raise FedNdifError(f"{path}: a DICOM file whose header cannot be read ({_one_line(exc)}); "
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
    return _File(path, header, force)


def _scan_folder(folder: Path) -> tuple[list[_File], int]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    found = [f for f in (_read_header(p) for p in files) if f is not None]
    return found, len(files)


def _describe(files: list[_File]) -> str:
    first = files[0].header
    desc = str(first.get("SeriesDescription", "")).strip() or "no description"
    return f'{first.SeriesInstanceUID} ("{desc}", {len(files)} images)'


def _select_pet_series(folder: Path, series_uid: str | None) -> list[_File]:
    files, n_files = _scan_folder(folder)
    if n_files == 0:
        raise FedNdifError(f"{folder}: the folder is empty; expected a PET DICOM series")
    if not files:
        raise FedNdifError(f"{folder}: none of its {n_files} files is a DICOM image")
    series: dict[str, list[_File]] = {}
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
    unique: dict[str, _File] = {}
    for f in chosen:
        sop = str(f.header.get("SOPInstanceUID", f.path))
        if sop in unique:
            log.warning("%s duplicates %s (same SOPInstanceUID); using one", f.path,
                        unique[sop].path)
            continue
        unique[sop] = f
    return list(unique.values())


def _floats(f: _File, keyword: str, count: int) -> np.ndarray:
    value = f.header.get(keyword)
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        array = np.empty(0)
    if array.size != count or not np.all(np.isfinite(array)):
        raise FedNdifError(f"{f.path}: {keyword} is missing or malformed (need {count} numbers)")
    return array


@dataclass
class _Geometry:
    order: np.ndarray
    affine: np.ndarray
    positions: np.ndarray  # sorted


def _check_consistent(files: list[_File], keyword: str, values: list[np.ndarray],
                      atol: float) -> None:
    for f, v in zip(files, values, strict=True):
        if v.shape != values[0].shape or not np.allclose(v, values[0], atol=atol):
            raise FedNdifError(
                f"inconsistent {keyword} within the series: {files[0].path.name} has "
                f"{np.round(values[0], 4).tolist()}, {f.path} has {np.round(v, 4).tolist()}")


def _geometry(files: list[_File]) -> _Geometry:
    """Slice order along the normal, and the RAS affine; refuses anything but a regular stack."""
    iops = [_floats(f, "ImageOrientationPatient", 6) for f in files]
    _check_consistent(files, "ImageOrientationPatient", iops, 1e-4)
    spacings = [_floats(f, "PixelSpacing", 2) for f in files]
    _check_consistent(files, "PixelSpacing", spacings, 1e-4)
    matrices = [np.array([int(f.header.get("Rows", 0)), int(f.header.get("Columns", 0))])
                for f in files]
    _check_consistent(files, "Rows/Columns", matrices, 0)
    if np.any(matrices[0] <= 0):
        raise FedNdifError(f"{files[0].path}: Rows/Columns missing or zero")
    row, col = iops[0][:3], iops[0][3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3
            or abs(row @ col) > 1e-3):
        raise FedNdifError(f"{files[0].path}: ImageOrientationPatient {iops[0].tolist()} is not "
                           "two orthogonal unit vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    on_axis = lambda v: np.max(np.abs(v)) >= 1 - AXIAL_TOLERANCE  # noqa: E731
    if not (abs(normal[2]) >= 1 - AXIAL_TOLERANCE and on_axis(row) and on_axis(col)):
        raise FedNdifError(
            f"the series is not axial (ImageOrientationPatient {np.round(iops[0], 4).tolist()}: "
            "oblique, sagittal or coronal slices); only axial PET series are supported")
    if np.any(spacings[0] <= 0):
        raise FedNdifError(f"{files[0].path}: PixelSpacing {spacings[0].tolist()} is not positive")
    if len(files) < 2:
        raise FedNdifError(f"the PET series holds only {len(files)} image; a volume needs at "
                           "least 2 slices")
    positions = np.stack([_floats(f, "ImagePositionPatient", 3) for f in files])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    in_plane = positions @ np.stack([row, col], axis=1)
    if np.ptp(in_plane, axis=0).max() > 0.05 * spacings[0].min():
        raise FedNdifError("the slices are not stacked along the slice normal (their "
                           "ImagePositionPatient differ in-plane); cannot form a volume")
    steps = np.diff(along)
    duplicates = np.flatnonzero(steps < 1e-2)
    if duplicates.size:
        k = int(duplicates[0])
        paths = f"{files[order[k]].path} and {files[order[k + 1]].path}"
        raise FedNdifError(
            f"duplicated slice position: {duplicates.size} image(s) repeat a position "
            f"(e.g. {along[k]:.2f} mm along the normal: {paths}); "
            "duplicate files, or a dynamic/gated series, which is not supported")
    step = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - step) > SPACING_TOLERANCE * step)
    if uneven.size:
        k = int(uneven[0])
        ratio = steps[k] / step
        kind = (f"missing slice(s): a gap of {steps[k]:.2f} mm where the spacing is {step:.2f} mm"
                if ratio > 1.5 else
                f"uneven slice spacing: {steps[k]:.2f} mm where the median is {step:.2f} mm")
        raise FedNdifError(f"{kind}, between {along[k]:.2f} and {along[k + 1]:.2f} mm along the "
                           f"normal ({uneven.size} irregular step(s)); refusing to build a volume")
    dz = float((along[-1] - along[0]) / (len(along) - 1))
    affine = affine_from_lps(origin_lps=positions[0], row_dir=row, col_dir=col,
                             slice_dir=normal,
                             spacing_zyx=(dz, float(spacings[0][0]), float(spacings[0][1])))
    return _Geometry(order=order, affine=affine, positions=positions)


# -- dates and times -------------------------------------------------------------------------


def _parse_da(value: Any) -> date | None:
    text = str(value or "").strip().replace(".", "").replace("-", "")
    if not text:
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        parsed = DA(text)
        return date(parsed.year, parsed.month, parsed.day)


def _parse_tm(value: Any) -> time | None:
    text = str(value or "").strip().replace(":", "")
    if not text:
        return None
    parsed = TM(text)
    return time(parsed.hour, parsed.minute, parsed.second, parsed.microsecond)


def _parse_dt(value: Any) -> datetime | None:
    text = str(value or "").strip()
    if not text:
        return None
    parsed = DT(text)
    # A UTC offset, if any, is assumed to be the local time of the other attributes.
    return datetime(parsed.year, parsed.month, parsed.day, parsed.hour, parsed.minute,
                    parsed.second, parsed.microsecond)


def _combine(day: date | None, clock: time | None, near: datetime | None = None
             ) -> datetime | None:
    """Date + time; without a date, the time on ``near``'s day within 12 h of ``near``."""
    if clock is None:
        return None
    if day is None:
        if near is None:
            return None
        day = near.date()
        result = datetime.combine(day, clock)
        if result - near > timedelta(hours=12):
            result -= timedelta(days=1)
        elif near - result > timedelta(hours=12):
            result += timedelta(days=1)
        return result
    return datetime.combine(day, clock)


def _timestamp(f: _File, what: str, date_kw: str, time_kw: str, fallback_day: date | None
               ) -> datetime | None:
    try:
        day = _parse_da(f.header.get(date_kw))
        clock = _parse_tm(f.header.get(time_kw))
    except ValueError as exc:
        raise FedNdifError(f"{f.path}: {what} is malformed ({_one_line(exc)})") from exc
    return _combine(day or fallback_day, clock)


def _slice_acquisition(f: _File, reference: datetime | None) -> datetime | None:
    try:
        combined = _parse_dt(f.header.get("AcquisitionDateTime"))
        if combined is not None:
            return combined
        day = _parse_da(f.header.get("AcquisitionDate"))
        clock = _parse_tm(f.header.get("AcquisitionTime"))
    except ValueError as exc:
        raise FedNdifError(f"{f.path}: AcquisitionDate/Time is malformed ({_one_line(exc)})"
                           ) from exc
    return _combine(day, clock, reference)


def _scan_start(files: list[_File]) -> tuple[datetime, str]:
    """The START decay reference: SeriesDate/Time, or the earliest acquisition (QIBA rule)."""
    first = files[0]
    series = _timestamp(first, "SeriesDate/SeriesTime", "SeriesDate", "SeriesTime", None)
    acquisitions = [t for t in (_slice_acquisition(f, series) for f in files) if t is not None]
    earliest = min(acquisitions) if acquisitions else None
    if series is not None and (earliest is None or series <= earliest):
        return series, "SeriesDate/SeriesTime"
    if earliest is None:
        raise FedNdifError("SeriesDate/SeriesTime (0008,0021/0031) and AcquisitionDate/Time "
                           "(0008,0022/0032) are missing: the scan time, needed to decay-correct "
                           "the dose, is unknown")
    if series is not None:
        log.warning("SeriesTime is later than the earliest AcquisitionTime (series re-created "
                    "after the scan?); decaying the dose to the earliest AcquisitionDate/Time")
    return earliest, "earliest AcquisitionDate/AcquisitionTime"


def _injection_time(item: Dataset, scan: datetime) -> datetime:
    try:
        full = _parse_dt(item.get("RadiopharmaceuticalStartDateTime"))
        clock = _parse_tm(item.get("RadiopharmaceuticalStartTime"))
    except ValueError as exc:
        raise FedNdifError(f"RadiopharmaceuticalStartTime/StartDateTime is malformed "
                           f"({_one_line(exc)})") from exc
    if full is not None:
        return full
    if clock is None:
        raise FedNdifError(
            "RadiopharmaceuticalStartTime (0018,1072) and RadiopharmaceuticalStartDateTime "
            "(0018,1078) are missing: the injection time, needed to decay-correct the dose, is "
            "unknown")
    injected = datetime.combine(scan.date(), clock)
    if injected > scan:  # injected before midnight, scanned after
        injected -= timedelta(days=1)
    return injected


# -- SUV -------------------------------------------------------------------------------------


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


@dataclass
class _Suv:
    factors: np.ndarray
    decay_correction: str
    reference: str
    weight_kg: float
    dose_bq: float


def _suv(files: list[_File], *, weight_kg: float | None, dose_bq: float | None) -> _Suv:
    """SUV factor per slice (``files`` in volume order); see the module docstring for the rules."""
    first = files[0].header
    for keyword in ("Units", "DecayCorrection"):
        values = {str(f.header.get(keyword, "")).strip().upper() for f in files}
        if len(values) > 1:
            raise FedNdifError(f"inconsistent {keyword} within the series: {sorted(values)}")
    units = str(first.get("Units", "")).strip().upper()
    if units != "BQML":
        raise FedNdifError(f"Units (0054,1001) is {units or 'missing'}; only BQML (Bq/ml) PET "
                           "series can be converted to SUV")
    if weight_kg is not None:
        weight = _positive(weight_kg)
        if weight is None:
            raise FedNdifError(f"the supplied weight {weight_kg} kg is not a positive number")
    else:
        weight = _positive(first.get("PatientWeight"))
        if weight is None:
            raise FedNdifError("PatientWeight (0010,1030) is missing or zero; supply the "
                               "patient's weight with --weight KG")
    if not 1.0 <= weight <= 500.0:
        raise FedNdifError(f"patient weight {weight:g} kg is implausible (expected kg, 1-500)")
    sequence = first.get("RadiopharmaceuticalInformationSequence") or []
    item = sequence[0] if len(sequence) else Dataset()
    if dose_bq is not None:
        dose = _positive(dose_bq)
        if dose is None:
            raise FedNdifError(f"the supplied dose {dose_bq} Bq is not a positive number")
    else:
        dose = _positive(item.get("RadionuclideTotalDose"))
        if dose is None:
            raise FedNdifError("RadionuclideTotalDose (0018,1074) in "
                               "RadiopharmaceuticalInformationSequence is missing or zero; supply "
                               "the injected dose with --dose MBQ")
    weight_g = weight * 1000.0
    decay = str(first.get("DecayCorrection", "")).strip().upper()
    if decay == "ADMIN":
        factors = np.full(len(files), weight_g / dose)
        return _Suv(factors, decay, "administration (images decay-corrected to injection)",
                    weight, dose)
    if decay not in ("START", "NONE"):
        raise FedNdifError(f"DecayCorrection (0054,1102) is {decay or 'missing'}; expected START, "
                           "ADMIN or NONE")
    half_life = _positive(item.get("RadionuclideHalfLife"))
    if half_life is None:
        raise FedNdifError("RadionuclideHalfLife (0018,1075) in "
                           "RadiopharmaceuticalInformationSequence is missing or zero; cannot "
                           "decay-correct the dose")
    scan, reference = _scan_start(files)
    injected = _injection_time(item, scan)

    def decayed_dose(at: datetime, what: str) -> float:
        elapsed = (at - injected).total_seconds()
        if elapsed < 0:
            raise FedNdifError(f"the injection time is {-elapsed / 60:.1f} min after the {what}; "
                               "check RadiopharmaceuticalStartDateTime/Time")
        if elapsed > 20 * half_life:
            raise FedNdifError(f"{elapsed / 3600:.1f} h between injection and {what} is over 20 "
                               "half-lives; check the injection and scan times")
        return dose * 2.0 ** (-elapsed / half_life)

    if decay == "START":
        factors = np.full(len(files), weight_g / decayed_dose(scan, "scan start"))
        return _Suv(factors, decay, f"scan start ({reference})", weight, dose)
    # NONE: each slice at its own acquisition time, mean decay over its frame.
    lam = math.log(2.0) / half_life
    factors = np.empty(len(files))
    for k, f in enumerate(files):
        start = _slice_acquisition(f, scan)
        if start is None:
            raise FedNdifError(f"{f.path}: AcquisitionTime (0008,0032) is missing; with "
                               "DecayCorrection NONE every slice needs its acquisition time")
        in_frame = 1.0
        duration_s = (_positive(f.header.get("ActualFrameDuration")) or 0.0) / 1000.0
        if duration_s > 0:
            in_frame = -math.expm1(-lam * duration_s) / (lam * duration_s)
        factors[k] = weight_g / (decayed_dose(start, "slice acquisition") * in_frame)
    return _Suv(factors, decay, "each slice's AcquisitionDate/Time (images not decay-corrected)",
                weight, dose)


def _pixels(f: _File, shape: tuple[int, int]) -> tuple[Dataset, np.ndarray]:
    try:
        ds = pydicom.dcmread(f.path, force=f.force)
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise FedNdifError(f"{f.path}: multi-frame PET images are not supported")
        raw = ds.pixel_array
    except FedNdifError:
        raise
    except Exception as exc:
        raise FedNdifError(f"{f.path}: pixel data cannot be read; the file is truncated, corrupt "
                           f"or compressed without a decoder ({_one_line(exc)})") from exc
    if raw.shape != shape:
        raise FedNdifError(f"{f.path}: pixel data has shape {raw.shape}, expected {shape}")
    slope = _positive(ds.get("RescaleSlope", 1.0))
    try:
        intercept = float(ds.get("RescaleIntercept", 0.0))
    except (TypeError, ValueError):
        intercept = math.nan
    if slope is None or not math.isfinite(intercept):
        raise FedNdifError(f"{f.path}: RescaleSlope/RescaleIntercept is malformed")
    return ds, raw.astype(np.float64) * slope + intercept


def read_pet_series(
    folder: str | Path, *, series_uid: str | None = None, patient_weight_kg: float | None = None,
    injected_dose_bq: float | None = None,
) -> tuple[Volume, PetSeriesInfo]:
    """The PET series in ``folder`` (searched recursively) as a float32 SUV volume.

    ``series_uid`` picks one of several PET series; ``patient_weight_kg`` and
    ``injected_dose_bq`` replace (or supply missing) PatientWeight and RadionuclideTotalDose.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FedNdifError(f"{folder}: no such folder")
    files = _select_pet_series(folder, series_uid)
    geometry = _geometry(files)
    ordered = [files[i] for i in geometry.order]
    suv = _suv(ordered, weight_kg=patient_weight_kg, dose_bq=injected_dose_bq)
    shape = (int(ordered[0].header.Rows), int(ordered[0].header.Columns))
    array = np.empty((len(ordered), *shape), np.float32)
    for k, f in enumerate(ordered):
        _, values = _pixels(f, shape)
        array[k] = values * suv.factors[k]
    if not np.all(np.isfinite(array)):
        raise FedNdifError("the PET series holds NaN or infinite values after rescaling")
    template = copy.deepcopy(ordered[0].header)
    first = template
    info = PetSeriesInfo(
        template=template,
        positions_lps=geometry.positions,
        slice_attributes=[{kw: f.header[kw].value for kw in _PER_SLICE_KEYWORDS if kw in f.header}
                          for f in ordered],
        sop_instance_uids=[str(f.header.get("SOPInstanceUID", "")) for f in ordered],
        study_uid=str(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        series_uid=str(first.SeriesInstanceUID),
        series_description=str(first.get("SeriesDescription", "")),
        suv_factors=suv.factors,
        decay_correction=suv.decay_correction,
        decay_reference=suv.reference,
        weight_kg=suv.weight_kg,
        injected_dose_bq=suv.dose_bq,
    )
    if not info.study_uid:
        raise FedNdifError(f"{ordered[0].path}: StudyInstanceUID is missing")
    dz, dy, dx = Volume(array, geometry.affine).spacing
    log.info("read PET series: %d slices of %dx%d, spacing %.2f x %.2f x %.2f mm, decay "
             "correction %s (dose decayed to %s)", len(ordered), shape[0], shape[1], dz, dy, dx,
             suv.decay_correction, suv.reference)
    return Volume(array, geometry.affine), info


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _ds(value: float) -> str:
    """A float as a valid DS string (at most 16 characters)."""
    return format_number_as_ds(float(value))


def _da(moment: datetime) -> str:
    return moment.strftime("%Y%m%d")


def _tm(moment: datetime) -> str:
    return moment.strftime("%H%M%S") + (f".{moment.microsecond:06d}" if moment.microsecond
                                        else "")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


@dataclass
class _LpsGeometry:
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    step: np.ndarray  # from slice k to k+1, mm
    origin: np.ndarray
    spacing_zyx: tuple[float, float, float]


def _lps_geometry(affine: np.ndarray) -> _LpsGeometry:
    lps = LPS_TO_RAS @ np.asarray(affine, float)
    if not np.all(np.isfinite(lps)):
        raise FedNdifError("the volume's affine is not finite")
    axes = lps[:3, :3]
    sizes = np.linalg.norm(axes, axis=0)
    if np.any(sizes < 1e-6):
        raise FedNdifError("the volume's affine is singular")
    row, col, slice_dir = (axes[:, i] / sizes[i] for i in range(3))
    normal = np.cross(row, col)
    if abs(row @ col) > 1e-4 or abs(abs(slice_dir @ normal) - 1) > 1e-4:
        raise FedNdifError("the volume's affine is sheared or oblique between slices; a DICOM "
                           "slice stack needs orthogonal axes")
    return _LpsGeometry(row=row, col=col, normal=normal, step=axes[:, 2], origin=lps[:3, 3],
                        spacing_zyx=(float(sizes[2]), float(sizes[1]), float(sizes[0])))


def _quantize(values: np.ndarray) -> tuple[np.ndarray, str]:
    """int16 pixels and the RescaleSlope DS string: slope = max|slice| / 32767."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak <= 0:
        return np.zeros(values.shape, np.int16), "1"
    slope_text = _ds(peak / INT16_MAX)
    slope = float(slope_text)
    pixels = np.clip(np.rint(values / slope), -INT16_MAX - 1, INT16_MAX).astype(np.int16)
    return pixels, slope_text


def _synthetic_base(patient: SyntheticPatient) -> tuple[Dataset, dict[str, Any]]:
    """A PET Image Storage data set without per-slice or pixel attributes, and per-slice values."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    # Patient, General Study, Patient Study
    ds.PatientName = f"Synthetic^{patient.patient_id}"
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = patient.patient_sex
    ds.PatientWeight = _ds(patient.weight_kg)
    ds.StudyInstanceUID = patient.study_uid
    ds.StudyDate = _da(patient.injection_time)
    ds.StudyTime = _tm(patient.injection_time)
    ds.ReferringPhysicianName = ""
    ds.StudyID = patient.study_id
    ds.AccessionNumber = ""
    ds.StudyDescription = "Synthetic PET"
    # General Series, PET Series
    ds.Modality = "PT"
    ds.SeriesDate = _da(patient.scan_start)
    ds.SeriesTime = _tm(patient.scan_start)
    ds.BodyPartExamined = "WHOLEBODY"
    ds.Units = "BQML"
    ds.CountsSource = "EMISSION"
    ds.SeriesType = ["WHOLE BODY", "IMAGE"]
    ds.CorrectedImage = ["NORM", "DTIM", "ATTN", "SCAT", "RAN", "DECY"]
    ds.DecayCorrection = "START"
    ds.RandomsCorrectionMethod = "DLYD"
    ds.AttenuationCorrectionMethod = "measured"
    ds.ScatterCorrectionMethod = "model-based"
    ds.ReconstructionMethod = "OSEM"
    ds.CollimatorType = "NONE"
    # PET Isotope
    item = Dataset()
    item.RadionuclideCodeSequence = Sequence([_code("77004003", "SCT", "^18^Fluorine")])
    item.Radiopharmaceutical = "Fluorodeoxyglucose"
    item.RadiopharmaceuticalStartTime = _tm(patient.injection_time)
    item.RadiopharmaceuticalStartDateTime = (_da(patient.injection_time)
                                             + _tm(patient.injection_time))
    item.RadionuclideTotalDose = _ds(patient.injected_dose_bq)
    item.RadionuclideHalfLife = _ds(patient.half_life_s)
    item.RadionuclidePositronFraction = _ds(F18_POSITRON_FRACTION)
    item.RadiopharmaceuticalCodeSequence = Sequence(
        [_code("35321007", "SCT", "Fluorodeoxyglucose F^18^")])
    ds.RadiopharmaceuticalInformationSequence = Sequence([item])
    # NM/PET Patient Orientation (PatientPosition would conflict with these)
    orientation = _code("102538003", "SCT", "recumbent")
    orientation.PatientOrientationModifierCodeSequence = Sequence(
        [_code("40199007", "SCT", "supine")])
    ds.PatientOrientationCodeSequence = Sequence([orientation])
    ds.PatientGantryRelationshipCodeSequence = Sequence([_code("102540008", "SCT", "headfirst")])
    # Frame of Reference, General Equipment
    ds.FrameOfReferenceUID = patient.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "fed-ndif"
    ds.ManufacturerModelName = "simulated PET"
    ds.SoftwareVersions = _software_version()
    # Per slice: one bed, decay-corrected to its start; DecayFactor is the in-frame correction.
    lam = math.log(2.0) / patient.half_life_s
    duration = patient.frame_duration_s
    decay_factor = lam * duration / -math.expm1(-lam * duration)
    per_slice = {
        "AcquisitionDate": _da(patient.scan_start),
        "AcquisitionTime": _tm(patient.scan_start),
        "ActualFrameDuration": round(duration * 1000),
        "FrameReferenceTime": _ds(math.log(decay_factor) / lam * 1000.0),
        "DecayFactor": _ds(decay_factor),
    }
    return ds, per_slice


def _software_version() -> str:
    try:
        from fed_ndif import __version__
    except ImportError:  # pragma: no cover
        return "fed-ndif"
    return f"fed-ndif {__version__}"[:64]


def _template_base(info: PetSeriesInfo) -> Dataset:
    ds = copy.deepcopy(info.template)
    ds.remove_private_tags()
    for keyword in _DROP_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    # Keep the SUV inputs consistent with the Bq/ml we write (they may have been supplied).
    ds.PatientWeight = _ds(info.weight_kg)
    sequence = ds.get("RadiopharmaceuticalInformationSequence")
    if sequence:
        sequence[0].RadionuclideTotalDose = _ds(info.injected_dose_bq)
    _complete(ds)
    return ds


# PatientPosition -> (orientation, modifier, gantry relationship) codes (NM/PET Patient
# Orientation module, CID 19/20/21). PatientPosition itself must not accompany these codes.
_POSITION_CODES = {
    "HFS": ("supine", "headfirst"), "HFP": ("prone", "headfirst"),
    "FFS": ("supine", "feet-first"), "FFP": ("prone", "feet-first"),
    "HFDR": ("right lateral decubitus", "headfirst"), "HFDL": ("left lateral decubitus",
                                                               "headfirst"),
    "FFDR": ("right lateral decubitus", "feet-first"), "FFDL": ("left lateral decubitus",
                                                                "feet-first"),
}
_SCT = {"supine": "40199007", "prone": "1240000", "right lateral decubitus": "102536004",
        "left lateral decubitus": "102535000", "headfirst": "102540008",
        "feet-first": "102541007", "recumbent": "102538003"}
# Type 2 attributes of the PET Image IOD that may be empty; Type 1 ones with a safe default.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator",
          "Manufacturer", "CorrectedImage", "CollimatorType")
_TYPE1_DEFAULTS = {"CountsSource": "EMISSION", "SeriesType": ["WHOLE BODY", "IMAGE"]}


def _orientation_sequences(ds: Dataset) -> None:
    """Patient orientation as code sequences (from PatientPosition when the codes are absent)."""
    position = str(ds.get("PatientPosition", "")).strip().upper()
    if "PatientPosition" in ds:
        del ds.PatientPosition
    if "PatientOrientationCodeSequence" in ds and "PatientGantryRelationshipCodeSequence" in ds:
        return
    codes = _POSITION_CODES.get(position)
    if codes is None:
        ds.PatientOrientationCodeSequence = ds.get("PatientOrientationCodeSequence", Sequence())
        ds.PatientGantryRelationshipCodeSequence = ds.get(
            "PatientGantryRelationshipCodeSequence", Sequence())
        return
    modifier, gantry = codes
    if "PatientOrientationCodeSequence" not in ds:
        orientation = _code(_SCT["recumbent"], "SCT", "recumbent")
        orientation.PatientOrientationModifierCodeSequence = Sequence(
            [_code(_SCT[modifier], "SCT", modifier)])
        ds.PatientOrientationCodeSequence = Sequence([orientation])
    if "PatientGantryRelationshipCodeSequence" not in ds:
        ds.PatientGantryRelationshipCodeSequence = Sequence([_code(_SCT[gantry], "SCT", gantry)])


def _complete(ds: Dataset) -> None:
    """Fill what a conformant PET object needs but a (non-conformant) source lacked."""
    filled = []
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
            filled.append(keyword)
    for keyword, value in _TYPE1_DEFAULTS.items():
        if not ds.get(keyword):
            setattr(ds, keyword, value)
            filled.append(keyword)
    if "BodyPartExamined" not in ds and "Laterality" not in ds:
        ds.Laterality = ""  # unknown (Type 2C)
    _orientation_sequences(ds)
    sequence = ds.get("RadiopharmaceuticalInformationSequence")
    if sequence is None:
        ds.RadiopharmaceuticalInformationSequence = Sequence()
    for item in ds.RadiopharmaceuticalInformationSequence:
        if "RadionuclideCodeSequence" not in item:
            item.RadionuclideCodeSequence = Sequence()
    if filled:
        log.info("source series lacked %s; written empty or with defaults", ", ".join(filled))


def _complete_slice(ds: Dataset, decay_correction: str) -> None:
    for keyword in ("AcquisitionDate", "AcquisitionTime", "ActualFrameDuration"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "FrameReferenceTime" not in ds:
        ds.FrameReferenceTime = "0"
    if decay_correction != "NONE" and "DecayFactor" not in ds:
        ds.DecayFactor = "1"


def write_pet_series(
    volume: Volume, out_dir: str | Path, *, template: PetSeriesInfo | None,
    series_description: str, derivation_description: str, overwrite: bool = False,
    synthetic_patient: SyntheticPatient | None = None, series_number: int | None = None,
    uid_entropy: list[str] | None = None, content_datetime: datetime | None = None,
) -> Path:
    """Write ``volume`` (SUV) as a derived PET series (Bq/ml, int16 per-slice slope) in ``out_dir``.

    With ``template`` the series joins the source study (same StudyInstanceUID and
    FrameOfReferenceUID, source decay reference kept, so SUV reads back unchanged); without one a
    complete PET object is built from ``synthetic_patient``. Atomic: written to a hidden sibling
    folder and renamed; an existing ``out_dir`` is replaced only with ``overwrite`` and only after
    the new series is complete.

    Reproducible files (simulated data): ``uid_entropy`` derives the SeriesInstanceUID and
    SOPInstanceUIDs from the given strings (``generate_uid(entropy_srcs=...)``) instead of at
    random, and ``content_datetime`` replaces "now" as ContentDate/Time and
    InstanceCreationDate/Time.
    """
    out_dir = Path(out_dir)
    if (template is None) == (synthetic_patient is None):
        raise ValueError("give exactly one of template and synthetic_patient")
    if out_dir.exists() and not overwrite:
        raise FedNdifError(f"{out_dir} exists; pass --overwrite (overwrite=True) to replace it")
    if not np.all(np.isfinite(volume.array)):
        raise FedNdifError("the volume holds NaN or infinite values; cannot write DICOM")
    geometry = _lps_geometry(volume.affine)
    nz, ny, nx = volume.array.shape
    positions = geometry.origin + np.arange(nz)[:, None] * geometry.step[None, :]

    if template is not None:
        base = _template_base(template)
        # Each output slice takes its decay/time attributes from the nearest source slice.
        source_along = template.positions_lps @ geometry.normal
        nearest = np.abs((positions @ geometry.normal)[:, None] - source_along[None, :])
        source_index = np.argmin(nearest, axis=1)
        exact = nearest[np.arange(nz), source_index] < 1e-2
        factors = template.suv_factors[source_index]
        per_slice = [template.slice_attributes[i] for i in source_index]
        sources = [(template.sop_instance_uids[i] if ok else None)
                   for i, ok in zip(source_index, exact, strict=True)]
        number = series_number if series_number is not None else (
            int(base.get("SeriesNumber") or 0) + 1000)
    else:
        assert synthetic_patient is not None
        base, attributes = _synthetic_base(synthetic_patient)
        factors = np.full(nz, synthetic_patient.suv_factor)
        per_slice = [attributes] * nz
        sources = [None] * nz
        number = series_number if series_number is not None else 1

    def new_uid(*what: str) -> str:
        if uid_entropy is None:
            return generate_uid()
        return generate_uid(entropy_srcs=[*map(str, uid_entropy), *what])

    now = content_datetime or datetime.now()
    base.file_meta = FileMetaDataset()
    base.SOPClassUID = PET_IMAGE_STORAGE
    base.SeriesInstanceUID = new_uid("series")
    base.SeriesNumber = number
    base.SeriesDescription = series_description[:64]
    base.DerivationDescription = derivation_description[:1024]
    base.ImageType = ["DERIVED", "PRIMARY"]
    base.Units = "BQML"
    base.NumberOfSlices = nz
    base.ContentDate = _da(now)
    base.ContentTime = _tm(now)
    base.InstanceCreationDate = _da(now)
    base.InstanceCreationTime = _tm(now)
    base.ImageOrientationPatient = [_ds(v) for v in (*geometry.row, *geometry.col)]
    dz, dy, dx = geometry.spacing_zyx
    base.PixelSpacing = [_ds(dy), _ds(dx)]
    base.SliceThickness = _ds(dz)
    base.SpacingBetweenSlices = _ds(dz)
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = ny, nx
    base.BitsAllocated, base.BitsStored, base.HighBit = 16, 16, 15
    base.PixelRepresentation = 1
    base.RescaleIntercept = "0"

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for k in range(nz):
            ds = copy.deepcopy(base)
            for keyword, value in per_slice[k].items():
                setattr(ds, keyword, value)
            _complete_slice(ds, str(ds.get("DecayCorrection", "")).upper())
            ds.SOPInstanceUID = new_uid("instance", str(k))
            ds.InstanceNumber = k + 1
            ds.ImageIndex = k + 1
            ds.ImagePositionPatient = [_ds(v) for v in positions[k]]
            ds.SliceLocation = _ds(float(positions[k] @ geometry.normal))
            if sources[k] is not None:
                ref = Dataset()
                ref.ReferencedSOPClassUID = PET_IMAGE_STORAGE
                ref.ReferencedSOPInstanceUID = sources[k]
                ref.PurposeOfReferenceCodeSequence = Sequence([_code(
                    "121322", "DCM", "Source image for image processing operation")])
                ds.SourceImageSequence = Sequence([ref])
            pixels, slope = _quantize(volume.array[k].astype(np.float64) / factors[k])
            ds.RescaleSlope = slope
            ds.add_new(0x7FE00010, "OW", pixels.astype("<i2").tobytes())  # PixelData
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = PET_IMAGE_STORAGE
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(tmp / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
        replace_path(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote derived PET series: %d slices to %s", nz, out_dir)
    return out_dir


__all__ = [
    "PetSeriesInfo",
    "SyntheticPatient",
    "read_pet_series",
    "write_pet_series",
]

"""Reading a PET DICOM series into a float32 SUV volume.

Anything we cannot handle is refused with one clear :class:`~fed_ndif.errors.FedNdifError`
rather than turned into a silently wrong volume. Patient-identifying attributes are never logged.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from fed_ndif.data.dicom.geometry import series_geometry
from fed_ndif.data.dicom.series import DicomFile, one_line, open_dicom, select_pet_series
from fed_ndif.data.dicom.suv import check_weight_and_dose, positive, suv_factors
from fed_ndif.data.volume import Volume
from fed_ndif.errors import FedNdifError

log = logging.getLogger(__name__)

# Attributes that vary per slice in a PET series and are copied from the nearest source slice.
_PER_SLICE_KEYWORDS = ("AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime",
                      "FrameReferenceTime", "ActualFrameDuration", "DecayFactor",
                      "DoseCalibrationFactor")


@dataclass
class PetSeriesInfo:
    """What a derived series needs from its source series (no pixel data).

    ``suv_factors[k]`` converts slice k (in volume order) from ``units`` to SUV: from Bq/ml
    (the same for every slice unless DecayCorrection is NONE), or 1 for a series read in SUV
    (``units`` GML: stored in SUV, or Philips counts with their SUV scale factor). A derived
    series is written in ``units``. Weight and dose are None when SUV did not need them.
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
    weight_kg: float | None
    injected_dose_bq: float | None
    units: str = "BQML"

    @property
    def suv_factor(self) -> float:
        """The SUV factor (SUV per Bq/ml) of the first slice; all slices unless NONE."""
        return float(self.suv_factors[0])


def _pixels(f: DicomFile, shape: tuple[int, int]) -> np.ndarray:
    """The slice's stored values after RescaleSlope/RescaleIntercept (Bq/ml)."""
    ds = None
    try:
        ds = open_dicom(f.path, force=f.force, stop_before_pixels=False)
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise FedNdifError(f"{f.path}: multi-frame PET images are not supported")
        raw = ds.pixel_array
    except FedNdifError:
        raise
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        what = f" (transfer syntax {syntax.name})" if syntax is not None else ""
        raise FedNdifError(f"{f.path}: pixel data cannot be read{what}; the file is truncated, "
                           f"corrupt or compressed without a decoder ({one_line(exc)})") from exc
    if raw.shape != shape:
        raise FedNdifError(f"{f.path}: pixel data has shape {raw.shape}, expected {shape}")
    slope = positive(ds.get("RescaleSlope", 1.0))
    try:
        intercept = float(ds.get("RescaleIntercept", 0.0))
    except (TypeError, ValueError):
        intercept = math.nan
    if slope is None or not math.isfinite(intercept):
        raise FedNdifError(f"{f.path}: RescaleSlope/RescaleIntercept is malformed")
    return raw.astype(np.float64) * slope + intercept


def read_pet_series(
    folder: str | Path, *, series_uid: str | None = None, patient_weight_kg: float | None = None,
    injected_dose_bq: float | None = None,
) -> tuple[Volume, PetSeriesInfo]:
    """The PET series in ``folder`` (searched recursively) as a float32 SUV volume.

    ``series_uid`` picks one of several PET series; ``patient_weight_kg`` and
    ``injected_dose_bq`` replace (or supply missing) PatientWeight and RadionuclideTotalDose.
    """
    folder = Path(folder)
    check_weight_and_dose(patient_weight_kg, injected_dose_bq)
    if not folder.is_dir():
        raise FedNdifError(f"{folder}: no such folder")
    files = select_pet_series(folder, series_uid)
    return read_pet_files(files, patient_weight_kg=patient_weight_kg,
                          injected_dose_bq=injected_dose_bq)


def read_pet_files(
    files: list[DicomFile], *, patient_weight_kg: float | None = None,
    injected_dose_bq: float | None = None, log_level: int = logging.INFO,
) -> tuple[Volume, PetSeriesInfo]:
    """The files of one PET series (found by :func:`select_pet_series` or a scan of a whole
    export) as a float32 SUV volume; see :func:`read_pet_series`. ``log_level``: of the line
    that describes the series (a batch of series logs it at DEBUG)."""
    geometry = series_geometry(files)
    ordered = [files[i] for i in geometry.order]
    suv = suv_factors(ordered, weight_kg=patient_weight_kg, dose_bq=injected_dose_bq)
    shape = (int(ordered[0].header.Rows), int(ordered[0].header.Columns))
    array = np.empty((len(ordered), *shape), np.float32)
    for k, f in enumerate(ordered):
        array[k] = _pixels(f, shape) * (suv.scales[k] * suv.factors[k])
    if not np.all(np.isfinite(array)):
        raise FedNdifError("the PET series holds NaN or infinite values after rescaling")
    template = copy.deepcopy(ordered[0].header)
    info = PetSeriesInfo(
        template=template,
        positions_lps=geometry.positions,
        slice_attributes=[{kw: f.header[kw].value for kw in _PER_SLICE_KEYWORDS if kw in f.header}
                          for f in ordered],
        sop_instance_uids=[str(f.header.get("SOPInstanceUID", "")) for f in ordered],
        study_uid=str(template.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(template.get("FrameOfReferenceUID", "")),
        series_uid=str(template.SeriesInstanceUID),
        series_description=str(template.get("SeriesDescription", "")),
        suv_factors=suv.factors,
        decay_correction=suv.decay_correction,
        decay_reference=suv.reference,
        weight_kg=suv.weight_kg,
        injected_dose_bq=suv.dose_bq,
        units=suv.units,
    )
    if not info.study_uid:
        raise FedNdifError(f"{ordered[0].path}: StudyInstanceUID is missing")
    volume = Volume(array, geometry.affine)
    dz, dy, dx = volume.spacing
    log.log(log_level, "read PET series: %d slices of %dx%d, spacing %.2f x %.2f x %.2f mm, "
            "stored in %s, decay correction %s (dose decayed to %s)", len(ordered), shape[0],
            shape[1], dz, dy, dx, suv.source_units, suv.decay_correction or "none", suv.reference)
    return volume, info

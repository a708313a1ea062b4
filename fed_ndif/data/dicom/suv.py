"""Body-weight SUV factors of a PET series: Bq/ml times the factor of its slice gives SUV.

``SUV = activity concentration (Bq/ml) × weight (g) / decayed dose (Bq)`` (1 g/ml tissue density
assumed). DecayCorrection (0054,1102) decides the decay reference (DICOM PS3.3 C.8.9.1.1.5 and
C.8.9.1.1.2):

* ``START``: pixels are decay-corrected to SeriesDate/SeriesTime (the series reference time,
  normally the scan start); the dose is decayed from injection to that time. When SeriesTime is
  later than the earliest AcquisitionTime (a series re-created after the scan), the earliest
  AcquisitionDate/Time is used instead (the QIBA vendor-neutral rule).
* ``ADMIN``: pixels are already decay-corrected to the administration time: no dose decay.
* ``NONE``: pixels are the mean concentration measured during each frame; the dose is decayed to
  each slice's own AcquisitionDate/Time (frame start) and, when ActualFrameDuration is known, by
  the mean decay over the frame ``(1 - exp(-λT)) / (λT)``.

Only patient weight and dose ever come from outside the files (the CLI's ``--weight KG`` /
``--dose MBQ``), and :func:`check_weight_and_dose` is the one check of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from fed_ndif.data.dicom.series import DicomFile
from fed_ndif.data.dicom.times import injection_time, scan_start, slice_acquisition
from fed_ndif.errors import FedNdifError

F18_HALF_LIFE_S = 6586.2  # 109.77 min
F18_POSITRON_FRACTION = 0.9673


def positive(value: Any) -> float | None:
    """``value`` as a finite positive float, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def check_weight_and_dose(weight_kg: float | None, dose_bq: float | None) -> None:
    """Refuse a supplied patient weight (kg) or injected dose (Bq) that is not a finite positive
    number; None means not supplied. The messages name the CLI options, the dose in MBq as
    ``--dose`` takes it."""
    for option, value, unit in (("--weight", weight_kg, 1.0), ("--dose", dose_bq, 1e6)):
        if value is not None and positive(value) is None:
            try:
                shown = format(float(value) / unit, "g")
            except (TypeError, ValueError):
                shown = repr(value)
            raise FedNdifError(f"{option} must be a positive number, got {shown}")


@dataclass
class Suv:
    """The SUV factor of each slice and what it rests on."""

    factors: np.ndarray
    decay_correction: str
    reference: str  # what the dose was decayed to, in words
    weight_kg: float
    dose_bq: float


def _consistent_upper(files: list[DicomFile], keyword: str) -> str:
    values = {str(f.header.get(keyword, "")).strip().upper() for f in files}
    if len(values) > 1:
        raise FedNdifError(f"inconsistent {keyword} within the series: {sorted(values)}")
    return str(files[0].header.get(keyword, "")).strip().upper()


def suv_factors(files: list[DicomFile], *, weight_kg: float | None, dose_bq: float | None
                ) -> Suv:
    """SUV factor per slice (``files`` in volume order); see the module docstring for the rules.

    ``weight_kg`` / ``dose_bq`` replace the files' values; they are checked by
    :func:`check_weight_and_dose` beforehand.
    """
    first = files[0].header
    units = _consistent_upper(files, "Units")
    decay = _consistent_upper(files, "DecayCorrection")
    if units != "BQML":
        raise FedNdifError(f"Units (0054,1001) is {units or 'missing'}; only BQML (Bq/ml) PET "
                           "series can be converted to SUV")
    weight = positive(weight_kg if weight_kg is not None else first.get("PatientWeight"))
    if weight is None:
        raise FedNdifError("PatientWeight (0010,1030) is missing or zero; supply the "
                           "patient's weight with --weight KG")
    if not 1.0 <= weight <= 500.0:
        raise FedNdifError(f"patient weight {weight:g} kg is implausible (expected kg, 1-500)")
    sequence = first.get("RadiopharmaceuticalInformationSequence") or []
    item = sequence[0] if len(sequence) else Dataset()
    dose = positive(dose_bq if dose_bq is not None else item.get("RadionuclideTotalDose"))
    if dose is None:
        raise FedNdifError("RadionuclideTotalDose (0018,1074) in "
                           "RadiopharmaceuticalInformationSequence is missing or zero; supply "
                           "the injected dose with --dose MBQ")
    weight_g = weight * 1000.0
    if decay == "ADMIN":
        factors = np.full(len(files), weight_g / dose)
        return Suv(factors, decay, "administration (images decay-corrected to injection)",
                   weight, dose)
    if decay not in ("START", "NONE"):
        raise FedNdifError(f"DecayCorrection (0054,1102) is {decay or 'missing'}; expected START, "
                           "ADMIN or NONE")
    half_life = positive(item.get("RadionuclideHalfLife"))
    if half_life is None:
        raise FedNdifError("RadionuclideHalfLife (0018,1075) in "
                           "RadiopharmaceuticalInformationSequence is missing or zero; cannot "
                           "decay-correct the dose")
    scan, reference = scan_start(files)
    injected = injection_time(item, scan)

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
        return Suv(factors, decay, f"scan start ({reference})", weight, dose)
    # NONE: each slice at its own acquisition time, mean decay over its frame.
    lam = math.log(2.0) / half_life
    factors = np.empty(len(files))
    for k, f in enumerate(files):
        start = slice_acquisition(f, scan)
        if start is None:
            raise FedNdifError(f"{f.path}: AcquisitionTime (0008,0032) is missing; with "
                               "DecayCorrection NONE every slice needs its acquisition time")
        in_frame = 1.0
        duration_s = (positive(f.header.get("ActualFrameDuration")) or 0.0) / 1000.0
        if duration_s > 0:
            in_frame = -math.expm1(-lam * duration_s) / (lam * duration_s)
        factors[k] = weight_g / (decayed_dose(start, "slice acquisition") * in_frame)
    return Suv(factors, decay, "each slice's AcquisitionDate/Time (images not decay-corrected)",
               weight, dose)

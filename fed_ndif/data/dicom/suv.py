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

Units (0054,1001) other than Bq/ml, as exports hold them: ``GML`` (already SUV body weight,
e.g. from a workstation) is taken as it is; Philips ``CNTS`` series that carry the private
activity concentration scale factor (7053,1009) are turned into Bq/ml by it (then SUV as
above), and those with only the private SUV scale factor (7053,1000) straight into SUV. Any
other unit cannot be turned into SUV and is refused.

Only patient weight and dose ever come from outside the files (the CLI's ``--weight KG`` /
``--dose MBQ``), and :func:`check_weight_and_dose` is the one check of them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from fed_ndif.data.dicom.series import DicomFile
from fed_ndif.data.dicom.times import injection_time, scan_start, slice_acquisition
from fed_ndif.errors import FedNdifError

log = logging.getLogger(__name__)

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


PHILIPS_PET_GROUP = "Philips PET Private Group"  # private creator of group 7053
PHILIPS_SUV_FACTOR = 0x00  # (7053,xx00) SUV Scale Factor: CNTS -> SUV (body weight)
PHILIPS_ACTIVITY_FACTOR = 0x09  # (7053,xx09) Activity Concentration Scale Factor: -> Bq/ml


@dataclass
class Suv:
    """How slice k's rescaled stored values become SUV: ``value * scales[k] * factors[k]``.

    ``scales`` turn the stored unit into ``units`` (Bq/ml, or SUV for GML); ``factors`` turn
    Bq/ml into SUV (1 when ``units`` is GML). Weight and dose are None when not used.
    """

    factors: np.ndarray
    decay_correction: str
    reference: str  # what the dose was decayed to, in words
    weight_kg: float | None
    dose_bq: float | None
    scales: np.ndarray | None = None
    units: str = "BQML"
    source_units: str = "BQML"

    def __post_init__(self) -> None:
        if self.scales is None:
            self.scales = np.ones(len(self.factors))


def _private_number(f: DicomFile, element: int) -> float | None:
    """A Philips group 7053 number (DS, or UN bytes from an implicit VR file), None if absent."""
    header = f.header
    try:
        block = header.private_block(0x7053, PHILIPS_PET_GROUP)
        tag = block.get_tag(element)
    except KeyError:
        tag = 0x70531000 + element  # no private creator: the usual block
    if tag not in header:
        return None
    value = header[tag].value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace").strip("\x00 ").split("\\")[0]
    elif isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    number = positive(value)
    if number is None:
        raise FedNdifError(f"{f.path}: Philips private factor (7053,{0x1000 + element:04X}) is "
                           f"{value!r}, not a positive number; cannot turn counts into SUV")
    return number


def _philips_scales(files: list[DicomFile], element: int) -> np.ndarray | None:
    """Per-slice Philips factor, None when no slice has it; refuses a series with gaps."""
    values = [_private_number(f, element) for f in files]
    if all(v is None for v in values):
        return None
    missing = [f for f, v in zip(files, values, strict=True) if v is None]
    if missing:
        raise FedNdifError(f"{missing[0].path}: Philips private factor (7053,"
                           f"{0x1000 + element:04X}) is missing on {len(missing)} of "
                           f"{len(files)} slices; cannot turn counts into SUV")
    return np.asarray(values, np.float64)


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
    scales = np.ones(len(files))
    if units == "GML":
        if weight_kg is not None or dose_bq is not None:
            log.warning("the series is already in SUV (Units GML); the supplied weight/dose "
                        "is not used")
        return Suv(np.ones(len(files)), decay, "none (the series is stored in SUV, Units GML)",
                   None, None, units="GML", source_units="GML")
    if units == "CNTS":
        activity = _philips_scales(files, PHILIPS_ACTIVITY_FACTOR)
        suv = _philips_scales(files, PHILIPS_SUV_FACTOR) if activity is None else None
        if activity is None and suv is None:
            raise FedNdifError(
                f"{files[0].path}: Units (0054,1001) is CNTS without the Philips private scale "
                "factors (7053,1009) or (7053,1000); counts cannot be turned into SUV")
        if activity is None:
            if weight_kg is not None or dose_bq is not None:
                log.warning("SUV comes from the Philips SUV scale factor (7053,1000); the "
                            "supplied weight/dose is not used")
            return Suv(np.ones(len(files)), decay, "the scanner's (Philips SUV scale factor "
                       "(7053,1000))", None, None, scales=suv, units="GML",
                       source_units="CNTS")
        scales = activity
    elif units != "BQML":
        raise FedNdifError(f"{files[0].path}: Units (0054,1001) is {units or 'missing'}; only "
                           "BQML (Bq/ml), GML (SUV) or Philips CNTS with its scale factors can "
                           "be converted to SUV")
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
                   weight, dose, scales=scales, source_units=units)
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
        return Suv(factors, decay, f"scan start ({reference})", weight, dose, scales=scales,
                   source_units=units)
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
               weight, dose, scales=scales, source_units=units)

"""The header (everything but the per-slice geometry and pixels) of a PET series we write.

A derived series copies its source series' header, so that it joins the same study and frame of
reference and keeps the decay reference (SUV then reads back unchanged); a simulated subject has
no source, so :class:`SyntheticPatient` supplies a complete PET Image Storage header. Both are
completed to what a conformant PET object needs, since viewers and PACS refuse less.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

from fed_ndif import __version__
from fed_ndif.data.dicom.read import PetSeriesInfo
from fed_ndif.data.dicom.suv import F18_HALF_LIFE_S, F18_POSITRON_FRACTION

log = logging.getLogger(__name__)

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


def ds_text(value: float) -> str:
    """A float as a valid DS string (at most 16 characters)."""
    return format_number_as_ds(float(value))


def da_text(moment: datetime) -> str:
    return moment.strftime("%Y%m%d")


def tm_text(moment: datetime) -> str:
    return moment.strftime("%H%M%S") + (f".{moment.microsecond:06d}" if moment.microsecond
                                        else "")


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


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


def synthetic_header(patient: SyntheticPatient) -> tuple[Dataset, dict[str, Any]]:
    """A PET Image Storage data set without per-slice or pixel attributes, and per-slice values."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    # Patient, General Study, Patient Study
    ds.PatientName = f"Synthetic^{patient.patient_id}"
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = patient.patient_sex
    ds.PatientWeight = ds_text(patient.weight_kg)
    ds.StudyInstanceUID = patient.study_uid
    ds.StudyDate = da_text(patient.injection_time)
    ds.StudyTime = tm_text(patient.injection_time)
    ds.ReferringPhysicianName = ""
    ds.StudyID = patient.study_id
    ds.AccessionNumber = ""
    ds.StudyDescription = "Synthetic PET"
    # General Series, PET Series
    ds.Modality = "PT"
    ds.SeriesDate = da_text(patient.scan_start)
    ds.SeriesTime = tm_text(patient.scan_start)
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
    item.RadionuclideCodeSequence = Sequence([code_item("77004003", "SCT", "^18^Fluorine")])
    item.Radiopharmaceutical = "Fluorodeoxyglucose"
    item.RadiopharmaceuticalStartTime = tm_text(patient.injection_time)
    item.RadiopharmaceuticalStartDateTime = (da_text(patient.injection_time)
                                             + tm_text(patient.injection_time))
    item.RadionuclideTotalDose = ds_text(patient.injected_dose_bq)
    item.RadionuclideHalfLife = ds_text(patient.half_life_s)
    item.RadionuclidePositronFraction = ds_text(F18_POSITRON_FRACTION)
    item.RadiopharmaceuticalCodeSequence = Sequence(
        [code_item("35321007", "SCT", "Fluorodeoxyglucose F^18^")])
    ds.RadiopharmaceuticalInformationSequence = Sequence([item])
    # NM/PET Patient Orientation (PatientPosition would conflict with these)
    orientation = code_item(_SCT["recumbent"], "SCT", "recumbent")
    orientation.PatientOrientationModifierCodeSequence = Sequence(
        [code_item(_SCT["supine"], "SCT", "supine")])
    ds.PatientOrientationCodeSequence = Sequence([orientation])
    ds.PatientGantryRelationshipCodeSequence = Sequence(
        [code_item(_SCT["headfirst"], "SCT", "headfirst")])
    # Frame of Reference, General Equipment
    ds.FrameOfReferenceUID = patient.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "fed-ndif"
    ds.ManufacturerModelName = "simulated PET"
    ds.SoftwareVersions = f"fed-ndif {__version__}"[:64]
    # Per slice: one bed, decay-corrected to its start; DecayFactor is the in-frame correction.
    lam = math.log(2.0) / patient.half_life_s
    duration = patient.frame_duration_s
    decay_factor = lam * duration / -math.expm1(-lam * duration)
    per_slice = {
        "AcquisitionDate": da_text(patient.scan_start),
        "AcquisitionTime": tm_text(patient.scan_start),
        "ActualFrameDuration": round(duration * 1000),
        "FrameReferenceTime": ds_text(math.log(decay_factor) / lam * 1000.0),
        "DecayFactor": ds_text(decay_factor),
    }
    return ds, per_slice


def template_header(info: PetSeriesInfo) -> Dataset:
    """The source series' header without what describes its pixels, completed to conformance."""
    ds = copy.deepcopy(info.template)
    ds.remove_private_tags()
    for keyword in _DROP_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    # Keep the SUV inputs consistent with the Bq/ml we write (they may have been supplied).
    if info.weight_kg is not None:
        ds.PatientWeight = ds_text(info.weight_kg)
    sequence = ds.get("RadiopharmaceuticalInformationSequence")
    if sequence and info.injected_dose_bq is not None:
        sequence[0].RadionuclideTotalDose = ds_text(info.injected_dose_bq)
    _complete(ds)
    return ds


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
        orientation = code_item(_SCT["recumbent"], "SCT", "recumbent")
        orientation.PatientOrientationModifierCodeSequence = Sequence(
            [code_item(_SCT[modifier], "SCT", modifier)])
        ds.PatientOrientationCodeSequence = Sequence([orientation])
    if "PatientGantryRelationshipCodeSequence" not in ds:
        ds.PatientGantryRelationshipCodeSequence = Sequence(
            [code_item(_SCT[gantry], "SCT", gantry)])


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


def complete_slice(ds: Dataset, decay_correction: str) -> None:
    """Per-slice attributes a conformant PET image needs, where the source slice lacked them."""
    for keyword in ("AcquisitionDate", "AcquisitionTime", "ActualFrameDuration"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "FrameReferenceTime" not in ds:
        ds.FrameReferenceTime = "0"
    if decay_correction != "NONE" and "DecayFactor" not in ds:
        ds.DecayFactor = "1"

"""Telling a derived (post-processed) series from an acquisition, and marking our own output.

A derived series keeps its source's frame durations and corrections, so nothing in the PET
attributes tells it from the scan it was made from; a PACS keeps every series of a study together
and an export or a routing rule brings it back. Our own output is therefore marked twice, the way
DICOM says a series was made by software (a coded Derivation Code Sequence entry and a
Contributing Equipment Sequence entry naming fed-ndif), and every series is checked for those
and for the markers other software leaves before it is denoised or paired as training data.
"""

from __future__ import annotations

from datetime import datetime

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fed_ndif import __version__
from fed_ndif.data.dicom.header import code_item

# fed-ndif's own derivation code (a local coding scheme: designators starting with 99).
OUR_SCHEME = "99FEDNDIF"
OUR_CODE = "DENOISED"
OUR_MEANING = "fed-ndif denoising"
OUR_MANUFACTURER = "fed-ndif"
# Contributing Equipment purposes (CID 7005) that mean new pixels were computed. Modifying
# (109103) and de-identifying (109104) equipment change headers only, and an anonymized
# acquisition stays an acquisition.
PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")
# Source Image Sequence purpose: "Source image for image processing operation".
SOURCE_FOR_PROCESSING = "121322"


def our_derivation_code() -> Dataset:
    return code_item(OUR_CODE, OUR_SCHEME, OUR_MEANING)


def our_equipment(description: str, moment: datetime) -> Dataset:
    """The Contributing Equipment Sequence item that names fed-ndif as what made the pixels."""
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = Sequence([code_item(*PROCESSING_EQUIPMENT)])
    item.Manufacturer = OUR_MANUFACTURER
    item.ManufacturerModelName = "fed-ndif denoiser"
    item.SoftwareVersions = f"fed-ndif {__version__}"[:64]
    item.ContributionDateTime = moment.strftime("%Y%m%d%H%M%S")
    item.ContributionDescription = description[:64]
    return item


def mark_as_ours(ds: Dataset, description: str, moment: datetime) -> None:
    """Mark ``ds`` (a derived series' header) as fed-ndif's output: ImageType DERIVED, our
    derivation code, and our Contributing Equipment entry after any the source carried."""
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DerivationCodeSequence = Sequence([our_derivation_code()])
    kept = [item for item in ds.get("ContributingEquipmentSequence", []) if not _is_ours(item)]
    ds.ContributingEquipmentSequence = Sequence([*kept, our_equipment(description, moment)])


def _is_ours(item: Dataset) -> bool:
    return str(item.get("Manufacturer", "")).strip() == OUR_MANUFACTURER and _has_code(
        item.get("PurposeOfReferenceCodeSequence"), PROCESSING_EQUIPMENT[0])


def _has_code(sequence, value: str, scheme: str | None = None) -> bool:
    for code in sequence or []:
        if str(code.get("CodeValue", "")).strip() == value and (
                scheme is None or str(code.get("CodingSchemeDesignator", "")).strip() == scheme):
            return True
    return False


def _text(value: object, limit: int = 40) -> str:
    """A short, printable piece of a header value (software names, code meanings)."""
    text = " ".join(str(value or "").split())
    return "".join(c for c in text if c.isprintable())[:limit]


def derived_reason(header: Dataset) -> str | None:
    """Why the series of ``header`` is not an acquisition, or None when nothing says so.

    Recognised: fed-ndif's own marker; ImageType DERIVED (value 1) or SECONDARY (value 2); any
    Derivation Code Sequence entry; a Contributing Equipment entry of purpose Processing
    Equipment (the other vendors' denoisers and workstations); a Source Image Sequence entry
    "for image processing operation". Descriptions are never read. The reason names no
    patient attribute or UID.
    """
    codes = header.get("DerivationCodeSequence")
    equipment = header.get("ContributingEquipmentSequence") or []
    if _has_code(codes, OUR_CODE, OUR_SCHEME) or any(_is_ours(item) for item in equipment):
        return "fed-ndif's own output (its derivation code and contributing equipment)"
    image_type = [str(v).strip().upper() for v in (header.get("ImageType") or [])]
    if image_type[:1] == ["DERIVED"]:
        return "a derived series (ImageType DERIVED), not an acquisition"
    if image_type[1:2] == ["SECONDARY"]:
        return "a derived series (ImageType SECONDARY), not an acquisition"
    for code in codes or []:
        return f"a post-processed series (derivation: {_text(code.get('CodeMeaning'))})"
    for item in equipment:
        if _has_code(item.get("PurposeOfReferenceCodeSequence"), PROCESSING_EQUIPMENT[0]):
            name = _text(item.get("Manufacturer")) or "unnamed software"
            return f"a post-processed series (processing equipment: {name})"
    for item in header.get("SourceImageSequence") or []:
        if _has_code(item.get("PurposeOfReferenceCodeSequence"), SOURCE_FOR_PROCESSING):
            return "a post-processed series (its source images were processed into it)"
    return None

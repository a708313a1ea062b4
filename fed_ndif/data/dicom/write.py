"""Writing a volume (SUV) as a derived PET DICOM series (Bq/ml, int16 with a per-slice slope).

The series is staged and renamed into place, so a reader never sees half a series and a failed
write leaves nothing behind.
"""

from __future__ import annotations

import copy
import logging
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fed_ndif.data.dicom.derived import mark_as_ours
from fed_ndif.data.dicom.geometry import lps_geometry
from fed_ndif.data.dicom.header import (
    SyntheticPatient,
    code_item,
    complete_slice,
    da_text,
    ds_text,
    synthetic_header,
    template_header,
    tm_text,
)
from fed_ndif.data.dicom.read import PetSeriesInfo
from fed_ndif.data.dicom.series import PET_IMAGE_STORAGE
from fed_ndif.data.volume import Volume
from fed_ndif.errors import FedNdifError
from fed_ndif.staging import staged_folder

log = logging.getLogger(__name__)

INT16_MAX = 32767


def _quantize(values: np.ndarray) -> tuple[np.ndarray, str]:
    """int16 pixels and the RescaleSlope DS string: slope = max|slice| / 32767."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak <= 0:
        return np.zeros(values.shape, np.int16), "1"
    slope_text = ds_text(peak / INT16_MAX)
    slope = float(slope_text)
    pixels = np.clip(np.rint(values / slope), -INT16_MAX - 1, INT16_MAX).astype(np.int16)
    return pixels, slope_text


def write_pet_series(
    volume: Volume, out_dir: str | Path, *, template: PetSeriesInfo | None,
    series_description: str, derivation_description: str, overwrite: bool = False,
    synthetic_patient: SyntheticPatient | None = None, series_number: int | None = None,
    uid_entropy: list[str] | None = None, content_datetime: datetime | None = None,
) -> Path:
    """Write ``volume`` (SUV) as a derived PET series (Bq/ml, int16 per-slice slope) in ``out_dir``.

    With ``template`` the series joins the source study (same StudyInstanceUID and
    FrameOfReferenceUID, source decay reference kept, so SUV reads back unchanged) and is marked
    as fed-ndif's derived output (:mod:`.derived`); without one a complete PET object is built
    from ``synthetic_patient``, as an acquisition (ImageType ORIGINAL; ``derivation_description``
    is not written). Atomic: written to a hidden sibling
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
    geometry = lps_geometry(volume.affine)
    nz, ny, nx = volume.array.shape
    positions = geometry.origin + np.arange(nz)[:, None] * geometry.step[None, :]

    if template is not None:
        base = template_header(template)
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
        base, attributes = synthetic_header(synthetic_patient)
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
    if template is not None:
        # Ours, and marked so: never denoised again, never paired as training data.
        base.DerivationDescription = derivation_description[:1024]
        mark_as_ours(base, series_description, now)
    else:
        base.ImageType = ["ORIGINAL", "PRIMARY"]  # a simulated acquisition
    # Bq/ml, or SUV when the source was read in SUV (then every factor is 1).
    base.Units = template.units if template is not None else "BQML"
    base.NumberOfSlices = nz
    base.ContentDate = da_text(now)
    base.ContentTime = tm_text(now)
    base.InstanceCreationDate = da_text(now)
    base.InstanceCreationTime = tm_text(now)
    base.ImageOrientationPatient = [ds_text(v) for v in (*geometry.row, *geometry.col)]
    dz, dy, dx = geometry.spacing_zyx
    base.PixelSpacing = [ds_text(dy), ds_text(dx)]
    base.SliceThickness = ds_text(dz)
    base.SpacingBetweenSlices = ds_text(dz)
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = ny, nx
    base.BitsAllocated, base.BitsStored, base.HighBit = 16, 16, 15
    base.PixelRepresentation = 1
    base.RescaleIntercept = "0"

    with staged_folder(out_dir) as staging:
        for k in range(nz):
            ds = copy.deepcopy(base)
            for keyword, value in per_slice[k].items():
                setattr(ds, keyword, value)
            complete_slice(ds, str(ds.get("DecayCorrection", "")).upper())
            ds.SOPInstanceUID = new_uid("instance", str(k))
            ds.InstanceNumber = k + 1
            ds.ImageIndex = k + 1
            ds.ImagePositionPatient = [ds_text(v) for v in positions[k]]
            ds.SliceLocation = ds_text(float(positions[k] @ geometry.normal))
            if sources[k] is not None:
                ref = Dataset()
                ref.ReferencedSOPClassUID = PET_IMAGE_STORAGE
                ref.ReferencedSOPInstanceUID = sources[k]
                ref.PurposeOfReferenceCodeSequence = Sequence([code_item(
                    "121322", "DCM", "Source image for image processing operation")])
                ds.SourceImageSequence = Sequence([ref])
            pixels, slope = _quantize(volume.array[k].astype(np.float64) / factors[k])
            ds.RescaleSlope = slope
            ds.add_new(0x7FE00010, "OW", pixels.astype("<i2").tobytes())  # PixelData
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = PET_IMAGE_STORAGE
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(staging / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
    log.info("wrote derived PET series: %d slices to %s", nz, out_dir)
    return out_dir

"""Slice geometry: from a PET series' slices to a volume affine, and from an affine back to slices.

A wrong geometry gives a plausible-looking but misplaced volume, so every assumption is checked:
slices are ordered by ImagePositionPatient projected on the slice normal (never by file name or
InstanceNumber, which exports scramble), and anything but a regular axial stack is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fed_ndif.data.dicom.series import DicomFile
from fed_ndif.data.volume import LPS_TO_RAS, affine_from_lps
from fed_ndif.errors import FedNdifError

# Largest off-axis component of a direction cosine still called axial (about 0.06 degrees).
AXIAL_TOLERANCE = 1e-3
# Largest relative deviation of one slice step from the median step.
SPACING_TOLERANCE = 0.01


@dataclass
class SeriesGeometry:
    """How the files of a series stack into a volume."""

    order: np.ndarray  # file index of each slice, in volume order
    affine: np.ndarray  # RAS
    positions: np.ndarray  # (nz, 3) ImagePositionPatient in volume order


@dataclass
class LpsGeometry:
    """A volume affine as the DICOM slice stack that holds it."""

    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    step: np.ndarray  # from slice k to k+1, mm
    origin: np.ndarray
    spacing_zyx: tuple[float, float, float]


def _floats(f: DicomFile, keyword: str, count: int) -> np.ndarray:
    value = f.header.get(keyword)
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        array = np.empty(0)
    if array.size != count or not np.all(np.isfinite(array)):
        raise FedNdifError(f"{f.path}: {keyword} is missing or malformed (need {count} numbers)")
    return array


def _check_consistent(files: list[DicomFile], keyword: str, values: list[np.ndarray],
                      atol: float) -> None:
    for f, v in zip(files, values, strict=True):
        if v.shape != values[0].shape or not np.allclose(v, values[0], atol=atol):
            raise FedNdifError(
                f"inconsistent {keyword} within the series: {files[0].path} has "
                f"{np.round(values[0], 4).tolist()}, {f.path} has {np.round(v, 4).tolist()}")


def series_geometry(files: list[DicomFile]) -> SeriesGeometry:
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
    return SeriesGeometry(order=order, affine=affine, positions=positions)


def lps_geometry(affine: np.ndarray) -> LpsGeometry:
    """The slice stack of a RAS ``affine``; refuses a sheared or singular one."""
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
    return LpsGeometry(row=row, col=col, normal=normal, step=axes[:, 2], origin=lps[:3, 3],
                       spacing_zyx=(float(sizes[2]), float(sizes[1]), float(sizes[0])))

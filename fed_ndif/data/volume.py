"""The one in-memory convention for PET volumes, shared by every reader, writer and model.

* ``array``: float32 numpy array, axis order ``(z, y, x)`` = (slice, row, column), values in SUV
  (body weight) unless stated otherwise.
* ``affine``: the 4x4 NIfTI (RAS+) affine mapping the *file* index ``(i, j, k)`` =
  ``(x, y, z)`` = ``(column, row, slice)`` to world millimetres. On disk (NIfTI) the array is
  stored transposed to ``(x, y, z)``; in memory it is ``(z, y, x)``.

DICOM is LPS+; for an axial series with ImageOrientationPatient ``[1,0,0, 0,1,0]`` columns run
to the patient's left (+x LPS) and rows run posterior (+y LPS). :func:`affine_from_lps` turns the
DICOM geometry into the RAS affine above, so a volume read from DICOM and the same volume read
from NIfTI compare equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D image in the package convention (see module docstring)."""

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise ValueError(f"volume must be 3D (z, y, x), got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm as (z, y, x)."""
        sx, sy, sz = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(sz), float(sy), float(sx)


def affine_from_lps(
    *, origin_lps: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray, slice_dir: np.ndarray,
    spacing_zyx: tuple[float, float, float],
) -> np.ndarray:
    """RAS affine for a slice stack given in DICOM (LPS) terms.

    ``row_dir`` is the direction along a row (increasing column index, DICOM IOP[0:3]),
    ``col_dir`` along a column (increasing row index, IOP[3:6]); ``origin_lps`` is the centre of
    voxel (0, 0, 0); ``slice_dir`` points from slice k to slice k+1.
    """
    dz, dy, dx = spacing_zyx
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(row_dir, float) * dx
    lps[:3, 1] = np.asarray(col_dir, float) * dy
    lps[:3, 2] = np.asarray(slice_dir, float) * dz
    lps[:3, 3] = np.asarray(origin_lps, float)
    return LPS_TO_RAS @ lps


def axial_affine(
    *, shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float],
    z_origin_mm: float = 0.0,
) -> np.ndarray:
    """Affine of a standard axial PET grid centred in-plane on the scanner axis (LPS x, y = 0)."""
    _, ny, nx = shape_zyx
    _, dy, dx = spacing_zyx
    origin = np.array([-(nx - 1) / 2 * dx, -(ny - 1) / 2 * dy, z_origin_mm])
    return affine_from_lps(
        origin_lps=origin, row_dir=np.array([1.0, 0, 0]), col_dir=np.array([0, 1.0, 0]),
        slice_dir=np.array([0, 0, 1.0]), spacing_zyx=spacing_zyx,
    )

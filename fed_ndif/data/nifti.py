"""NIfTI reading and writing in the package's volume convention (see fed_ndif.data.volume)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from fed_ndif.data.volume import Volume
from fed_ndif.errors import FedNdifError
from fed_ndif.staging import staged_file


def save_nifti(volume: Volume | np.ndarray, path: str | Path, *, affine: np.ndarray | None = None,
               dtype: type = np.float32) -> None:
    """Write ``(z, y, x)`` data as NIfTI, atomically (temporary file in the folder, then rename).

    gzip headers carry no timestamp, so the same data gives the same bytes.
    """
    path = Path(path)
    if isinstance(volume, Volume):
        array, affine = volume.array, volume.affine
    else:
        array = volume
        if affine is None:
            raise ValueError("an affine is needed to write a bare array")
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype).transpose(2, 1, 0), affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with staged_file(path, suffix="".join(path.suffixes[-2:]) or ".nii.gz") as tmp:
        nib.save(image, tmp)


def load_nifti(path: str | Path) -> Volume:
    """Read a 3D NIfTI into ``(z, y, x)`` float32 with its affine; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FedNdifError(f"{path}: no such NIfTI file")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise FedNdifError(f"{path}: not a readable NIfTI file ({exc.__class__.__name__})") from exc
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim != 3:
        raise FedNdifError(f"{path}: expected a 3D volume, got shape {data.shape}")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise FedNdifError(f"{path}: the affine is singular or not finite, so voxel geometry "
                           "is unknown")
    if not np.all(np.isfinite(data)):
        raise FedNdifError(f"{path}: the volume holds NaN or infinite values")
    return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), affine)

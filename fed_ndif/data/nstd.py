"""Liver NSTD, the noise level the model is conditioned on: std / mean inside a liver VOI.

One function for training, evaluation and inference, so the embedding sees the same number.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fed_ndif.errors import FedNdifError

MIN_LIVER_VOXELS = 20


def liver_nstd(volume: np.ndarray, liver_mask: np.ndarray, *, erode: int = 1) -> float:
    """NSTD of ``volume`` inside ``liver_mask``, eroded by ``erode`` voxels in-plane.

    Erosion keeps partial-volume voxels at the liver edge out of the statistic (a standard
    practice for liver VOIs); it is skipped when it would leave too few voxels.
    """
    mask = np.asarray(liver_mask) > 0
    if mask.shape != volume.shape:
        raise FedNdifError(f"liver mask shape {mask.shape} does not match volume {volume.shape}")
    if erode:
        structure = np.zeros((3, 3, 3), bool)
        structure[1] = ndimage.generate_binary_structure(2, 1)
        eroded = ndimage.binary_erosion(mask, structure, iterations=erode)
        if eroded.sum() >= MIN_LIVER_VOXELS:
            mask = eroded
    if mask.sum() < MIN_LIVER_VOXELS:
        raise FedNdifError(f"liver mask holds {int(mask.sum())} voxels; at least "
                           f"{MIN_LIVER_VOXELS} are needed to measure NSTD")
    values = volume[mask].astype(np.float64)
    mean = values.mean()
    if mean <= 0:
        raise FedNdifError("mean uptake inside the liver mask is not positive; is the mask "
                           "on the liver?")
    return float(values.std() / mean)

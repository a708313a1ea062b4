"""Tiny synthetic sites for model/dataset/trainer tests (phantom + scanner -> NIfTI + manifest).

Independent of ``fed_ndif.data.sites`` on purpose, so model tests do not break when the site
generator changes; the manifest format is the same.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fed_ndif.data.nifti import save_nifti
from fed_ndif.data.phantom import Grid, Organ, make_phantom
from fed_ndif.data.scanner import ScannerProfile, simulate_scans
from fed_ndif.data.volume import axial_affine

COLUMNS = ("subject", "count_level", "low_count", "full_count", "liver_mask", "lesion_mask",
           "split")


def tiny_profile(*, matrix: int = 40, slices: int = 16) -> ScannerProfile:
    """A coarse scanner whose field of view still holds a phantom body (>= 380 mm)."""
    return ScannerProfile(
        name="test", matrix=matrix, pixel_mm=400.0 / matrix, slices=slices, slice_mm=14.0,
        psf_fwhm_mm=8.0, axial_fwhm_mm=8.0, angles=matrix, sensitivity=1.5,
        background_fraction=0.4, osem_iterations=2, osem_subsets=4, postfilter_fwhm_mm=6.0)


def write_site(root: Path, *, splits: tuple[str, ...] = ("train", "train", "val"),
               levels: tuple[float, ...] = (0.1,), matrix: int = 40, slices: int = 16,
               seed: int = 0) -> Path:
    """Write one subject per entry of ``splits`` under ``root``; return the manifest path."""
    root.mkdir(parents=True, exist_ok=True)
    profile = tiny_profile(matrix=matrix, slices=slices)
    affine = axial_affine(shape_zyx=profile.shape, spacing_zyx=profile.spacing)
    rows = []
    for index, split in enumerate(splits):
        rng = np.random.default_rng([seed, index])
        phantom = make_phantom(Grid(profile.shape, profile.spacing), rng)
        scans = simulate_scans(phantom.activity, phantom.mu, profile, list(levels), rng)
        subject = f"sub-{index + 1:03d}"
        (root / subject).mkdir(exist_ok=True)
        save_nifti(scans[1.0], root / subject / "full.nii.gz", affine=affine)
        # The liver VOI excludes liver lesions, as a reader's VOI would: NSTD must measure noise.
        liver_voi = (phantom.organs == Organ.LIVER) & (phantom.lesions == 0)
        save_nifti(liver_voi, root / subject / "liver.nii.gz", affine=affine, dtype=np.uint8)
        save_nifti(phantom.lesions, root / subject / "lesions.nii.gz", affine=affine,
                   dtype=np.uint16)
        for level in levels:
            name = f"{subject}/low_{level:g}.nii.gz"
            save_nifti(scans[level], root / name, affine=affine)
            rows.append({"subject": subject, "count_level": f"{level:g}", "low_count": name,
                         "full_count": f"{subject}/full.nii.gz",
                         "liver_mask": f"{subject}/liver.nii.gz",
                         "lesion_mask": f"{subject}/lesions.nii.gz", "split": split})
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest

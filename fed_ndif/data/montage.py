"""A picture of simulated sites: one subject per site, full count beside two low-count levels."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fed_ndif.data.nifti import load_nifti
from fed_ndif.staging import staged_file

SUV_WINDOW = (0.0, 6.0)


def write_site_montage(root: Path, sites: list[str], png: Path) -> None:
    """Coronal slices through the liver (radiological view, head up), written atomically."""
    fig, axes = plt.subplots(len(sites), 3, figsize=(9, 3.4 * len(sites)), squeeze=False)
    for row, site in zip(axes, sites, strict=True):
        with (root / site / "manifest.csv").open() as handle:
            studies = list(csv.DictReader(handle))
        subject = studies[0]["subject"]
        studies = [s for s in studies if s["subject"] == subject]
        levels = sorted(studies, key=lambda s: float(s["count_level"]), reverse=True)
        picks = [("full count", studies[0]["full_count"])] + [
            (f"{float(s['count_level']) * 100:g} % counts", s["low_count"])
            for s in (levels[0], levels[-1])
        ]
        liver = load_nifti(root / site / studies[0]["liver_mask"]).array > 0
        coronal = int(np.round(np.argwhere(liver)[:, 1].mean())) if liver.any() else None
        for ax, (title, path) in zip(row, picks, strict=False):
            volume = load_nifti(root / site / path)
            j = coronal if coronal is not None else volume.array.shape[1] // 2
            dz, _, dx = volume.spacing
            ax.imshow(volume.array[::-1, j, :], cmap="gray_r", vmin=SUV_WINDOW[0],
                      vmax=SUV_WINDOW[1], aspect=dz / dx, interpolation="nearest")
            ax.set_title(f"{site}: {title}", fontsize=9)
            ax.axis("off")
    fig.suptitle(f"Synthetic sites, coronal slice through the liver (SUV {SUV_WINDOW[0]:g}-"
                 f"{SUV_WINDOW[1]:g}, patient right on the left)", fontsize=10)
    fig.tight_layout()
    try:
        with staged_file(png, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)

"""Time to simulate one 128x128x96 subject at the six standard count levels (issue 2 target:
<= 20 s on 2 cores). Usage: python benchmarks/simulate_subject.py [--repeats 3] [--profile NAME]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from fed_ndif.data.nifti import save_nifti
from fed_ndif.data.phantom import Grid, make_phantom
from fed_ndif.data.scanner import ScannerProfile, simulate_scans
from fed_ndif.data.volume import axial_affine

LEVELS = [0.01, 0.02, 0.05, 0.1, 0.25, 0.5]
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "scanner"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", default="digital_hd")
    args = parser.parse_args()
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{args.profile}.yaml"))
    profile = ScannerProfile(**{**cfg, "matrix": 128, "slices": 96})
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"profile {profile.name} {profile.shape}, {profile.angles} angles, "
          f"OSEM {profile.osem_iterations}x{profile.osem_subsets}, levels {LEVELS} + full")
    totals = []
    for repeat in range(args.repeats):
        rng = np.random.default_rng(repeat)
        t0 = time.perf_counter()
        phantom = make_phantom(Grid(profile.shape, profile.spacing), rng)
        t1 = time.perf_counter()
        scans = simulate_scans(phantom.activity, phantom.mu, profile, LEVELS, rng)
        t2 = time.perf_counter()
        affine = axial_affine(shape_zyx=profile.shape, spacing_zyx=profile.spacing)
        with tempfile.TemporaryDirectory() as tmp:
            for level, volume in scans.items():
                save_nifti(volume, Path(tmp) / f"{level}.nii.gz", affine=affine)
        t3 = time.perf_counter()
        totals.append(t3 - t0)
        print(f"run {repeat}: phantom {t1 - t0:.2f} s, physics+OSEM {t2 - t1:.2f} s, "
              f"NIfTI {t3 - t2:.2f} s, total {t3 - t0:.2f} s")
    print(f"median total: {statistics.median(totals):.2f} s per subject (7 scans)")


if __name__ == "__main__":
    main()

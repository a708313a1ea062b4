"""Quality parity of inference settings on whole-body volumes, and their time.

The 192x192x400 torso-to-head phantoms of ``denoise_volume.py`` (3.65 mm pixels, 70 cm field of
view; the low-count input is the phantom's activity with correlated noise), several subjects,
each denoised under every setting as ``inference_variants.py`` does it, with the liver NSTD from
the phantom's liver. Scored against the phantom's activity (the truth here: full count and
noise-free are both the activity) with the evaluation's metrics and lesion set, every setting
paired against the first (95 % CIs over subjects).

    python benchmarks/whole_body_parity.py runs/i16/patch_insert/last.pt runs/i21/wb \\
        --subjects 3 --variant today:engine=torch,steps=5 --variant default:

Settings as in ``inference_variants.py``. The noise model is not the scanner's (no OSEM), so
the numbers compare settings with each other, not with the site test sets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from inference_variants import parse_variant, variant, write_results
from scipy import ndimage

from fed_ndif.data.manifest import Study
from fed_ndif.data.phantom import Grid, Organ, make_phantom
from fed_ndif.evaluation.compare import TestStudy, score_methods
from fed_ndif.models.engines import available_threads

SHAPE = (400, 192, 192)  # (z, y, x)
SPACING = (2.0, 700.0 / 192, 700.0 / 192)


def phantom_study(subject: int) -> TestStudy:
    """As ``denoise_volume.make_volume`` makes its input, for another random subject."""
    rng = np.random.default_rng(subject)
    phantom = make_phantom(Grid(SHAPE, SPACING), rng)
    activity = phantom.activity.astype(np.float32)
    noise = ndimage.gaussian_filter(rng.standard_normal(SHAPE, dtype=np.float32), 0.8) * 2.0
    low = np.clip(activity + 0.25 * np.sqrt(activity) * noise, 0, None)
    name = f"phantom-{subject}"
    study = Study(subject=name, count_level=0.1, low_count=Path(name), full_count=Path(name),
                  liver_mask=None, lesion_mask=None, split="test")
    return TestStudy(study=study, low=low, full=activity, liver=phantom.organs == Organ.LIVER,
                     lesions=phantom.lesions, spacing=SPACING, ideal=activity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=V,...")
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--threads", type=int, default=available_threads())
    args = parser.parse_args()
    seconds: dict[str, float] = {}
    methods = [variant(*parse_variant(text), args.checkpoint, args.threads, seconds)
               for text in args.variant]
    rows = []
    for subject in range(args.subjects):  # one at a time: a whole body is 59 MB a volume
        rows += score_methods("whole_body", [phantom_study(subject)], methods)[0]
        print(f"subject {subject}: {json.dumps(seconds)}", flush=True)
    write_results(args.out_dir, rows, methods, seconds,
                  f"{args.subjects} whole-body phantoms 192x192x400, {args.threads} thread(s)")


if __name__ == "__main__":
    main()

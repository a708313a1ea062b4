"""Lesion detectability by a model observer: does a denoiser keep small lesions visible?

SUV bias says how much uptake a found lesion keeps; it does not say whether a reader would find
it. The task here is the classic signal-known-exactly one: is there a small hot sphere at this
place? For each test study, small spheres are inserted into a slab of the low-count input at
known places (``training.augment.add_sphere``: a true ball convolved with the site's resolution,
with the noise of its uptake, the physics lesion insertion trains with), and every method
denoises the slab with and without them. A region of interest around each place, on the
slice through its centre, is one signal-present and one signal-absent image.

The observer is a channelized Hotelling observer (CHO) with Laguerre-Gauss channels (Barrett
and Myers, *Foundations of Image Science*, ch. 14; Gallas and Barrett 2003), the standard
observer for rotationally symmetric signals in PET. Its template is the channel covariance's
inverse times the mean channel difference, fitted with each subject left out and applied to
that subject (no optimism from scoring its own training data). Its AUC is the Mann-Whitney
statistic of the scores; the 95 % interval resamples subjects within each site, so it holds
subject variability (backgrounds, noise) with the lesions' places fixed per subject.

Hand-written: no maintained library (MONAI, scikit-image) offers a model observer.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import special
from scipy.ndimage import gaussian_filter, uniform_filter

from fed_ndif.errors import FedNdifError
from fed_ndif.evaluation.statistics import MIN_SUBJECTS
from fed_ndif.lesion_physics import BODY_SUV, add_sphere, local_background

log = logging.getLogger(__name__)

CONFIDENCE = 0.95
RESAMPLES = 1000
# Places closer than this to a lesion of the phantom are not used: the task is a new lesion in
# a known background, not one beside a lesion that is already there.
LESION_CLEARANCE_MM = 20.0
# A place's neighbourhood must not be much hotter than the slab's body (bladder, heart, brain).
HOT_BACKGROUND = 2.5


@dataclass(frozen=True)
class DetectionTask:
    """``compare.detectability``: ``lesions`` spheres of ``radius_mm`` and ``contrast`` (added
    uptake / local background) per test study, in a slab of at most ``slab_slices`` slices;
    ``channels`` Laguerre-Gauss channels; ``fwhm_mm``: the resolution where a site's folder
    does not state its own."""

    lesions: int
    radius_mm: float
    contrast: float
    slab_slices: int
    channels: int
    fwhm_mm: float
    seed: int = 0

    @classmethod
    def from_config(cls, settings: dict[str, Any] | None) -> DetectionTask | None:
        """None where the setting is absent or ``enabled: false``."""
        if not settings or not settings.get("enabled", False):
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in dict(settings).items() if k != "enabled"}
        unknown = set(given) - names
        if unknown:
            raise FedNdifError(f"compare.detectability: unknown settings {sorted(unknown)}")
        try:
            task = cls(**{k: (int(v) if k in ("lesions", "slab_slices", "channels", "seed")
                              else float(v)) for k, v in given.items()})
        except (TypeError, ValueError) as exc:
            raise FedNdifError(f"compare.detectability: {exc}") from None
        if min(task.lesions, task.slab_slices, task.channels) < 1 or min(
                task.radius_mm, task.contrast, task.fwhm_mm) <= 0:
            raise FedNdifError(f"compare.detectability: need positive settings, got {task}")
        return task


@dataclass
class Placed:
    """A study's lesion-present and lesion-absent slabs and where the lesions are."""

    present: Any  # a TestStudy over the slab, lesions inserted
    absent: Any  # the same slab without them
    centres: list[tuple[float, float, float]]  # (z, y, x) voxels in the slab
    roi: int  # ROI side, pixels (odd)
    channel_width_px: float


def _places(full: np.ndarray, lesions: np.ndarray | None, spacing, *, count: int,
            margin_px: int, z_margin: int, separation_mm: float,
            rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """Up to ``count`` voxels of the (Z, H, W) slab in the body, ``margin_px`` in-plane from
    air and the border and ``z_margin`` slices from its ends (2.5D context), clear of the
    phantom's lesions and of hot organs, ``separation_mm`` apart."""
    body = full > BODY_SUV
    if not body.any():
        return []
    size = (1, 2 * margin_px + 1, 2 * margin_px + 1)
    typical = float(np.median(full[body]))
    ok = (uniform_filter(body.astype(np.float32), size=size) > 0.999) & (
        uniform_filter(full, size=size) < HOT_BACKGROUND * typical)
    if full.shape[0] > 2 * z_margin:
        ok[:z_margin] = False
        ok[full.shape[0] - z_margin:] = False
    ok[:, :margin_px] = ok[:, -margin_px:] = False
    ok[:, :, :margin_px] = ok[:, :, -margin_px:] = False
    if lesions is not None and lesions.any():
        ok &= gaussian_filter((lesions > 0).astype(np.float32),
                              sigma=[LESION_CLEARANCE_MM / d / 2 for d in spacing]) <= 1e-3
    candidates = np.argwhere(ok)
    rng.shuffle(candidates)
    chosen: list[np.ndarray] = []
    step = np.asarray(spacing, dtype=float)
    for c in candidates:
        if all(np.linalg.norm((c - p) * step) >= separation_mm for p in chosen):
            chosen.append(c)
            if len(chosen) == count:
                break
    return [tuple(int(v) for v in c) for c in chosen]


def place_lesions(study, task: DetectionTask, *, k: int = 2) -> Placed | None:
    """Insert the task's spheres into a slab of ``study`` (a TestStudy); None where the body
    has no room. The slab is centred on the liver and keeps ``k`` slices of context at its
    ends for 2.5D models; both slabs keep the whole study's input NSTD (the model's
    conditioning does not change because a slab was cut)."""
    depth = study.low.shape[0]
    liver_z = np.nonzero(study.liver.any(axis=(1, 2)))[0]
    middle = int(np.median(liver_z)) if liver_z.size else depth // 2
    length = min(task.slab_slices, depth)
    start = max(0, min(middle - length // 2, depth - length))
    z = slice(start, start + length)
    fwhm = tuple(study.fwhm_mm or (task.fwhm_mm,) * 3)
    pixel = float(min(study.spacing[1:]))
    # The blurred sphere's extent: its radius and two sigmas of the resolution.
    extent = math.hypot(task.radius_mm, 2 * max(fwhm) / 2.355)
    roi = 2 * math.ceil(2.5 * extent / pixel) + 1
    rng = np.random.default_rng([task.seed, *map(ord, study.study.subject),
                                 round(1e6 * study.study.count_level)])
    full = study.full[z]
    lesions = study.lesions[z] if study.lesions is not None else None
    places = _places(full, lesions, study.spacing, count=task.lesions, margin_px=roi // 2 + 1,
                     z_margin=k, separation_mm=roi * pixel, rng=rng)
    if not places:
        return None
    full_t = torch.from_numpy(np.ascontiguousarray(full, dtype=np.float32))
    present = torch.from_numpy(np.ascontiguousarray(study.low[z], dtype=np.float32))
    gained = torch.zeros_like(present)
    for place in places:
        background = local_background(full_t[place[0]], place[1], place[2],
                                      tuple(study.spacing[1:]), BODY_SUV)
        present, added = add_sphere(present, full_t, centre=tuple(float(v) for v in place),
                                    radius_mm=task.radius_mm, uptake=task.contrast * background,
                                    spacing=tuple(study.spacing), fwhm_mm=fwhm,
                                    count_level=float(study.study.count_level),
                                    body_level=BODY_SUV)
        gained += added
    nstd = study.nstd

    def slab(low: np.ndarray, ideal: np.ndarray | None):
        out = dataclasses.replace(study, low=low, full=full, liver=study.liver[z],
                                  lesions=lesions, ideal=ideal)
        out.__dict__["nstd"] = nstd  # the cached property: the whole study's input NSTD
        return out

    ideal = None if study.ideal is None else study.ideal[z]
    return Placed(present=slab(present.numpy(), None if ideal is None
                               else ideal + gained.numpy()),
                  absent=slab(study.low[z], ideal),
                  centres=[tuple(float(v) for v in p) for p in places], roi=roi,
                  channel_width_px=max(1.5, 1.2 * extent / pixel))


def laguerre_gauss(size: int, channels: int, width: float) -> np.ndarray:
    """(channels, size, size) Laguerre-Gauss channel profiles centred in a size x size ROI,
    Gaussian width ``width`` pixels (the a of Barrett and Myers)."""
    r = np.arange(size) - (size - 1) / 2
    r2 = r[:, None] ** 2 + r[None, :] ** 2
    g = 2 * math.pi * r2 / width ** 2
    return np.stack([math.sqrt(2) / width * np.exp(-g / 2) * special.eval_laguerre(j, g)
                     for j in range(channels)])


def channel_outputs(volume: np.ndarray, centres, roi: int, profiles: np.ndarray) -> np.ndarray:
    """(lesions, channels): each ROI on the slice through a centre, through the channels."""
    half = roi // 2
    out = []
    for z, y, x in centres:
        zi, yi, xi = (round(v) for v in (z, y, x))
        patch = volume[zi, yi - half:yi + half + 1, xi - half:xi + half + 1]
        out.append(np.tensordot(profiles, patch, axes=([1, 2], [0, 1])))
    return np.asarray(out, dtype=np.float64)


def detection_rows(site: str, study, method: str, placed: Placed, present: np.ndarray,
                   absent: np.ndarray, channels: int) -> list[dict]:
    """One row per lesion and class (present 1 / absent 0) with its channel outputs."""
    profiles = laguerre_gauss(placed.roi, channels, placed.channel_width_px)
    rows = []
    for label, volume in ((1, present), (0, absent)):
        for i, v in enumerate(channel_outputs(volume, placed.centres, placed.roi, profiles)):
            rows.append({"site": site, "subject": study.study.subject,
                         "count_level": float(study.study.count_level), "method": method,
                         "lesion": i, "present": label,
                         **{f"c{j}": float(v[j]) for j in range(channels)}})
    return rows


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not pos.size or not neg.size:
        return math.nan
    order = np.concatenate([pos, neg])
    ranks = np.empty(order.size)
    ranks[np.argsort(order, kind="mergesort")] = np.arange(1, order.size + 1)
    for value in np.unique(order):  # average ranks of ties
        tied = order == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2)
                 / (pos.size * neg.size))


def cho_scores(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Hotelling scores with each group (subject) left out of its own template."""
    scores = np.full(labels.shape, math.nan)
    for g in np.unique(groups):
        train, test = groups != g, groups == g
        one, zero = features[train & (labels == 1)], features[train & (labels == 0)]
        if len(one) < 2 or len(zero) < 2:
            continue
        covariance = 0.5 * (np.cov(one, rowvar=False) + np.cov(zero, rowvar=False))
        template = np.linalg.pinv(np.atleast_2d(covariance)) @ (one.mean(0) - zero.mean(0))
        scores[test] = features[test] @ template
    return scores


@dataclass(frozen=True)
class Detectability:
    method: str
    auc: float
    low: float
    high: float
    lesions: int  # signal-present images
    subjects: int


def detectability(rows: list[dict], method: str, *, seed: int = 0) -> Detectability:
    """CHO AUC of ``method`` over ``rows`` (all its sites, levels and training seeds: a seed's
    template is fitted on that seed's outputs), with a 95 % interval from resampling subjects
    within each site."""
    mine = [r for r in rows if r["method"] == method]
    if not mine:
        return Detectability(method, math.nan, math.nan, math.nan, 0, 0)
    channels = sorted(k for k in mine[0] if k.startswith("c") and k[1:].isdigit())
    by_seed: dict[Any, list[dict]] = defaultdict(list)
    for r in mine:
        by_seed[r.get("seed")].append(r)
    scored = []  # (site, subject, score, label)
    for seed_rows in by_seed.values():
        features = np.array([[float(r[c]) for c in channels] for r in seed_rows])
        labels = np.array([int(r["present"]) for r in seed_rows])
        groups = np.array([f"{r['site']}/{r['subject']}" for r in seed_rows])
        scores = cho_scores(features, labels, groups)
        scored += [(r["site"], r["subject"], s, lab) for r, s, lab
                   in zip(seed_rows, scores, labels, strict=True) if math.isfinite(s)]
    if not scored:
        return Detectability(method, math.nan, math.nan, math.nan, 0, 0)
    sites = sorted({s for s, *_ in scored})
    subjects = {site: sorted({subj for s, subj, *_ in scored if s == site}) for site in sites}
    by_subject = defaultdict(list)
    for site, subject, score, label in scored:
        by_subject[(site, subject)].append((score, label))

    def auc_of(keys) -> float:
        pairs = [p for key in keys for p in by_subject[key]]
        return _auc(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))

    everyone = [(site, s) for site in sites for s in subjects[site]]
    auc = auc_of(everyone)
    lesions = sum(1 for *_, lab in scored if lab == 1)
    if len(everyone) < MIN_SUBJECTS:
        return Detectability(method, auc, math.nan, math.nan, lesions, len(everyone))
    # Within sites, as the paired intervals do; all subjects together where a site has too
    # few to resample.
    strata = ([[(site, s) for s in subjects[site]] for site in sites]
              if min(len(v) for v in subjects.values()) >= 3 else [everyone])
    rng = np.random.default_rng(seed)
    draws = [auc_of([stratum[i] for stratum in strata
                     for i in rng.integers(0, len(stratum), len(stratum))])
             for _ in range(RESAMPLES)]
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.nanpercentile(draws, [tail, 100 - tail])
    return Detectability(method, auc, float(low), float(high), lesions, len(everyone))


# Slices kept at each end of a slab as context for 2.5D models (k <= 4), where no lesion goes.
CONTEXT_SLICES = 4
DETECTION_CSV = "detection.csv"
FIELDS_HEAD = ("site", "subject", "count_level", "method", "lesion", "present")


def score_detection(site: str, studies: list, methods: list, task: DetectionTask
                    ) -> list[dict]:
    """Detection rows of every method (anything with ``name`` and ``denoise(study)``) on the
    task's lesions in each study; a study without room for them, or a method that cannot run
    on it (the noise-free image of real data), is skipped."""
    rows: list[dict] = []
    for study in studies:
        placed = place_lesions(study, task, k=CONTEXT_SLICES)
        if placed is None:
            log.warning("%s %s: no room for detection lesions", site, study.study.subject)
            continue
        for method in methods:
            present, absent = method.denoise(placed.present), method.denoise(placed.absent)
            if present is None or absent is None:
                continue
            rows += detection_rows(site, study, method.name, placed, present, absent,
                                   task.channels)
    return rows


def write_detection(path: Path, rows: list[dict]) -> None:
    channels = sorted({k for r in rows for k in r if k.startswith("c") and k[1:].isdigit()},
                      key=lambda k: int(k[1:]))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*FIELDS_HEAD, *channels, "seed"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_detection(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["count_level"] = float(row["count_level"])
        row["present"] = int(row["present"])
        row["seed"] = int(row["seed"]) if row.get("seed") not in (None, "") else None
    return rows


def detectability_section(rows: list[dict], method_order: list[str],
                          labels: dict[str, str]) -> list[str]:
    """Report lines: CHO AUC per method, all sites and each site."""
    if not rows:
        return []
    sites = sorted({r["site"] for r in rows})
    methods = [m for m in method_order if any(r["method"] == m for r in rows)]
    head = "| method | AUC, all sites [95 % CI] |" + "".join(f" {s} |" for s in sites)
    out = ["## Detectability of small lesions (channelized Hotelling observer)\n",
           "Spheres inserted at known places into a slab of each test study's input through "
           "the lesion-insertion physics (a true ball blurred by the site's resolution, with "
           "the noise of its uptake); each method denoises the slab with and without them. "
           "A channelized Hotelling observer (Laguerre-Gauss channels) scores a region around "
           "each place on the slice through its centre, its template fitted with the subject "
           "left out. AUC 0.5: not detectable; 1: always found. Intervals resample subjects "
           "within sites (`fed_ndif/evaluation/detectability.py`).\n",
           head, "|---|---|" + "---|" * len(sites)]
    for method in methods:
        overall = detectability([r for r in rows if r["method"] == method], method)
        cells = [f"{_auc_cell(overall)} ({overall.lesions} lesions, {overall.subjects} "
                 "subjects)"]
        cells += [_auc_cell(detectability(
            [r for r in rows if r["method"] == method and r["site"] == site], method))
            for site in sites]
        out.append(f"| {labels.get(method, method)} | " + " | ".join(cells) + " |")
    return [*out, ""]


def _auc_cell(d: Detectability) -> str:
    if not math.isfinite(d.auc):
        return "–"
    if not math.isfinite(d.low):
        return f"{d.auc:.3f} (too few subjects for an interval)"
    return f"{d.auc:.3f} [{d.low:.3f}, {d.high:.3f}]"

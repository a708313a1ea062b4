"""Paired comparisons with confidence intervals, so a table says "better" only when it is.

The unit of resampling is the test subject: a subject's studies (its count levels) and all its
slices are correlated, so resampling slices or studies would make intervals far too narrow. The
bootstrap is stratified by site (each resample draws, within every site, as many subjects as
the site has) when every site has at least :data:`MIN_PER_SITE` subjects; a site with one or
two subjects would add little or no spread, so then subjects are resampled over all sites. It
is seeded, so a report is reproducible. Fewer than :data:`MIN_SUBJECTS` subjects give no
interval and no verdict. With few subjects a percentile bootstrap runs narrow: read an interval
of 6 subjects as a direction. Written by hand: scipy.stats.bootstrap resamples observations,
not clusters of observations.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0
MIN_SUBJECTS = 3
MIN_PER_SITE = 3


@dataclass(frozen=True)
class PairedDifference:
    """``method`` minus ``reference`` on one metric: mean over subjects and its 95 % CI."""

    method: str
    reference: str
    metric: str
    mean: float
    low: float
    high: float
    subjects: int
    verdict: str  # "better", "worse", "no difference" (for ``method``), or "n/a"


def subject_means(rows: list[dict], method: str, metric: str) -> dict[tuple[str, str], float]:
    """(site, subject) -> the method's mean of ``metric`` over that subject's studies."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        value = row.get(metric, math.nan)
        if row["method"] == method and isinstance(value, float) and math.isfinite(value):
            values[(row["site"], row["subject"])].append(value)
    return {key: float(np.mean(v)) for key, v in values.items()}


def bootstrap_ci(differences: dict[tuple[str, str], float], *, resamples: int = RESAMPLES,
                 seed: int = SEED, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of the mean difference, resampling subjects within each site."""
    by_site: dict[str, list[float]] = defaultdict(list)
    for (site, _), value in sorted(differences.items()):
        by_site[site].append(value)
    if min(len(v) for v in by_site.values()) < MIN_PER_SITE:
        by_site = {"all": [v for _, v in sorted(differences.items())]}
    rng = np.random.default_rng(seed)
    total = sum(len(v) for v in by_site.values())
    sums = np.zeros(resamples)
    for values in by_site.values():
        array = np.asarray(values)
        picks = rng.integers(0, len(array), size=(resamples, len(array)))
        sums += array[picks].sum(axis=1)
    means = sums / total
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_difference(rows: list[dict], method: str, reference: str, metric: str, *,
                      higher_is_better: bool, resamples: int = RESAMPLES,
                      seed: int = SEED) -> PairedDifference:
    """``method`` minus ``reference`` over the subjects both were scored on."""
    mine = subject_means(rows, method, metric)
    theirs = subject_means(rows, reference, metric)
    common = sorted(set(mine) & set(theirs))
    differences = {key: mine[key] - theirs[key] for key in common}
    if not differences:
        return PairedDifference(method, reference, metric, math.nan, math.nan, math.nan, 0,
                                "n/a")
    mean = float(np.mean(list(differences.values())))
    if len(differences) < MIN_SUBJECTS:
        return PairedDifference(method, reference, metric, mean, math.nan, math.nan,
                                len(differences), "n/a")
    low, high = bootstrap_ci(differences, resamples=resamples, seed=seed)
    if low > 0 or high < 0:
        gain = (low > 0) == higher_is_better
        verdict = "better" if gain else "worse"
    else:
        verdict = "no difference"
    return PairedDifference(method, reference, metric, mean, low, high, len(differences),
                            verdict)

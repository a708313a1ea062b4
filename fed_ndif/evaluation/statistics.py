"""Paired comparisons with confidence intervals that cover at 4 to 30 subjects, so a table says
"better" only when it is, and verdicts corrected within a table.

**Unit.** The unit is the test subject: a subject's studies (its count levels) and all its
slices are correlated, so a subject contributes the mean of its studies. The estimate is the mean
over subjects of ``method`` minus ``reference``.

**Interval: studentized (bootstrap-t), stratified by site, never narrower than the t-interval.**
Chosen by measurement (``tests/test_statistics.py`` simulates paired tables; BENCHMARKS.md,
"Coverage of the paired intervals", has every number and the command). Each resample draws,
within every site, as many subjects as the site has, and computes T* = (mean* - mean) / se*,
with the stratified standard error se² = Σ n_s·var_s / n²; the interval is
[mean - q(97.5 %)·se, mean - q(2.5 %)·se], each quantile at least t(0.975, n - sites) in size.
When a site has fewer than :data:`MIN_PER_SITE` subjects its variance is unknown, and subjects
are resampled over all sites with the pooled standard error (wider where sites differ: safe).

Measured, 2 000 simulated tables per cell, n = 4, 6, 10, 24 on one site or over three sites
with different true means and spreads (0.5, 1, 2):
- normal subjects: false verdicts under the null 2.3-4.8 %, coverage 95.2-97.9 %;
- lognormal σ = 0.35 (skewness 1.1): false verdicts 3.2-5.7 %, coverage 94.2-96.8 %;
- lognormal σ = 0.5 (skewness 1.75): up to 6.8 % false verdicts (3 sites, n = 6);
- lognormal σ = 1 (skewness 6): 7-11 %. No method covers for every skew at these n.
The candidates it beat: the t-interval alone (exact for normal subjects) gave up to 8.1 % false
verdicts at σ = 0.35 (and 7.6 % with normal subjects over three unequal sites, its degrees of
freedom too generous); the bootstrap-t alone up to 8.4 % over three sites with 1-2 subjects
each; the percentile bootstrap this module used before 4-27 %, 12-27 % at n <= 6.

**Too few subjects.** Below :data:`MIN_SUBJECTS` = 4 no interval and no verdict: with 3
subjects, 3 of the 27 resamples repeat one subject (se* = 0, |T*| infinite), more than the 2.5 %
each tail needs, so the studentized interval is unbounded. The same happens for any resample
layout where more than 2.5 % of T* are infinite; the verdict is then "too few subjects".

**Training seeds.** With rows from several training seeds (a ``seed`` key), a subject's
difference is averaged over seeds first; the interval above is built from these seed-averaged
subject means, and a between-seed term is added: each seed's own estimate (its mean over
subjects) gives a variance over seeds, whose 95 % half-width t(S-1)·sd/√S is combined with the
subject half-width in quadrature. The seed estimates also carry the subjects' within-seed noise,
counted once more, and two t quantiles in quadrature exceed the quantile of their sum: the
interval is conservative. Measured (1 site, d = subject + seed effect shared by all subjects +
noise, 2 000 tables): coverage 97.6-98.9 % with 2-3 seeds and 4-24 subjects, where the
interval over subjects alone covered 76-92 %. A method that does not
train (the input, the filters) has one set of rows, shared by every seed. With one seed the
interval holds subjects only, and the report says so.

**p-values and the correction.** A comparison's p is the smallest α at which its (1 - α)
interval excludes 0 (the interval inverted, by bisection), so p < 0.05 exactly when the 95 %
interval excludes 0. :func:`holm` corrects the verdicts of one table (Holm's step-down, which
controls the family-wise error at 5 % without assumptions about dependence between
comparisons); the intervals stay the uncorrected 95 % ones.

Hand-written: scipy.stats.bootstrap resamples observations, not subjects within sites, and
cannot add a between-seed term; t quantiles come from scipy.stats.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
RESAMPLES = 9999  # p-values down to 2e-4: Holm over ~40 comparisons needs 0.05 / 40
SEED = 0
MIN_SUBJECTS = 4
MIN_PER_SITE = 3
TOO_FEW = "too few subjects"
UNBOUNDED = 1e8  # |T*| at or above this is an infinite T* (a resample with no spread)
_CHUNK = 4_000_000  # elements of one vectorized resampling block


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
    verdict: str  # "better", "worse", "no difference" (for ``method``), TOO_FEW, or "n/a"
    p: float = math.nan  # two-sided, uncorrected
    p_adjusted: float = math.nan  # after :func:`holm` (else the same as ``p``)
    seeds: int = 1
    correction: str = "none"


def seed_of(row: dict) -> int | None:
    """A row's training seed; None for a method that does not train (or a run of one seed
    written before seeds were recorded)."""
    seed = row.get("seed")
    if seed is None or (isinstance(seed, float) and math.isnan(seed)):
        return None
    return int(seed)


def subject_means(rows: list[dict], method: str, metric: str
                  ) -> dict[int | None, dict[tuple[str, str], float]]:
    """seed -> (site, subject) -> the method's mean of ``metric`` over that subject's studies.
    Rows without a ``seed`` key are under None (shared by every seed)."""
    values: dict[int | None, dict[tuple[str, str], list[float]]] = defaultdict(
        lambda: defaultdict(list))
    for row in rows:
        value = row.get(metric, math.nan)
        if row["method"] == method and isinstance(value, float) and math.isfinite(value):
            values[seed_of(row)][(row["site"], row["subject"])].append(value)
    return {seed: {key: float(np.mean(v)) for key, v in by.items()}
            for seed, by in values.items()}


def _groups(strata: np.ndarray) -> list[np.ndarray]:
    """Index sets to resample within: the sites, or all subjects when a site has too few."""
    sites = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    if len(sites) > 1 and min(len(g) for g in sites) >= MIN_PER_SITE:
        return sites
    return [np.arange(len(strata))]


def _mean_se(values: np.ndarray, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and stratified standard error over the last axis, laid out as ``sizes`` blocks."""
    n = values.shape[-1]
    var = np.zeros(values.shape[:-1])
    start = 0
    for size in sizes:
        block = values[..., start:start + size]
        total = block.sum(-1)
        # Sums of squares rather than .var: one pass, no centred copy of the block.
        var += np.maximum((block * block).sum(-1) - total * total / size, 0) / (size - 1) * size
        start += size
    return values.mean(-1), np.sqrt(var) / n


def _sorted_t(values: np.ndarray, groups: list[np.ndarray], resamples: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``values`` [trials, n]: mean, se and the sorted bootstrap T* [trials, B]."""
    order = np.concatenate(groups)
    sizes = [len(g) for g in groups]
    mean, se = _mean_se(values[:, order], sizes)
    picks = np.concatenate([g[rng.integers(0, len(g), (resamples, len(g)))] for g in groups],
                           axis=1)
    out = np.empty((values.shape[0], resamples))
    rows = max(1, _CHUNK // (resamples * values.shape[1]))
    for start in range(0, values.shape[0], rows):
        block = values[start:start + rows][:, picks]  # [rows, B, n]
        m, s = _mean_se(block, sizes)
        shift = m - mean[start:start + rows, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = shift / s
            # A resample with no spread: T* is 0 when it also has no shift, else infinite.
            t = np.where(s > 0, t, np.where(np.abs(shift) > 1e-12, np.sign(shift) * np.inf, 0))
        out[start:start + rows] = np.sort(np.clip(t, -UNBOUNDED, UNBOUNDED), axis=1)
    return mean, se, out


def _quantile(sorted_t: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """Linear-interpolated quantile of each row of ``sorted_t`` at its own ``prob``."""
    position = np.clip(prob, 0.0, 1.0) * (sorted_t.shape[1] - 1)
    below = np.floor(position).astype(int)
    above = np.minimum(below + 1, sorted_t.shape[1] - 1)
    rows = np.arange(sorted_t.shape[0])
    lo, hi = sorted_t[rows, below], sorted_t[rows, above]
    return lo + (position - below) * (hi - lo)


def _bounds(mean, se, sorted_t, seed_sd, seed_df, alpha, subject_df):
    # Never narrower than the t-interval on either side: exact for normal subjects, it keeps
    # the few-subjects-per-site layouts (pooled resampling) from running narrow.
    floor = stats.t.ppf(1 - alpha / 2, subject_df)
    upper_t = np.maximum(_quantile(sorted_t, 1 - alpha / 2), floor)
    lower_t = np.minimum(_quantile(sorted_t, alpha / 2), -floor)
    seed_half = (stats.t.ppf(1 - alpha / 2, seed_df) * seed_sd if seed_df is not None
                 else np.zeros_like(mean))
    with np.errstate(invalid="ignore"):
        low = mean - np.hypot(np.maximum(upper_t, 0) * se, seed_half)
        high = mean + np.hypot(np.maximum(-lower_t, 0) * se, seed_half)
    unbounded = (np.abs(upper_t) >= UNBOUNDED) | (np.abs(lower_t) >= UNBOUNDED)
    return np.where(unbounded, -np.inf, low), np.where(unbounded, np.inf, high)


def studentized_interval(values: np.ndarray, strata, *, seed_estimates: np.ndarray | None = None,
                         resamples: int = RESAMPLES, seed: int = SEED,
                         confidence: float = CONFIDENCE
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, low, high and p of each row of ``values`` [trials, n subjects], the subjects
    labelled by site in ``strata``; ``seed_estimates`` [trials, S]: each training seed's own
    mean over subjects (adds the between-seed term when S >= 2). An unbounded interval is
    (-inf, inf) with p = 1. Vectorized over trials: the coverage test runs thousands at once."""
    values = np.atleast_2d(np.asarray(values, dtype=float))
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    groups = _groups(strata)
    mean, se, sorted_t = _sorted_t(values, groups, resamples, rng)
    subject_df = values.shape[1] - len(groups)
    seed_sd, seed_df = np.zeros_like(mean), None
    if seed_estimates is not None and np.shape(seed_estimates)[-1] >= 2:
        estimates = np.atleast_2d(seed_estimates)
        seed_df = estimates.shape[1] - 1
        seed_sd = estimates.std(1, ddof=1) / math.sqrt(estimates.shape[1])
    low, high = _bounds(mean, se, sorted_t, seed_sd, seed_df, 1 - confidence, subject_df)
    # p: the smallest alpha whose interval excludes 0 (the interval shrinks as alpha grows).
    lo_alpha, hi_alpha = np.full_like(mean, 1.0 / (resamples + 1)), np.ones_like(mean)
    for _ in range(30):
        mid = (lo_alpha + hi_alpha) / 2
        a, b = _bounds(mean, se, sorted_t, seed_sd, seed_df, mid, subject_df)
        excludes = (a > 0) | (b < 0)
        hi_alpha = np.where(excludes, mid, hi_alpha)
        lo_alpha = np.where(excludes, lo_alpha, mid)
    a, b = _bounds(mean, se, sorted_t, seed_sd, seed_df, lo_alpha, subject_df)
    p = np.where((a > 0) | (b < 0), lo_alpha, hi_alpha)
    p = np.where(np.isfinite(low) & np.isfinite(high), p, 1.0)
    return mean, low, high, p


def _verdict(low: float, high: float, p: float, alpha: float, higher_is_better: bool,
             mean: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return TOO_FEW
    if p < alpha:
        return "better" if (mean > 0) == higher_is_better else "worse"
    return "no difference"


def paired_difference(rows: list[dict], method: str, reference: str, metric: str, *,
                      higher_is_better: bool, resamples: int = RESAMPLES,
                      seed: int = SEED) -> PairedDifference:
    """``method`` minus ``reference`` over the subjects both were scored on (in every seed
    where rows carry one), averaged over seeds; uncorrected verdict (see :func:`holm`)."""
    mine, theirs = subject_means(rows, method, metric), subject_means(rows, reference, metric)
    seeds = sorted({s for s in (*mine, *theirs) if s is not None}) or [None]

    def of(table: dict, s) -> dict:
        """A seed's subject means; a method scored once (no seed, or one) serves every seed."""
        if s in table:
            return table[s]
        return next(iter(table.values())) if len(table) == 1 else {}

    common = sorted(set.intersection(*(set(of(mine, s)) & set(of(theirs, s)) for s in seeds)))
    if not common:
        return PairedDifference(method, reference, metric, math.nan, math.nan, math.nan, 0,
                                "n/a", seeds=len(seeds))
    per_seed = np.array([[of(mine, s)[k] - of(theirs, s)[k] for k in common] for s in seeds])
    averaged = per_seed.mean(0)
    mean = float(averaged.mean())
    if len(common) < MIN_SUBJECTS:
        return PairedDifference(method, reference, metric, mean, math.nan, math.nan,
                                len(common), TOO_FEW, seeds=len(seeds))
    strata = np.array([site for site, _ in common])
    _, low, high, p = studentized_interval(
        averaged[None], strata, seed_estimates=per_seed.mean(1)[None] if len(seeds) > 1
        else None, resamples=resamples, seed=seed)
    low, high, p = float(low[0]), float(high[0]), float(p[0])
    if not (math.isfinite(low) and math.isfinite(high)):
        low = high = math.nan
    return PairedDifference(method, reference, metric, mean, low, high, len(common),
                            _verdict(low, high, p, ALPHA, higher_is_better, mean), p=p,
                            p_adjusted=p, seeds=len(seeds))


def holm(differences: list[PairedDifference], *, higher_is_better: dict[str, bool] | bool,
         alpha: float = ALPHA) -> list[PairedDifference]:
    """The same comparisons with Holm-adjusted p-values and verdicts (family: those with a
    p-value; the others keep their verdict). ``higher_is_better``: per metric, or one for all."""
    tested = [i for i, d in enumerate(differences) if math.isfinite(d.p)
              and d.verdict != TOO_FEW]
    m = len(tested)
    adjusted: dict[int, float] = {}
    running = 0.0
    for rank, i in enumerate(sorted(tested, key=lambda i: differences[i].p)):
        running = max(running, min(1.0, (m - rank) * differences[i].p))
        adjusted[i] = running
    out = []
    for i, d in enumerate(differences):
        if i not in adjusted:
            out.append(d)
            continue
        higher = higher_is_better if isinstance(higher_is_better, bool) \
            else higher_is_better[d.metric]
        out.append(replace(d, p_adjusted=adjusted[i], correction=f"Holm over {m}",
                           verdict=_verdict(d.low, d.high, adjusted[i], alpha, higher,
                                            d.mean)))
    return out


def family_note(differences: list[PairedDifference]) -> str:
    """One line for under a table: which correction, over how many comparisons."""
    m = sum(1 for d in differences if math.isfinite(d.p) and d.verdict != TOO_FEW)
    seeds = max((d.seeds for d in differences), default=1)
    seed_text = (f"over {seeds} training seeds (seed-to-seed spread inside the intervals)"
                 if seeds > 1 else "1 training seed: the intervals hold test subjects only, "
                 "not training randomness")
    verdicts = (f"Holm-corrected over the {m} comparisons of this table with a p-value "
                "(family-wise error 5 %)" if m else "none (no comparison has enough subjects)")
    return (f"Verdicts: {verdicts}; intervals: uncorrected {100 * CONFIDENCE:g} % "
            f"studentized bootstrap over subjects within sites; {seed_text}; fewer than "
            f"{MIN_SUBJECTS} subjects: '{TOO_FEW}'.")

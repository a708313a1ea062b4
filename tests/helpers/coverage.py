"""Simulated paired tables for the coverage test of the paired intervals (also run by hand on
other interval functions: BENCHMARKS.md, "Coverage of the paired intervals")."""

from __future__ import annotations

import numpy as np

SIZES = (3, 4, 6, 10, 24)
DISTRIBUTIONS = ("normal", "lognormal")
LOGNORMAL_SIGMA = 0.35  # skewness 1.1
EFFECT = 0.8  # in units of the subjects' spread
# Three sites with different true means and spreads: stratification has something to keep.
SITE_OFFSET = np.array([-0.5, 0.0, 0.5])
SITE_SCALE = np.array([0.5, 1.0, 2.0])


def strata(n: int, sites: int) -> np.ndarray:
    """n subjects over ``sites`` sites, as even as it goes (n = 4 over 3: 2, 1, 1)."""
    sizes = [n // sites + (i < n % sites) for i in range(sites)]
    return np.repeat(np.arange(sites), sizes)


def draw(rng: np.random.Generator, trials: int, labels: np.ndarray, distribution: str,
         effect: float, sigma: float = LOGNORMAL_SIGMA) -> tuple[np.ndarray, float]:
    """[trials, n] subject differences and the true mean they estimate (subject-weighted)."""
    shape = (trials, len(labels))
    if distribution == "normal":
        z = rng.standard_normal(shape)
    else:  # right-skewed, mean 0, sd 1
        z = (rng.lognormal(0.0, sigma, shape) - np.exp(sigma**2 / 2)) / np.sqrt(
            (np.exp(sigma**2) - 1) * np.exp(sigma**2))
    several = labels.max() > 0
    offset = SITE_OFFSET[labels] if several else np.zeros(len(labels))
    scale = SITE_SCALE[labels] if several else np.ones(len(labels))
    offset = offset - offset.mean()  # the sites' offsets average to 0 over these subjects
    return effect + offset + scale * z, effect


def measure(interval, *, trials: int, seed: int = 0, sizes=SIZES, sigma: float = LOGNORMAL_SIGMA
            ) -> dict[tuple[str, int, int], tuple[float, float, float]]:
    """(distribution, sites, n) -> (false-verdict rate under the null, coverage under the
    null, coverage with a true effect). ``interval(values, strata) -> (low, high)``; an
    unbounded or NaN interval ("too few subjects") claims nothing: it covers, no verdict."""
    rng = np.random.default_rng(seed)
    out = {}
    for distribution in DISTRIBUTIONS:
        for sites in (1, 3):
            for n in sizes:
                labels = strata(n, sites)
                result = []
                for effect in (0.0, EFFECT):
                    values, truth = draw(rng, trials, labels, distribution, effect, sigma)
                    low, high = interval(values, labels)
                    silent = ~(np.isfinite(low) & np.isfinite(high))
                    covers = silent | ((low <= truth) & (truth <= high))
                    if effect == 0.0:
                        result.append(float(np.mean(~covers)))
                    result.append(float(np.mean(covers)))
                out[(distribution, sites, n)] = tuple(result)
    return out


def table(results) -> str:
    lines = ["| distribution | sites | n | false verdicts (null) | coverage (null) | "
             "coverage (effect) |", "|---|---|---|---|---|---|"]
    for (distribution, sites, n), (false, null, effect) in sorted(results.items()):
        lines.append(f"| {distribution} | {sites} | {n} | {100 * false:.1f} % | "
                     f"{100 * null:.1f} % | {100 * effect:.1f} % |")
    return "\n".join(lines)


def main() -> None:
    """Print the table for the report's interval: python -m tests.helpers.coverage [σ] [trials]."""
    import sys

    from fed_ndif.evaluation.statistics import studentized_interval

    sigma = float(sys.argv[1]) if len(sys.argv) > 1 else LOGNORMAL_SIGMA
    trials = int(sys.argv[2]) if len(sys.argv) > 2 else 2000

    def interval(values, labels):
        _, low, high, _ = studentized_interval(values, labels, resamples=999)
        return low, high

    sys.stdout.write(table(measure(interval, trials=trials, sigma=sigma)) + "\n")


if __name__ == "__main__":
    main()

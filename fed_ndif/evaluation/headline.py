"""The report's headline: each claim of the method, with its difference, interval, verdict and
the n of subjects and training seeds behind it; and, with several seeds, each seed's paired
differences side by side (the table benchmarks/seed_spread.py used to print).

The claims are one family: their verdicts are Holm-corrected over the claims that have a
p-value. A "beats" claim is supported when the difference is significantly in its favour; a
"≥" claim is contradicted only when significantly against it. No interval (a method missing,
fewer than 4 subjects) reads "not enough data".
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from scipy import stats

from fed_ndif.evaluation.statistics import (
    CONFIDENCE,
    TOO_FEW,
    PairedDifference,
    holm,
    paired_difference,
    seed_of,
)

PSNR = ("psnr", "body PSNR", "dB", True)
LESION_KEYS = ("abs_suvpeak_ideal_bias_pct_ge10", "abs_suvmax_bias_pct_ge10")
LESION_NAMES = {"abs_suvpeak_ideal_bias_pct_ge10": "abs SUVpeak bias vs noise-free, ≥ 10 mm",
                "abs_suvmax_bias_pct_ge10": "abs SUVmax bias vs full, ≥ 10 mm"}
# Comparisons of the per-seed table: (method, reference).
SEED_PAIRS = (("fedndif_global", "local"), ("fedndif_personalized", "fedndif_global"),
              ("fedndif_personalized", "local"), ("fedndif_global", "fedavg_no_nstd"),
              ("fedndif_global", "fedavg_unet"), ("pooled", "fedndif_global"))


def _has(rows: list[dict], method: str) -> bool:
    return any(r["method"] == method for r in rows)


def _claims(rows: list[dict], held_rows: list[dict]) -> list[tuple]:
    """(claim, kind, rows, method, reference, metric) for each claim; kind: "beats" or
    "at least"; metric: (key, name, unit, higher is better)."""
    fedndif = "fedndif_personalized" if _has(rows, "fedndif_personalized") else "fedndif_global"
    claims = []
    for site in sorted({r["site"] for r in rows}):
        mine = [r for r in rows if r["site"] == site]
        claims.append((f"Fed-NDIF {fedndif.split('_')[1]} beats local-only at {site}", "beats",
                       mine, fedndif, "local", PSNR))
    for site in sorted({r["site"] for r in rows}):
        mine = [r for r in rows if r["site"] == site]
        claims.append((f"Fed-NDIF personalized ≥ global at {site}", "at least", mine,
                       "fedndif_personalized", "fedndif_global", PSNR))
    where = ", ".join(sorted({f"{r['site']} {100 * r['count_level']:g} %" for r in held_rows}))
    claims.append((f"The NSTD embedding helps at a held-out count level "
                   f"({where or 'none in this run'}): Fed-NDIF global beats FedAvg without it",
                   "beats", held_rows, "fedndif_global", "fedavg_no_nstd", PSNR))
    claims.append(("Fed-NDIF global beats the FedAvg U-Net on PSNR (all sites)", "beats", rows,
                   "fedndif_global", "fedavg_unet", PSNR))
    lesion = next((key for key in LESION_KEYS if any(
        isinstance(r.get(key), float) and math.isfinite(r[key]) for r in rows)), LESION_KEYS[0])
    claims.append((f"Fed-NDIF global beats the FedAvg U-Net on lesions ({LESION_NAMES[lesion]}, "
                   "all sites)", "beats", rows, "fedndif_global", "fedavg_unet",
                   (lesion, LESION_NAMES[lesion], "pp", False)))
    return claims


def _reading(kind: str, d: PairedDifference) -> str:
    if d.subjects == 0 or d.verdict in (TOO_FEW, "n/a"):
        return "not enough data"
    if kind == "at least":
        return {"worse": "contradicted", "better": "supported"}.get(
            d.verdict, "not contradicted (interval includes 0)")
    return {"better": "supported", "worse": "contradicted"}.get(d.verdict, "not shown")


def headline_claims(rows: list[dict], held_rows: list[dict]) -> list[dict]:
    """Each claim with its Holm-corrected difference: claim, metric, unit, mean, low, high,
    verdict, reading, subjects, seeds (NaN and "n/a" where there are no rows to pair)."""
    claims = _claims(rows, held_rows)
    raw = [paired_difference(group, method, reference, metric[0], higher_is_better=metric[3])
           if _has(group, method) and _has(group, reference)
           else PairedDifference(method, reference, metric[0], math.nan, math.nan, math.nan,
                                 0, "n/a")
           for _, _, group, method, reference, metric in claims]
    corrected = holm(raw, higher_is_better={metric[0]: metric[3] for *_, metric in claims})
    return [{"claim": claim, "method": d.method, "reference": d.reference,
             "metric": metric[1] + ("" if metric[3] else ", lower is better"),
             "unit": metric[2], "mean": d.mean, "low": d.low, "high": d.high, "p": d.p,
             "p_adjusted": d.p_adjusted,
             "verdict": d.verdict, "seeds": d.seeds, "subjects": d.subjects,
             "reading": ("not enough data (no rows to pair)" if d.subjects == 0
                         else _reading(kind, d))}
            for (claim, kind, *_, metric), d in zip(claims, corrected, strict=True)]


def headline(rows: list[dict], held_rows: list[dict]) -> list[str]:
    """Report lines: the claims table and a line on its correction."""
    claims = headline_claims(rows, held_rows)
    out = ["## Headline: the method's claims\n",
           "| claim | difference | 95 % CI | verdict | reading | subjects | seeds |",
           "|---|---|---|---|---|---|---|"]
    for c in claims:
        if c["subjects"] == 0:
            cells = [c["claim"], "–", "–", "n/a", c["reading"], "0", "–"]
        else:
            interval = (f"[{c['low']:+.2f}, {c['high']:+.2f}] {c['unit']}"
                        if math.isfinite(c["low"]) else "–")
            cells = [c["claim"], f"{c['mean']:+.2f} {c['unit']} ({c['metric']})", interval,
                     c["verdict"], c["reading"], str(c["subjects"]), str(c["seeds"])]
        out.append("| " + " | ".join(cells) + " |")
    tested = sum(1 for c in claims if math.isfinite(c["p"]) and c["verdict"] != TOO_FEW)
    seeds = max((c["seeds"] for c in claims), default=1)
    out += ["", "Each difference is the first method minus the second, per test subject (mean "
            "over its count levels), averaged over subjects and training seeds. Verdicts: "
            + (f"Holm over the {tested} claims with an interval (family-wise error 5 %). "
               if tested else "none (no claim has enough subjects for an interval). ")
            + ("1 training seed (`compare.seeds: 1`): training randomness is not inside these "
               "intervals; run with `compare.seeds: 3` for claims about methods."
               if seeds <= 1 else f"{seeds} training seeds: the between-seed spread is inside "
               "the intervals."), ""]
    return out


def seed_table(rows: list[dict]) -> list[str]:
    """Per site and count level, each comparison's difference per training seed (mean over
    test subjects), their mean and a 95 % t-interval over seeds (test set fixed). Empty with
    one seed."""
    seeds = sorted({s for s in map(seed_of, rows) if s is not None})
    if len(seeds) < 2:
        return []
    out = [f"## Training seeds ({len(seeds)}): each seed's paired difference\n",
           "Per seed: the difference averaged over the site's test subjects at that level; then "
           f"the mean over seeds and a {100 * CONFIDENCE:g} % t-interval over seeds (training "
           "randomness with the test set fixed).\n",
           "| site, level | comparison | metric | per seed | mean over seeds | 95 % t-interval "
           "over seeds |", "|---|---|---|---|---|---|"]
    groups = sorted({(r["site"], r["count_level"]) for r in rows})
    for site, level in groups:
        for a, b in SEED_PAIRS:
            for metric, name in (("psnr", "PSNR (dB)"), (LESION_KEYS[0], "abs SUVpeak bias "
                                                          "vs noise-free, ≥ 10 mm (pp)")):
                values = []
                for seed in seeds:
                    diffs = defaultdict(list)
                    for r in rows:
                        if (r["site"], r["count_level"]) != (site, level):
                            continue
                        if r["method"] in (a, b) and seed_of(r) in (seed, None):
                            value = r.get(metric, math.nan)
                            if isinstance(value, float) and math.isfinite(value):
                                diffs[r["subject"]].append((r["method"], value))
                    paired = [dict(v)[a] - dict(v)[b] for v in diffs.values()
                              if {m for m, _ in v} == {a, b}]
                    if paired:
                        values.append(statistics.mean(paired))
                if len(values) != len(seeds):
                    continue
                mean = statistics.mean(values)
                half = (stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)
                        * statistics.stdev(values) / math.sqrt(len(values)))
                out.append(f"| {site}, {100 * level:g} % | {a} − {b} | {name} | "
                           f"{', '.join(f'{v:+.2f}' for v in values)} | {mean:+.2f} | "
                           f"[{mean - half:+.2f}, {mean + half:+.2f}] |")
    return [*out, ""]

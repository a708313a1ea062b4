"""Paired differences to a reference method (Fed-NDIF, or any model named on the command line):
tables over all sites and per site, and one figure with every CI.

A site has only a few test subjects, so its own CI is wide (fewer than 4: no CI, "too few
subjects"); the all-sites row pools subjects, resampled within each site. Each table's verdicts
are Holm-corrected over its own comparisons (statistics.holm), and a line under it says over how
many; the figure shows the uncorrected intervals and verdicts.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fed_ndif.evaluation.statistics import (
    CONFIDENCE,
    TOO_FEW,
    PairedDifference,
    family_note,
    holm,
    paired_difference,
)

# (key, header, format, higher is better).
PAIRED_METRICS = (
    ("psnr", "body PSNR dB", "{:+.2f}", True), ("ssim", "body SSIM", "{:+.4f}", True),
    ("nmse", "body NMSE", "{:+.4f}", False),
    ("abs_suvpeak_ideal_bias_pct_ge10", "abs SUVpeak bias vs noise-free, ≥ 10 mm, pp", "{:+.1f}",
     False),
    ("abs_suvmax_bias_pct_ge10", "abs SUVmax bias vs full, ≥ 10 mm, pp", "{:+.1f}", False),
)
# The figure's panels: image quality, and lesion uptake where the sites have a noise-free image.
FIGURE_METRICS = ("psnr", "abs_suvpeak_ideal_bias_pct_ge10")
FEDNDIF_REFERENCES = ("fedndif_personalized", "fedndif_global")
FIGURE = "paired_differences.png"


def references(rows: list[dict], chosen: str | None) -> list[str]:
    """The methods to pair against: the one chosen, or the Fed-NDIF models present."""
    present = {r["method"] for r in rows}
    if chosen is not None:
        return [chosen] if chosen in present else []
    return [m for m in FEDNDIF_REFERENCES if m in present]


def _cell(d: PairedDifference, fmt: str) -> str:
    if d.subjects == 0:
        return "–"
    if d.verdict in ("n/a", TOO_FEW):
        return f"{fmt.format(d.mean)} ({d.subjects} subject{'s' if d.subjects != 1 else ''}: " \
               "too few subjects)"
    return f"{fmt.format(d.mean)} [{fmt.format(d.low)}, {fmt.format(d.high)}] {d.verdict}"


HIGHER_IS_BETTER = {key: higher for key, _, _, higher in PAIRED_METRICS}


def paired_table(rows: list[dict], method_order: list[str], reference: str,
                 labels: dict[str, str]) -> str:
    """Each method minus ``reference`` over test subjects, with its 95 % CI and verdict."""
    head = ["method", *(f"Δ {h} [95 % CI]" for _, h, _, _ in PAIRED_METRICS)]
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    methods = [m for m in method_order
               if m != reference and any(r["method"] == m for r in rows)]
    raw = [paired_difference(rows, method, reference, key, higher_is_better=higher)
           for method in methods for key, _, _, higher in PAIRED_METRICS]
    corrected = holm(raw, higher_is_better=HIGHER_IS_BETTER)
    formats = [fmt for _, _, fmt, _ in PAIRED_METRICS]
    for i, method in enumerate(methods):
        mine = corrected[i * len(formats):(i + 1) * len(formats)]
        cells = [labels[method], *(_cell(d, fmt) for d, fmt in zip(mine, formats, strict=True))]
        out.append("| " + " | ".join(cells) + " |")
    if methods:
        out += ["", family_note(corrected)]
    return "\n".join(out)


def paired_sections(rows: list[dict], method_order: list[str], reference: str,
                    labels: dict[str, str]) -> list[str]:
    """Report lines: all sites together, then each site alone when there are several."""
    sites = sorted({r["site"] for r in rows})
    lines = [f"## Paired differences against {labels[reference]} "
             f"({100 * CONFIDENCE:g} % CI over test subjects)\n",
             paired_table(rows, method_order, reference, labels), ""]
    if len(sites) > 1:
        for site in sites:
            mine = [r for r in rows if r["site"] == site]
            lines += [f"### {site} alone\n", paired_table(mine, method_order, reference, labels),
                      ""]
    return lines


def figure_paired_differences(rows: list[dict], method_order: list[str], reference: str,
                              labels: dict[str, str], png: Path) -> bool:
    """Per site (and all sites), each method's mean difference to ``reference`` with its CI.
    False (and no file) when no metric has a difference to show."""
    sites = sorted({r["site"] for r in rows})
    groups = [("all sites", rows)] + ([(s, [r for r in rows if r["site"] == s]) for s in sites]
                                      if len(sites) > 1 else [])
    methods = [m for m in method_order
               if m != reference and any(r["method"] == m for r in rows)]
    metrics = [(key, header, higher) for key, header, _, higher in PAIRED_METRICS
               if key in FIGURE_METRICS
               and any(math.isfinite(r.get(key, math.nan)) for r in rows
                       if r["method"] == reference)]
    if not methods or not metrics:
        return False
    # One row per site (and all sites), one column per metric; method names on the left.
    fig, axes = plt.subplots(len(groups), len(metrics), squeeze=False,
                             figsize=(3.0 + 4.2 * len(metrics),
                                      (0.3 * len(methods) + 0.8) * len(groups) + 0.6))
    for row, (name, group) in enumerate(groups):
        for col, (key, header, higher) in enumerate(metrics):
            ax = axes[row, col]
            for y, method in enumerate(methods):
                d = paired_difference(group, method, reference, key, higher_is_better=higher)
                if d.subjects == 0:
                    continue
                color = {"better": "tab:green", "worse": "tab:red"}.get(d.verdict, "tab:gray")
                if math.isfinite(d.low):
                    ax.errorbar(d.mean, y, xerr=[[d.mean - d.low], [d.high - d.mean]], fmt="o",
                                color=color, capsize=3)
                else:
                    ax.plot(d.mean, y, "o", mfc="none", color=color)
            ax.axvline(0, color="black", lw=0.8)
            ax.set_yticks(range(len(methods)))
            ax.set_yticklabels([labels[m] for m in methods] if col == 0 else [], fontsize=7)
            ax.set_ylim(len(methods) - 0.5, -0.5)
            ax.set_title(f"{name}: Δ {header}", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"Each method minus {labels[reference]} over test subjects, "
                 f"{100 * CONFIDENCE:g} % CI\n(green: better, red: worse, grey: no difference, "
                 "open: too few subjects)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return True

"""The comparison report: report.md with the tables and PNG figures, and metrics_summary.json.

Every number in the report is computed here from the rows of metrics.csv of the same run; the
report points to the run's config.yaml when the run has one (a simulated experiment does).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fed_ndif.data.manifest import at_level
from fed_ndif.evaluation.convergence import (
    PLATEAU_DB,
    Curve,
    figure_training_curves,
    plateau_table,
)
from fed_ndif.evaluation.detectability import detectability_section
from fed_ndif.evaluation.headline import headline, seed_table
from fed_ndif.evaluation.paired import (
    FIGURE,
    figure_paired_differences,
    paired_sections,
    paired_table,
    references,
)
from fed_ndif.evaluation.statistics import CONFIDENCE, MIN_SUBJECTS, RESAMPLES

# (key, column header, format); "budget" is a text column filled from the experiment.
# Body values first (fed_ndif.image_metrics: the air of the field of view rewards every
# method alike); the whole-field values after them.
QUALITY_METRICS = (
    ("psnr", "body PSNR dB", "{:.2f}"), ("ssim", "body SSIM", "{:.3f}"),
    ("nmse", "body NMSE", "{:.4f}"), ("liver_nstd", "liver NSTD", "{:.3f}"),
    ("psnr_field", "field PSNR dB", "{:.2f}"), ("ssim_field", "field SSIM", "{:.3f}"),
    ("nmse_field", "field NMSE", "{:.4f}"),
    ("nps_power_liver", "liver noise power ×full", "{:.2f}"),
    ("nps_frequency_liver", "liver noise grain ×full", "{:.2f}"),
)
LESION_METRICS = (
    ("suvmax_bias_pct", "SUVmax vs full %", "{:+.1f}"),
    ("suvpeak_bias_pct", "SUVpeak vs full %", "{:+.1f}"),
    ("suvmean_bias_pct", "SUVmean vs full %", "{:+.1f}"),
    ("suvmax_ideal_bias_pct", "SUVmax vs noise-free %", "{:+.1f}"),
    ("suvpeak_ideal_bias_pct", "SUVpeak vs noise-free %", "{:+.1f}"),
    ("suvmean_ideal_bias_pct", "SUVmean vs noise-free %", "{:+.1f}"),
    ("contrast_recovery", "contrast recovery", "{:.2f}"), ("cnr", "CNR", "{:.1f}"),
)


def _mean_sd(values: list[float], fmt: str) -> str:
    finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    if not finite:
        return "–"
    if len(finite) == 1:
        return fmt.format(finite[0])
    spread = fmt.replace("+", "").format(float(np.std(finite, ddof=1)))
    return f"{fmt.format(float(np.mean(finite)))} ± {spread}"


def method_labels(rows: list[dict]) -> dict[str, str]:
    """Report name of each method; a filter tuned per site gets one name, not one site's value."""
    seen: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        seen[row["method"]].add(row["label"])
    return {method: next(iter(labels)) if len(labels) == 1
            else f"{sorted(labels)[0].split(' (')[0]} (tuned per site)"
            for method, labels in seen.items()}


def tables(rows: list[dict], method_order: list[str], budgets: dict[str, str]) -> str:
    """Per site and count level: image quality, then lesions ≥ 10 mm (mean ± sd over studies)."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["site"], row["count_level"])].append(row)
    out = []
    for (site, level), group in sorted(groups.items()):
        subjects = sorted({r["subject"] for r in group})
        full_nstd = _mean_sd([r["full_count_liver_nstd"] for r in group
                              if r["method"] == method_order[0]], "{:.3f}")
        out.append(f"### {site}, {100 * level:g} % counts ({len(subjects)} test subject"
                   f"{'s' if len(subjects) != 1 else ''}; full-count liver NSTD {full_nstd})\n")
        out += [quality_table(group, method_order, budgets), "",
                f"Lesions ≥ 10 mm ({lesion_count(group, 'ge10')}):\n",
                lesion_table(group, method_order, "ge10"), ""]
    return "\n".join(out)


def _table(rows: list[dict], method_order: list[str], columns, *, suffix: str = "",
           budgets: dict[str, str] | None = None) -> str:
    """Mean ± sd over the given test studies, one line per method (each study weighs the
    same)."""
    labels = method_labels(rows)
    head = ["method", *(["budget"] if budgets is not None else []), *(h for _, h, _ in columns)]
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method in method_order:
        mine = [r for r in rows if r["method"] == method]
        if mine:
            cells = [labels[method], *([budgets.get(method, "–")] if budgets is not None else []),
                     *(_mean_sd([r.get(key + suffix, math.nan) for r in mine], fmt)
                       for key, _, fmt in columns)]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def quality_table(rows: list[dict], method_order: list[str],
                  budgets: dict[str, str] | None = None) -> str:
    return _table(rows, method_order, QUALITY_METRICS, budgets=budgets or {})


def lesion_table(rows: list[dict], method_order: list[str], group: str) -> str:
    if not any(r.get(f"lesions_{group}", 0.0) > 0 for r in rows):
        return "No test lesion in this size group."
    return _table(rows, method_order, LESION_METRICS, suffix=f"_{group}")


def lesion_count(rows: list[dict], group: str) -> str:
    """Distinct lesions (each subject's, once, whatever its number of count levels)."""
    per_subject: dict[tuple[str, str], float] = {}
    for row in rows:
        value = row.get(f"lesions_{group}", math.nan)
        if isinstance(value, float) and math.isfinite(value):
            key = (row["site"], row["subject"])
            per_subject[key] = max(per_subject.get(key, 0.0), value)
    subjects = len(per_subject)
    return (f"{int(sum(per_subject.values()))} lesions in {subjects} test subject"
            f"{'s' if subjects != 1 else ''}")


def figure_metric_vs_level(rows: list[dict], method_order: list[str], png: Path) -> None:
    labels = method_labels(rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    lesion_key, lesion_title = (
        ("suvpeak_ideal_bias_pct_ge10", "SUVpeak bias vs noise-free, lesions ≥ 10 mm (%)")
        if any(math.isfinite(r.get("suvpeak_ideal_bias_pct_ge10", math.nan)) for r in rows)
        else ("suvmax_bias_pct_ge10", "SUVmax bias vs full count, lesions ≥ 10 mm (%)"))
    for ax, (key, title) in zip(axes, (("psnr", "PSNR (dB)"), (lesion_key, lesion_title),
                                       ("liver_nstd", "liver NSTD")), strict=True):
        for method in method_order:
            by_level = defaultdict(list)
            for r in rows:
                if r["method"] == method and math.isfinite(r.get(key, math.nan)):
                    by_level[r["count_level"]].append(r[key])
            if by_level:
                levels = sorted(by_level)
                ax.plot([100 * c for c in levels], [np.mean(by_level[c]) for c in levels],
                        marker="o", label=labels[method])
        ax.set_xscale("log")
        ax.set_xlabel("count level (% of full)")
        ax.set_title(title + ", mean over sites' test studies")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def figure_lesion_slices(site: str, panels: list[tuple[str, np.ndarray]],
                         full: np.ndarray, slice_index: int, png: Path, *,
                         window: tuple[float, float]) -> None:
    """A row of images through a lesion and, below, each image minus the full-count one."""
    columns = len(panels) + 1
    fig, axes = plt.subplots(2, columns, figsize=(2.2 * columns, 4.8), squeeze=False)
    for col, (title, volume) in enumerate([*panels, ("full count", full)]):
        axes[0, col].imshow(volume[slice_index], cmap="gray_r", vmin=window[0], vmax=window[1])
        axes[0, col].set_title(title, fontsize=7)
        diff = volume[slice_index] - full[slice_index]
        limit = max(0.5, 0.5 * window[1] / 2)
        axes[1, col].imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit)
        axes[1, col].set_title("minus full count" if col < columns - 1 else "", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"{site}: axial slice through the largest test lesion (SUV {window[0]:g}–"
                 f"{window[1]:g}; differences ±{max(0.5, window[1] / 4):g} SUV)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def split_held_out(rows: list[dict], held_out: dict[str, tuple[float, ...]]
                    ) -> tuple[list[dict], list[dict]]:
    def held(row: dict) -> bool:
        return at_level(row["count_level"], held_out.get(row["site"], ()))

    return [r for r in rows if not held(r)], [r for r in rows if held(r)]


def _held_out_section(rows: list[dict], method_order: list[str], references: list[str],
                      labels: dict[str, str], budgets: dict[str, str]) -> list[str]:
    where = ", ".join(f"{site} at {100 * level:g} %" for site, level in
                      sorted({(r["site"], r["count_level"]) for r in rows}))
    lines = [f"## A count level the site never trained on: {where}\n",
             "Left out of that site's training and validation data (and of every table "
             "above); the federation's other sites may hold other levels. Does the noise "
             "embedding carry the model to it?\n",
             quality_table(rows, method_order, budgets), "",
             f"Lesions ≥ 10 mm ({lesion_count(rows, 'ge10')}):\n",
             lesion_table(rows, method_order, "ge10"), ""]
    for against in references:
        lines += [f"Paired differences against {labels[against]} at this level "
                  f"({100 * CONFIDENCE:g} % CI over test subjects):\n",
                  paired_table(rows, method_order, against, labels), ""]
    return lines


def write_report(run: Path, rows: list[dict], method_order: list[str], *,
                 curves: dict[str, Curve], notes: list[str], figures: list[Path],
                 budgets: dict[str, str] | None = None, reference: str | None = None,
                 held_out: dict[str, tuple[float, ...]] | None = None,
                 detection: list[dict] | None = None) -> Path:
    """``reference``: the method every other is paired against (default: Fed-NDIF).
    ``held_out``: per site, count levels it never trained on; their rows get their own
    section and stay out of every other table. ``detection``: the model observer's rows
    (:mod:`fed_ndif.evaluation.detectability`), at the levels the main tables show."""
    budgets = budgets or {}
    rows, held_rows = split_held_out(rows, held_out or {})
    labels = method_labels(rows)
    paired_against = references(rows, reference)
    figure_metric_vs_level(rows, method_order, run / "figures" / "metrics_vs_count_level.png")
    if curves:
        figure_training_curves(curves, run / "figures" / "training_curves.png")
    sites = sorted({r["site"] for r in rows})
    title = ("Fed-NDIF simulated multi-site comparison" if len(sites) > 1
             else f"Fed-NDIF evaluation of site {sites[0]}")
    config = (" the exact configuration is `config.yaml`." if (run / "config.yaml").is_file()
              else "")
    lines = [
        f"# {title}\n",
        f"Sites: {', '.join(sites)}. Every number below is computed from `metrics.csv` of this "
        f"run (one row per test study and method);{config}\n",
        "Image metrics are against the full-count image, in SUV, inside the body (each slice's "
        "patient in the full count, lungs included; most of the field of view is air, where "
        "every method is nearly exact): body PSNR, SSIM and NMSE; the whole-field values follow "
        "as secondary columns. PSNR data range: the full-count volume's maximum SUV (per "
        "study). SSIM: 3D, 7-voxel window (scikit-image), same data range, averaged over the "
        "body. Liver NSTD: std/mean in the liver mask (texture: far "
        "below the full-count value means over-smoothed). Noise texture (simulated sites): "
        "the noise power spectrum of the image minus the noise-free one in the liver, as a "
        "ratio to full count's: its power (noise variance) and its mean spatial frequency "
        "(grain; below 1 coarser, blotchier; `fed_ndif/evaluation/texture.py`).\n",
        "Lesion uptake bias (%) is against the full-count image and, on simulated sites, against "
        "the **noise-free** reconstruction of the same scan (its expected counts through the "
        "same OSEM and post-filter): maxima of the noisy full count carry noise, so a perfect "
        "denoiser scores about 0 % against the noise-free image, not against full count. "
        "SUVpeak (PERCIST): the highest mean in a 1 cm³ sphere centred in the lesion, in world "
        "mm. Lesions are grouped by equivalent-sphere diameter (< 10 mm and ≥ 10 mm). A lesion's "
        "background is a 3D shell from one FWHM of the site's resolution outside it (beyond "
        "the tail of its own blurred uptake) to 10 mm further. Contrast recovery = output "
        "lesion contrast / the noise-free image's lesion contrast (the full count's where "
        "there is no noise-free image; lesions with a lesion/background ratio of at least "
        "1.5); CNR = (lesion mean - background mean) / background SD in that shell.\n",
        "Paired differences: each method minus the reference named in the section, per test "
        "subject (mean over its count levels; with several training seeds, averaged over "
        f"seeds), averaged over subjects, with a {100 * CONFIDENCE:g} % CI from {RESAMPLES} "
        "studentized bootstrap resamples of subjects within each site (never of slices or "
        "studies), never narrower than the t-interval, plus a between-seed term with several "
        "seeds (`fed_ndif/evaluation/statistics.py` says how, and what coverage it measured). "
        "'better' / 'worse' when the Holm-corrected p-value of the table's comparisons is "
        f"below 5 %, else 'no difference'; fewer than {MIN_SUBJECTS} subjects: 'too few "
        "subjects'.\n",
        *[f"- {note}" for note in notes], "",
        *headline(rows, held_rows),
        "## All sites and count levels (mean ± sd over test studies)\n",
        quality_table(rows, method_order, budgets), "",
        f"### Lesions ≥ 10 mm ({lesion_count(rows, 'ge10')})\n",
        lesion_table(rows, method_order, "ge10"), "",
        f"### Lesions < 10 mm ({lesion_count(rows, 'lt10')})\n",
        lesion_table(rows, method_order, "lt10"), "",
        *detectability_section(split_held_out(detection or [], held_out or {})[0],
                               method_order, labels),
    ]
    for against in paired_against:
        lines += paired_sections(rows, method_order, against, labels)
    if paired_against and figure_paired_differences(rows, method_order, paired_against[-1],
                                                    labels, run / "figures" / FIGURE):
        lines.append(f"![paired differences](figures/{FIGURE})\n")
    if held_rows:
        lines += _held_out_section(held_rows, method_order, paired_against, labels, budgets)
    lines += seed_table(rows + held_rows)
    lines.append("![metrics against count level](figures/metrics_vs_count_level.png)\n")
    if curves:
        lines += ["## Training curves\n",
                  "Validation PSNR over training, on one axis: optimizer steps per site. A "
                  "method has reached its plateau when the best validation PSNR of its last "
                  f"quarter of training is less than {PLATEAU_DB:g} dB above the best before "
                  "it; where one has not, its order against the others is the budget's, not "
                  "the method's. With several training seeds: the first seed's curves.\n",
                  plateau_table(curves), "",
                  "![training curves](figures/training_curves.png)\n"]
    lines += ["## Per site and count level\n", tables(rows, method_order, budgets)]
    lines += [f"![{p.stem}](figures/{p.name})\n" for p in figures]
    report = run / "report.md"
    report.write_text("\n".join(lines))

    def mean(values: list[float]) -> float | None:
        finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
        return float(np.mean(finite)) if finite else None

    keys = [key for key, _, _ in QUALITY_METRICS] + [
        f"{key}_{group}" for group in ("ge10", "lt10") for key, _, _ in LESION_METRICS]
    (run / "metrics_summary.json").write_text(json.dumps(
        {m: {key: mean([r.get(key, math.nan) for r in rows if r["method"] == m])
             for key in keys} for m in method_order
         if any(r["method"] == m for r in rows)}, indent=1))
    return report

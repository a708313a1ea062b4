"""Did each learned method train to a plateau? Validation curves on one axis, and the check.

Which of two methods is better says something about the methods only once both have stopped
improving; before that it says which one the budget happened to favour. Every curve is put on
one axis, optimizer steps per site (a federation's round is its local steps; pooled training's
steps are shared by all sites), and a curve has reached its plateau when the best validation
PSNR of its last quarter is less than ``PLATEAU_DB`` above the best before it.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PLATEAU_DB = 0.1
# One point of a curve: steps per site, validation PSNR (may be nan), training loss (may be nan).
Curve = list[dict[str, float]]


def federation_curve(rounds: list[dict], *, local_steps: int) -> Curve:
    """A federation's metrics.jsonl records (one per round) as a curve."""
    return [{"step": float(r["round"] * local_steps),
             "val_psnr": float(r.get("evaluate", {}).get("val_psnr", math.nan)),
             "train_loss": float(r.get("train", {}).get("train_loss", math.nan))}
            for r in rounds]


def trainer_curve(records: list[dict], *, sites: int = 1, start: int = 0) -> Curve:
    """A trainer's metrics.jsonl records as a curve; ``sites``: how many sites' data the steps
    were spent on (pooled training), so that every curve counts steps per site; ``start``: the
    steps per site spent before (fine-tuning starts from a federated round)."""
    return [{"step": start + float(r["step"]) / sites,
             "val_psnr": float(r.get("val_psnr", math.nan)),
             "train_loss": float(r.get("loss", math.nan))} for r in records]


def last_quarter_gain(curve: Curve) -> float | None:
    """The best validation PSNR after 3/4 of training minus the best up to it; None when the
    curve has no validation before or after that point."""
    points = [(p["step"], p["val_psnr"]) for p in curve if math.isfinite(p["val_psnr"])]
    if not points:
        return None
    cut = 0.75 * max(step for step, _ in points)
    before = [v for step, v in points if step <= cut]
    after = [v for step, v in points if step > cut]
    if not before or not after:
        return None
    return max(after) - max(before)


def plateau_table(curves: dict[str, Curve]) -> str:
    """Markdown: per curve, its validation points, final and best PSNR, last-quarter gain."""
    lines = ["| method | validations | steps per site | best val PSNR dB | last-quarter gain dB "
             "| plateau |", "|---|---|---|---|---|---|"]
    for name, curve in curves.items():
        finite = [p for p in curve if math.isfinite(p["val_psnr"])]
        gain = last_quarter_gain(curve)
        verdict = ("–" if gain is None else "yes" if gain < PLATEAU_DB else "no, still rising")
        best = f"{max(p['val_psnr'] for p in finite):.2f}" if finite else "–"
        last = f"{max(p['step'] for p in curve):.0f}" if curve else "–"
        lines.append(f"| {name} | {len(finite)} | {last} | {best} | "
                     f"{'–' if gain is None else f'{gain:+.2f}'} | {verdict} |")
    return "\n".join(lines)


def figure_training_curves(curves: dict[str, Curve], png: Path) -> None:
    """Validation PSNR and training loss of every learned method against steps per site."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, curve in curves.items():
        validated = [p for p in curve if math.isfinite(p["val_psnr"])]
        if validated:
            axes[0].plot([p["step"] for p in validated], [p["val_psnr"] for p in validated],
                         marker=".", label=name)
        if any(math.isfinite(p["train_loss"]) for p in curve):
            axes[1].plot([p["step"] for p in curve], [p["train_loss"] for p in curve],
                         label=name)
    axes[0].set(xlabel="optimizer steps per site", ylabel="PSNR (dB)",
                title="validation PSNR")
    axes[1].set(xlabel="optimizer steps per site", ylabel="loss", title="training loss",
                yscale="log")
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)

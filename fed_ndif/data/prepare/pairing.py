"""Pairing each low-count PET series with the full-count series of its study, never guessing.

A low-count series is made from the same acquisition as its full-count series (list-mode data
cut to a shorter time), so the two share the frame of reference and the voxel grid, and the
count fraction is the ratio of their frame durations (ActualFrameDuration), or of their counts
(CountsAccumulated) where the scanner states them. When neither tells, or two series could be
the full count, the user's pairs file decides; a series nothing decides is skipped and said so.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fed_ndif.data.prepare.scan import PetSeries
from fed_ndif.errors import FedNdifError

log = logging.getLogger(__name__)

# A measure within this fraction of the longest one ties with it (two full-count candidates).
TIE = 0.01
# Largest spread of the per-slice fractions around their median (beds cut alike).
FRACTION_SPREAD = 0.02
PAIRS_COLUMNS = ("low_count_series_uid", "full_count_series_uid", "count_level")


@dataclass(frozen=True)
class Pair:
    low: PetSeries
    full: PetSeries
    level: float  # fraction of full count
    how: str  # what the fraction rests on


@dataclass(frozen=True)
class Skipped:
    series: PetSeries
    reason: str


@dataclass(frozen=True)
class UserPair:
    """A row of the ``--pairs`` file."""

    low_uid: str
    full_uid: str
    level: float
    line: int


def read_pairs_file(path: Path) -> dict[str, UserPair]:
    """The ``--pairs`` CSV: low-count series UID -> its full-count series UID and fraction."""
    if not path.is_file():
        raise FedNdifError(f"--pairs {path}: no such file")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in PAIRS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise FedNdifError(f"--pairs {path}: lacks column(s) {', '.join(missing)} (needs "
                               f"{', '.join(PAIRS_COLUMNS)})")
        pairs: dict[str, UserPair] = {}
        for line, row in enumerate(reader, start=2):
            low, full = (row[c].strip() for c in PAIRS_COLUMNS[:2])
            try:
                level = float(row["count_level"])
            except (TypeError, ValueError):
                level = float("nan")
            if not low or not full:
                raise FedNdifError(f"--pairs {path}:{line}: both series UIDs are needed")
            if low == full:
                raise FedNdifError(f"--pairs {path}:{line}: a series cannot be its own full count")
            if not 0 < level < 1:
                raise FedNdifError(f"--pairs {path}:{line}: count_level must be a fraction of "
                                   f"full count in (0, 1), got {row['count_level']!r}")
            if low in pairs:
                raise FedNdifError(f"--pairs {path}:{line}: the low-count series of line "
                                   f"{pairs[low].line} again")
            pairs[low] = UserPair(low, full, level, line)
    if not pairs:
        raise FedNdifError(f"--pairs {path}: no pairs in the file")
    return pairs


def check_pairs_file(pairs: dict[str, UserPair], known: dict[str, PetSeries], path: Path
                     ) -> None:
    """Every series the pairs file names must be a PET series of the export."""
    for pair in sorted(pairs.values(), key=lambda p: p.line):
        for what, uid in (("low-count", pair.low_uid), ("full-count", pair.full_uid)):
            if uid not in known:
                raise FedNdifError(f"--pairs {path}:{pair.line}: the {what} series is not a PET "
                                   "series of the export")


def _measure(series: list[PetSeries]) -> tuple[str, list[dict[int, float]]] | None:
    """Frame durations where every series states them on every slice, else counts."""
    for name, attribute in (("frame durations", "durations"), ("counts", "counts")):
        values = [getattr(s, attribute) for s in series]
        if all(len(v) == len(s.files) for v, s in zip(values, series, strict=True)):
            return name, values
    return None


def _pair_group(group: list[PetSeries], user_fulls: set[str]
                ) -> tuple[list[Pair], list[Skipped]]:
    """One frame of reference and grid: the longest series is the full count of the others."""
    if len(group) == 1:
        if group[0].uid in user_fulls:
            return [], []
        return [], [Skipped(group[0], "no other PET series of its study has the same frame of "
                                      "reference and voxel grid")]
    measured = _measure(group)
    if measured is None:
        return [], [Skipped(s, "frame durations (ActualFrameDuration) and counts are not stated "
                               "on every slice: the count fraction is unknown; name the pair in "
                               "--pairs") for s in group if s.uid not in user_fulls]
    how, values = measured
    medians = np.array([np.median(list(v.values())) for v in values])
    longest = float(medians.max())
    tied = [s for s, m in zip(group, medians, strict=True) if m >= (1 - TIE) * longest]
    if len(tied) > 1:
        reason = (f"{len(tied)} series share the longest {how}, so which is the full count is "
                  "ambiguous; name the pairs in --pairs")
        return [], [Skipped(s, reason) for s in group if s.uid not in user_fulls]
    full = tied[0]
    full_values = values[group.index(full)]
    pairs, skipped = [], []
    for series, series_values in zip(group, values, strict=True):
        if series is full:
            continue
        ratios = np.array([series_values[k] / full_values[k] for k in sorted(full_values)])
        fraction = float(np.median(ratios))
        spread = float(np.max(np.abs(ratios - fraction))) / fraction
        if spread > FRACTION_SPREAD:
            skipped.append(Skipped(series, f"its {how} are not one fraction of the full count's "
                                           f"(per slice {ratios.min():.3g} to {ratios.max():.3g}"
                                           "); name the pair in --pairs"))
            continue
        pairs.append(Pair(series, full, round(fraction, 4), how))
    return pairs, skipped


def pair_study(series: list[PetSeries], user: dict[str, UserPair] | None = None
               ) -> tuple[list[Pair], list[Skipped]]:
    """The pairs of one study's PET series, and the series skipped with the reason."""
    user = user or {}
    by_uid = {s.uid: s for s in series}
    pairs: list[Pair] = []
    skipped: list[Skipped] = []
    usable = []
    for s in series:
        if s.derived:  # our own output, or another program's: never training data
            skipped.append(Skipped(s, f"{s.derived}; never paired"))
        elif s.geometry is None:
            skipped.append(Skipped(s, f"not one regular volume: {s.geometry_problem}"))
        elif not s.attenuation_corrected:
            skipped.append(Skipped(s, "not attenuation-corrected (CorrectedImage lacks ATTN)"))
        elif not s.frame_uid:
            skipped.append(Skipped(s, "FrameOfReferenceUID is missing"))
        else:
            usable.append(s)
    usable_uids = {s.uid for s in usable}
    user_lows = {uid: p for uid, p in user.items() if uid in by_uid}
    user_fulls = {p.full_uid for p in user_lows.values()}
    for uid, choice in sorted(user_lows.items(), key=lambda item: item[1].line):
        low, full = by_uid[uid], by_uid.get(choice.full_uid)
        if uid not in usable_uids:
            continue  # already skipped above, with its reason
        if full is None:
            skipped.append(Skipped(low, f"--pairs line {choice.line} names a full-count series "
                                        "of another study"))
        elif full.uid not in usable_uids:
            skipped.append(Skipped(low, f"--pairs line {choice.line}: its full-count series is "
                                        "not usable (see that series)"))
        elif (full.frame_uid, full.geometry) != (low.frame_uid, low.geometry):
            skipped.append(Skipped(low, f"--pairs line {choice.line}: the two series differ in "
                                        "frame of reference or voxel grid"))
        else:
            pairs.append(Pair(low, full, choice.level, "--pairs"))
    groups: dict[tuple, list[PetSeries]] = {}
    for s in usable:
        if s.uid not in user_lows:
            groups.setdefault((s.frame_uid, s.geometry), []).append(s)
    for group in groups.values():
        found, left = _pair_group(group, user_fulls)
        pairs += found
        skipped += left
    return pairs, skipped

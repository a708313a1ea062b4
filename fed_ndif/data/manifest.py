"""Site manifests, the one home for their format: read, write and validate.

A manifest is a CSV with one row per low-count study and columns :data:`MANIFEST_COLUMNS`,
plus the optional :data:`OPTIONAL_COLUMNS` (blank or absent when a site has no such file);
of the written columns only :data:`REQUIRED_COLUMNS` must be filled in: the masks are optional,
because a hospital rarely has them (a blank ``liver_mask`` means the automatic liver VOI of
:mod:`fed_ndif.data.nstd` is used, a blank ``lesion_mask`` that lesion metrics are skipped);
paths are relative to the manifest; ``count_level`` is a fraction of full count; ``split`` is
train / val / test, assigned by subject. It is also the format a hospital fills in for its own
data, so a site's ClientApp needs this module and nothing of the simulator.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from fed_ndif.errors import FedNdifError

MANIFEST_COLUMNS = ("subject", "count_level", "low_count", "full_count", "liver_mask",
                    "lesion_mask", "split")
REQUIRED_COLUMNS = ("subject", "count_level", "low_count", "full_count", "split")
# ``ideal``: a noise-free reconstruction of the full-count scan (only simulated sites have one),
# the reference that shows how close a denoiser comes to the physical best.
OPTIONAL_COLUMNS = ("ideal",)
MANIFEST_NAME = "manifest.csv"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Study:
    """One manifest row, with paths made absolute."""

    subject: str
    count_level: float
    low_count: Path
    full_count: Path
    liver_mask: Path | None  # None: the automatic liver VOI
    lesion_mask: Path | None  # None: no lesion metrics
    split: str
    ideal: Path | None = None


def at_level(level: float, levels) -> bool:
    """Whether a count fraction is one of ``levels``: fractions from CSV and YAML compare with a
    tolerance, not bit for bit."""
    return any(abs(float(level) - float(c)) < 1e-9 for c in levels)


def read_manifest(path: str | Path) -> list[Study]:
    """Parse and check a site manifest; errors name the file, row and column at fault."""
    path = Path(path)
    if not path.is_file():
        raise FedNdifError(f"{path}: no such manifest file")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise FedNdifError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
        studies = []
        for line, row in enumerate(reader, start=2):
            blank = [c for c in ("subject", "low_count", "full_count")
                     if not (row.get(c) or "").strip()]
            if blank:
                raise FedNdifError(f"{path}:{line}: column(s) {', '.join(blank)} are blank")
            try:
                level = float(row["count_level"])
            except ValueError:
                raise FedNdifError(f"{path}:{line}: count_level {row['count_level']!r} is not "
                                   "a number") from None
            if not 0 < level <= 1:
                raise FedNdifError(f"{path}:{line}: count_level must be a fraction in (0, 1], "
                                   f"got {level}")
            if row["split"] not in SPLITS:
                raise FedNdifError(f"{path}:{line}: split must be one of {SPLITS}, "
                                   f"got {row['split']!r}")

            def optional(column: str, row: dict = row) -> Path | None:
                value = (row.get(column) or "").strip()
                return path.parent / value if value else None

            studies.append(Study(
                subject=row["subject"], count_level=level,
                low_count=path.parent / row["low_count"],
                full_count=path.parent / row["full_count"],
                liver_mask=optional("liver_mask"), lesion_mask=optional("lesion_mask"),
                split=row["split"], ideal=optional("ideal")))
    if not studies:
        raise FedNdifError(f"{path}: the manifest has no studies")
    splits_of: dict[str, set[str]] = {}
    for s in studies:
        splits_of.setdefault(s.subject, set()).add(s.split)
    mixed = sorted(subject for subject, splits in splits_of.items() if len(splits) > 1)
    if mixed:
        raise FedNdifError(f"{path}: subject(s) {', '.join(mixed)} appear in more than one split "
                           "(splits must be by subject)")
    return studies


def write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    """Rows of column -> value; the masks may be blank; an optional column is written when any
    row has it."""
    optional = [c for c in OPTIONAL_COLUMNS if any(row.get(c) for row in rows)]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*MANIFEST_COLUMNS, *optional])
        writer.writeheader()
        writer.writerows([{c: row.get(c) or "" for c in writer.fieldnames} for row in rows])


def manifest_path(data: Path) -> Path:
    """A site's manifest, given the manifest itself or the site folder that holds it."""
    return data / MANIFEST_NAME if data.is_dir() else data

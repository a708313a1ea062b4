"""``fed-ndif prepare-site``: write a site folder from a DICOM export, staged and resumable.

The site folder holds, per study, ``<subject>/<study>/full_count.nii.gz`` and one
``low_count_<N>pct.nii.gz`` per paired low-count series (SUV, from the shared PET reader), the
manifest (masks blank: the automatic liver VOI stands in, lesion metrics are skipped) and
``prepare.json`` (the summary). Nothing in it, nor in the log, names the patient: pseudonyms
replace identities and messages are scrubbed of file names and UIDs. Work goes into a hidden
sibling folder, one complete study at a time, and is renamed into place at the end, so an
interrupted run continues where it stopped and the same export always gives the same folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fed_ndif.data.dicom.read import read_pet_files
from fed_ndif.data.manifest import MANIFEST_NAME, SPLITS, write_manifest
from fed_ndif.data.nifti import save_nifti
from fed_ndif.data.nstd import find_liver_voi
from fed_ndif.data.prepare.pairing import (
    Pair,
    check_pairs_file,
    pair_study,
    read_pairs_file,
)
from fed_ndif.data.prepare.privacy import (
    Pseudonym,
    new_salt,
    pseudonyms,
    quiet_dicom_warnings,
    read_salt,
    scrub,
    write_salt,
)
from fed_ndif.data.prepare.scan import PetSeries, scan_export
from fed_ndif.data.volume import Volume
from fed_ndif.errors import FedNdifError
from fed_ndif.staging import (
    partial_folder,
    remove_path,
    resumable_folder,
    staged_file,
    staged_folder,
)

log = logging.getLogger(__name__)

SUMMARY_NAME = "prepare.json"
STUDY_RECORD = ".study.json"  # per staged study: what it holds (removed before the rename)
FULL_NAME = "full_count.nii.gz"


def level_tag(level: float) -> str:
    """File-name tag of a count level: 0.1 -> '10pct'."""
    return f"{level * 100:.4g}pct"


@dataclass
class SkipNote:
    """A skipped series, as the summary names it (pseudonym, series number, reason)."""

    where: str
    series: str
    reason: str

    def line(self) -> str:
        return f"{self.where} {self.series}: {self.reason}"


@dataclass
class PrepareResult:
    site_dir: Path
    rows: list[dict[str, str]]
    pairs_per_level: dict[float, int]
    skipped: list[SkipNote]
    unreadable: list[str]
    splits: dict[str, int] = field(default_factory=dict)
    no_liver: dict[str, str] = field(default_factory=dict)  # study -> why no automatic VOI

    def summary_lines(self) -> list[str]:
        subjects = len({r["subject"] for r in self.rows})
        studies = len({r["full_count"] for r in self.rows})
        lines = [f"prepared {len(self.rows)} pairs from {studies} studies of {subjects} subjects "
                 f"(subjects per split: " + ", ".join(f"{k} {v}" for k, v in self.splits.items())
                 + ")",
                 "pairs per count level: " + ", ".join(
                     f"{100 * lv:g} %: {n}" for lv, n in sorted(self.pairs_per_level.items()))]
        lines.append(f"skipped series: {len(self.skipped)}")
        lines += [f"  {note.line()}" for note in self.skipped]
        if self.no_liver:
            lines.append(f"studies without an automatic liver VOI (give their rows a "
                         f"liver_mask before training): {len(self.no_liver)}")
            lines += [f"  {study}: {reason}" for study, reason in self.no_liver.items()]
        if self.unreadable:
            lines.append(f"unreadable files: {len(self.unreadable)}")
            lines += [f"  {reason}: {n} file(s)" for reason, n in Counter(self.unreadable).items()]
        return lines


@dataclass
class StudyPlan:
    study_uid: str
    name: Pseudonym
    full: PetSeries
    pairs: list[tuple[Pair, str]]  # pair and its low-count file name

    def fingerprint(self) -> str:
        parts = [self.full.fingerprint()] + [f"{name}:{pair.level}:{pair.low.fingerprint()}"
                                             for pair, name in self.pairs]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


SALT_SUFFIX = ".salt"


def salt_path(keep_key: Path | None, salt: Path | None) -> Path:
    """Where the site's secret salt is kept: ``--salt``, else beside ``--keep-key``."""
    if salt is not None:
        return salt
    if keep_key is not None:
        return keep_key.with_name(keep_key.name + SALT_SUFFIX)
    raise FedNdifError("the subject order needs the site's secret salt: pass --keep-key FILE "
                       f"(the salt is then kept beside it, FILE{SALT_SUFFIX}) or --salt FILE; "
                       "keep it where patient data belongs, never in the site folder")


def _check_places(export: Path, site_dir: Path, keep_key: Path | None, overwrite: bool,
                  salt: Path) -> None:
    export_abs, site_abs = export.resolve(), site_dir.resolve()
    if not export.is_dir():
        raise FedNdifError(f"{export}: no such folder (the DICOM export to prepare)")
    if site_abs == export_abs or site_abs.is_relative_to(export_abs) or export_abs.is_relative_to(
            site_abs):
        raise FedNdifError(f"{site_dir}: the site folder and the export {export} must not "
                           "contain each other")
    if site_dir.exists() and not overwrite:
        raise FedNdifError(f"{site_dir} exists; choose a new folder or pass --overwrite")
    if keep_key is not None:
        key_abs = keep_key.resolve()
        if key_abs.is_relative_to(site_abs) or key_abs.is_relative_to(
                partial_folder(site_abs)):
            raise FedNdifError(f"--keep-key {keep_key}: the key must be kept outside the site "
                               "folder (it links pseudonyms to studies)")
        if key_abs.is_dir():
            raise FedNdifError(f"--keep-key {keep_key}: is a folder; give a file name")
    salt_abs = salt.resolve()
    if salt_abs.is_relative_to(site_abs) or salt_abs.is_relative_to(partial_folder(site_abs)):
        raise FedNdifError(f"--salt {salt}: the salt must be kept outside the site folder (with "
                           "it, the pseudonyms can be linked to patient IDs)")
    if salt_abs.is_dir():
        raise FedNdifError(f"--salt {salt}: is a folder; give a file name")


def _splits(subjects: list[str], *, val: int, test: int, seed: int) -> dict[str, str]:
    """Subject -> split: ``test`` and ``val`` subjects drawn with ``seed``, the rest train."""
    if val < 0 or test < 0:
        raise FedNdifError(f"--val and --test must be at least 0, got {val} and {test}")
    if val + test >= len(subjects):
        raise FedNdifError(f"--val {val} --test {test} leave no training subject: the export "
                           f"gives {len(subjects)} subject(s) with pairs")
    order = np.random.default_rng(seed).permutation(len(subjects))
    split = {}
    for rank, index in enumerate(order):
        split[subjects[index]] = "test" if rank < test else "val" if rank < test + val else "train"
    return split


def _split_counts(split: dict[str, str], rows: list[dict[str, str]]) -> dict[str, int]:
    counts = Counter(split[s] for s in {r["subject"] for r in rows})
    return {name: counts[name] for name in SPLITS}


def _plan(studies: dict[str, list[PetSeries]], names: dict[str, Pseudonym], user
          ) -> tuple[list[StudyPlan], list[SkipNote]]:
    plans, notes = [], []
    for study_uid in sorted(studies, key=lambda s: (names[s].subject, names[s].study)):
        name = names[study_uid]
        pairs, skipped = pair_study(studies[study_uid], user)
        notes += [SkipNote(name.folder, s.series.label, s.reason) for s in skipped]
        by_full: dict[str, list[Pair]] = {}
        for pair in pairs:
            by_full.setdefault(pair.full.uid, []).append(pair)
        if len(by_full) > 1:
            # Two acquisitions in one study (e.g. two bed positions or two scans): each gets
            # its own study folder.
            log.debug("%s: %d full-count series", name.folder, len(by_full))
        fulls = sorted(by_full, key=lambda u: (by_full[u][0].full.number or 0, u))
        for k, full_uid in enumerate(fulls):
            own = Pseudonym(name.subject, name.study if k == 0 else f"{name.study}-{k + 1}")
            named, used = [], Counter()
            for pair in sorted(by_full[full_uid], key=lambda p: (-p.level, p.low.number or 0)):
                tag = level_tag(pair.level)
                used[tag] += 1
                suffix = "" if used[tag] == 1 else f"_{used[tag]}"
                named.append((pair, f"low_count_{tag}{suffix}.nii.gz"))
            plans.append(StudyPlan(study_uid, own, by_full[full_uid][0].full, named))
    return plans, notes


class _SkipStudy(Exception):
    pass


# The reader's advice to pass --weight/--dose: prepare-site takes both from the files only.
_SUPPLY_OPTION = re.compile(r"; supply (.*?) with --(weight|dose) [A-Z]+")


def _read(series: PetSeries, roots: list[Path]) -> Volume:
    try:
        volume, _ = read_pet_files(series.files, log_level=logging.DEBUG)
    except FedNdifError as exc:
        reason = _SUPPLY_OPTION.sub(r"; the export must carry \1", str(exc))
        raise _SkipStudy(scrub(reason, [f.path for f in series.files], roots)) from None
    return volume


def _write_study(plan: StudyPlan, folder: Path, roots: list[Path]) -> dict:
    """Convert one study into ``folder`` (staged); returns its record (rows, skipped)."""
    record = {"fingerprint": plan.fingerprint(), "files": [], "skipped": [], "liver": None}
    with staged_folder(folder) as staging:
        try:
            full = _read(plan.full, roots)
        except _SkipStudy as exc:
            reason = f"its full-count {plan.full.label} cannot be read"
            record["skipped"] = [[plan.full.label, f"cannot be read: {exc}"]] + [
                [pair.low.label, reason] for pair, _ in plan.pairs]
            return record
        save_nifti(full, staging / FULL_NAME)
        try:
            find_liver_voi(full)  # what training and evaluation will need without a mask
        except FedNdifError as exc:
            record["liver"] = str(exc)
        for pair, name in plan.pairs:
            try:
                low = _read(pair.low, roots)
            except _SkipStudy as exc:
                record["skipped"].append([pair.low.label, f"cannot be read: {exc}"])
                continue
            if low.array.shape != full.array.shape or not np.allclose(
                    low.affine, full.affine, atol=1e-3):
                record["skipped"].append([pair.low.label, "its voxel grid differs from the "
                                                          "full-count series'"])
                continue
            save_nifti(low, staging / name)
            record["files"].append([name, pair.level, pair.how])
        (staging / STUDY_RECORD).write_text(json.dumps(record))
    return record


def _study_record(plan: StudyPlan, folder: Path, roots: list[Path]) -> dict:
    """The study's record: from an earlier, interrupted run when its inputs are unchanged."""
    saved = folder / STUDY_RECORD
    if saved.is_file():
        try:
            record = json.loads(saved.read_text())
        except ValueError:
            record = {}
        if record.get("fingerprint") == plan.fingerprint():
            return record
    if folder.exists():
        remove_path(folder)
    return _write_study(plan, folder, roots)


def _tidy(stage: Path, wanted: set[Path]) -> None:
    """Leave only the studies of this run, without their records, and no empty folders."""
    for path in sorted(stage.glob("*/*")):
        if path not in wanted:
            remove_path(path)  # left by an earlier run over a different export
    for folder in wanted:
        (folder / STUDY_RECORD).unlink(missing_ok=True)
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()  # its full-count series could not be read
    for path in sorted(stage.iterdir()):
        if path.is_file() or not any(path.iterdir()):
            remove_path(path)


def _write_keep_key(path: Path, plans: list[StudyPlan], names: dict[str, Pseudonym]) -> None:
    rows = sorted({(n.subject, n.study, uid) for uid, n in names.items()}
                  | {(p.name.subject, p.name.study, p.study_uid) for p in plans})
    with staged_file(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "study", "study_instance_uid"])
        writer.writerows(rows)


def prepare_site(export: str | Path, site_dir: str | Path, *, pairs_file: str | Path | None = None,
                 val: int = 1, test: int = 1, seed: int = 0, keep_key: str | Path | None = None,
                 salt: str | Path | None = None, overwrite: bool = False,
                 progress: bool = True) -> PrepareResult:
    """``fed-ndif prepare-site``: pair the export's PET series and write the site folder.

    ``salt``: the site's secret salt file (made on the first run, reused after), by default
    beside ``keep_key``; one of the two is needed."""
    with quiet_dicom_warnings():
        result = _prepare(Path(export), Path(site_dir), pairs_file=pairs_file, val=val,
                          test=test, seed=seed, keep_key=keep_key, overwrite=overwrite,
                          progress=progress, salt=salt)
    for line in result.summary_lines():
        log.info("%s", line)
    return result


def _prepare(export: Path, site_dir: Path, *, pairs_file: str | Path | None, val: int,
             test: int, seed: int, keep_key: str | Path | None, overwrite: bool,
             progress: bool, salt: str | Path | None) -> PrepareResult:
    keep_key = Path(keep_key) if keep_key is not None else None
    salt_file = salt_path(keep_key, Path(salt) if salt is not None else None)
    _check_places(export, site_dir, keep_key, overwrite, salt_file)
    secret = read_salt(salt_file)
    user = read_pairs_file(Path(pairs_file)) if pairs_file is not None else {}
    scan = scan_export(export, progress=progress)
    known = {s.uid: s for series in scan.studies.values() for s in series}
    if user:
        check_pairs_file(user, known, Path(pairs_file))
    fresh = secret is None
    secret = new_salt() if secret is None else secret
    names = pseudonyms({uid: series[0].patient_key for uid, series in scan.studies.items()},
                       secret)
    plans, notes = _plan(scan.studies, names, user)
    roots = [export, export.resolve()]
    unreadable = [scrub(reason, [path], roots) for path, reason in scan.unreadable]
    if not plans:
        for line in [f"  {n.line()}" for n in notes]:
            log.info("%s", line)
        raise FedNdifError(f"{export}: no low-count/full-count pair found among "
                           f"{len(known)} PET series ({len(notes)} skipped, reasons above)")
    split = _splits(sorted({p.name.subject for p in plans}), val=val, test=test, seed=seed)
    if fresh:  # kept before any study is written: an interrupted run resumes with it
        write_salt(salt_file, secret)
    partial = partial_folder(site_dir)
    if partial.exists():
        log.info("continuing an interrupted preparation (%s)", partial.name)
    rows: list[dict[str, str]] = []
    no_liver: dict[str, str] = {}
    with resumable_folder(site_dir) as stage:
        bar = tqdm(plans, desc="preparing studies", unit="study",
                   disable=None if progress else True)  # a bar only on a terminal
        for plan in bar:
            folder = stage / plan.name.subject / plan.name.study
            record = _study_record(plan, folder, roots)
            notes += [SkipNote(plan.name.folder, label, reason)
                      for label, reason in record["skipped"]]
            if record.get("liver") and record["files"]:
                no_liver[plan.name.folder] = record["liver"]
            for name, level, _how in record["files"]:
                rows.append({"subject": plan.name.subject, "count_level": f"{level:g}",
                             "low_count": f"{plan.name.folder}/{name}",
                             "full_count": f"{plan.name.folder}/{FULL_NAME}",
                             "liver_mask": "", "lesion_mask": "",
                             "split": split[plan.name.subject]})
        if not rows:
            raise FedNdifError(f"{export}: no pair could be read ({len(notes)} series skipped: "
                               "see the reasons above)")
        _tidy(stage, {stage / p.name.subject / p.name.study for p in plans})
        write_manifest(stage / MANIFEST_NAME, rows)
        result = PrepareResult(
            site_dir, rows, dict(Counter(float(r["count_level"]) for r in rows)), notes,
            unreadable, _split_counts(split, rows), no_liver)
        (stage / SUMMARY_NAME).write_text(json.dumps({
            "pairs_per_count_level": {f"{k:g}": v for k, v in sorted(
                result.pairs_per_level.items())},
            "subjects_per_split": result.splits,
            "skipped": [{"study": n.where, "series": n.series, "reason": n.reason}
                        for n in notes],
            "unreadable_files": unreadable,
            "automatic_liver_voi_failed": [{"study": k, "reason": v}
                                           for k, v in no_liver.items()],
            "options": {"val": val, "test": test, "seed": seed,
                        "pairs_file": pairs_file is not None},
        }, indent=1, sort_keys=True) + "\n")
        if keep_key is not None:
            _write_keep_key(keep_key, plans, names)
    return result

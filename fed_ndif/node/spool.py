"""The node's spool: the queue of a DICOM node kept on disk, so that a crash loses nothing.

Each series moves through folders by atomic renames, and its place says what is left to do::

    incoming/<key>/   instances as received (one file each), plus series.json; still settling
    work/<key>/       a settled PET series taken for denoising (redone after a crash)
    outbox/<key>/     the derived series, written complete (staged), waiting for delivery
    failed/<key>/     a series the reader refused, with reason.txt

``<key>`` is a short hash of the SeriesInstanceUID: folder names and log lines never carry
patient data. An instance is staged and renamed into ``incoming/`` (after an fsync) before the
sender hears success, so an acknowledged instance survives ``kill -9``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fed_ndif.staging import remove_path, staged_file

log = logging.getLogger(__name__)

INCOMING, WORK, OUTBOX, FAILED = "incoming", "work", "outbox", "failed"
META = "series.json"
REASON = "reason.txt"
# A DICOM UID: digits and dots, at most 64 characters. Anything else is refused, which also
# keeps a hostile SOPInstanceUID ("../x") from naming a path outside the spool.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(value: object) -> bool:
    text = str(value or "")
    return len(text) <= 64 and bool(_UID.match(text))


def uid_key(uid: str) -> str:
    """A series' (or study's) folder and log name: 16 hex digits of its UID's hash."""
    return hashlib.sha256(uid.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SeriesMeta:
    """What the node needs to know about a spooled series (no patient data)."""

    key: str
    study: str  # uid_key of the StudyInstanceUID
    sop_class: str
    modality: str
    number: str  # SeriesNumber, "?" when absent
    derived: str = ""  # why it is not an acquisition (never denoised), or ""

    @property
    def name(self) -> str:
        """How logs name the series: its number and hash, never a patient attribute."""
        return f"series {self.number} [{self.key[:8]}]"


class Spool:
    """The spool folder. Thread-safe: the receiver and the worker share one instance."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self.last_arrival: dict[str, float] = {}  # series key -> monotonic time
        self.study_arrival: dict[str, float] = {}  # study key -> monotonic time

    def folder(self, state: str, key: str | None = None) -> Path:
        base = self.root / state
        return base / key if key else base

    def prepare(self) -> None:
        """Make the layout and clean what a crash left half-written (staging files never
        acknowledged, staged outputs never renamed). Pending series settle afresh."""
        for state in (INCOMING, WORK, OUTBOX, FAILED):
            self.folder(state).mkdir(parents=True, exist_ok=True)
        for stale in [*self.folder(INCOMING).glob("*/.tmp-*"), *self.folder(INCOMING).glob(".*"),
                      *self.folder(OUTBOX).glob(".*"), *self.folder(FAILED).glob(".*")]:
            remove_path(stale)
        now = time.monotonic()
        for key in self.keys(INCOMING):
            meta = self.meta(INCOMING, key)
            if meta is None:  # no series.json: nothing was ever acknowledged there
                remove_path(self.folder(INCOMING, key))
                continue
            self.last_arrival[key] = now
            self.study_arrival[meta.study] = now
        for key in self.keys(WORK):
            if self.folder(OUTBOX, key).exists():  # denoised before the crash
                remove_path(self.folder(WORK, key))

    def keys(self, state: str) -> list[str]:
        base = self.folder(state)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def meta(self, state: str, key: str) -> SeriesMeta | None:
        try:
            data = json.loads((self.folder(state, key) / META).read_text())
            return SeriesMeta(**data)
        except (OSError, ValueError, TypeError):
            return None

    # -- receiving ---------------------------------------------------------------------------

    def store(self, data: bytes, *, series_uid: str, sop_uid: str, study_uid: str,
              sop_class: str, modality: str, number: str, derived: str = "") -> SeriesMeta:
        """Write one received instance durably into ``incoming/``; raises OSError (disk full,
        permissions), and then nothing of it stays. Returns the series' metadata."""
        key = uid_key(series_uid)
        meta = SeriesMeta(key=key, study=uid_key(study_uid), sop_class=sop_class,
                          modality=modality, number=number, derived=derived)
        # One lock for writing and for taking a series to work: a series folder is never
        # renamed while an instance is being written into it.
        with self._lock:
            folder = self.folder(INCOMING, key)
            if not (folder / META).is_file():
                _write_durably(folder / META, json.dumps(meta.__dict__).encode())
            else:
                meta = self.meta(INCOMING, key) or meta
            _write_durably(folder / f"{sop_uid}.dcm", data)
            now = time.monotonic()
            self.last_arrival[key] = now
            self.study_arrival[meta.study] = now
        return meta

    # -- moving through the queue ------------------------------------------------------------

    def settled(self, settle_s: float) -> list[tuple[SeriesMeta, bool]]:
        """Incoming series with no instance for ``settle_s``: (meta, whole study settled too)."""
        now = time.monotonic()
        found = []
        for key in self.keys(INCOMING):
            # The time first: this runs at every idle poll, and reading the metadata of
            # series still arriving is wasted.
            if now - self.last_arrival.setdefault(key, now) < settle_s:
                continue
            meta = self.meta(INCOMING, key)
            if meta is not None:
                study_idle = now - self.study_arrival.setdefault(meta.study, now) >= settle_s
                found.append((meta, study_idle))
        return found

    def take(self, key: str) -> bool:
        """incoming -> work, unless an instance arrived meanwhile (False)."""
        with self._lock:
            source = self.folder(INCOMING, key)
            if not source.is_dir():
                return False
            target = self.folder(WORK, key)
            if target.exists():  # a crash left it: the newer arrivals join it
                for item in source.iterdir():
                    os.replace(item, target / item.name)
                remove_path(source)
            else:
                os.rename(source, target)
            self.last_arrival.pop(key, None)
        return True

    def requeue(self, key: str) -> None:
        """work -> incoming, joining instances that arrived meanwhile: the series settles again
        and is denoised whole."""
        with self._lock:
            source, target = self.folder(WORK, key), self.folder(INCOMING, key)
            target.mkdir(parents=True, exist_ok=True)
            for item in source.iterdir():
                os.replace(item, target / item.name)
            remove_path(source)
            self.last_arrival[key] = time.monotonic()

    def drop(self, key: str) -> None:
        """Forget an incoming series the node does not process (not PET)."""
        with self._lock:
            remove_path(self.folder(INCOMING, key))
            self.last_arrival.pop(key, None)

    def finish_work(self, key: str) -> None:
        """The derived series is in ``outbox/``: the source is no longer needed."""
        remove_path(self.folder(WORK, key))

    def fail(self, key: str, reason: str, state: str = WORK) -> Path:
        """work (or outbox) -> failed, with the reason beside the files."""
        target = self.folder(FAILED, key)
        if target.exists():  # the same series failed before: keep the latest
            remove_path(target)
        os.rename(self.folder(state, key), target)
        (target / REASON).write_text(reason + "\n")
        return target

    def instances(self, state: str, key: str) -> list[Path]:
        return sorted(self.folder(state, key).glob("*.dcm"))

    def remove_derived(self, key: str) -> None:
        """Delivered (or no longer wanted): the derived series leaves the spool."""
        remove_path(self.folder(OUTBOX, key))


def _write_durably(path: Path, data: bytes) -> None:
    """Staged write with fsync before the rename and of the folder after it: once this returns,
    the file survives a crash of the process (and of the machine); on any error nothing is
    left."""
    with staged_file(path, suffix=".part") as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


"""The node's spool: the queue of a DICOM node kept on disk, so that a crash loses nothing.

Each series moves through folders by atomic renames, and its place says what is left to do::

    incoming/<key>/   instances as received (one file each), plus series.json; still settling
    work/<key>/       a settled PET series taken for denoising (redone after a crash)
    outbox/<key>/     the derived series, written complete (staged), waiting for delivery
    failed/<key>/     a series the reader refused, with reason.txt

``<key>`` is a keyed hash (HMAC-SHA-256) of the SeriesInstanceUID under the spool's secret salt
(``SPOOL/salt``, made at the first start, readable by the node's user only), and instances are
named by the same keyed hash of their SOPInstanceUID: folder names, file names and log lines
never carry a UID or patient data, and whoever holds a list of UIDs cannot match them to the
log without the salt. An instance is staged and renamed into ``incoming/`` (after an fsync)
before the sender hears success, so an acknowledged instance survives ``kill -9``.

``failed/<key>/reason.txt`` says why a series was refused, in more detail than the log (which
instance file); it stays in the spool beside the images it explains, and says so.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
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


SALT = "salt"
REASON_NOTE = ("Why fed-ndif refused this series. This file stays in the spool beside the "
               "series' images (they identify the patient; this text names none of them, but "
               "its detail names their files): do not copy it out of the spool; delete the "
               "folder when dealt with.")


@dataclass(frozen=True)
class SeriesMeta:
    """What the node needs to know about a spooled series (no patient data)."""

    key: str
    study: str  # the keyed hash of the StudyInstanceUID
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
        self._salt: bytes | None = None
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
        self._load_salt()
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

    def _load_salt(self) -> bytes:
        """The spool's secret salt, made (owner-only) the first time."""
        if self._salt is None:
            path = self.root / SALT
            try:
                salt = bytes.fromhex(path.read_text().strip())
            except FileNotFoundError:
                salt = secrets.token_bytes(32)
                with staged_file(path, suffix=".salt") as tmp:
                    os.chmod(tmp, 0o600)
                    tmp.write_text(salt.hex() + "\n")
            except ValueError:
                salt = b""
            if len(salt) < 16:
                raise OSError(f"{path} is not a salt file (hex text of 32 bytes); remove it to "
                              "make a new one")
            self._salt = salt
        return self._salt

    def uid_key(self, uid: str) -> str:
        """A series' (or study's) folder and log name: 16 hex digits of its UID's keyed hash."""
        return hmac.new(self._load_salt(), uid.encode(), hashlib.sha256).hexdigest()[:16]

    def instance_name(self, sop_uid: str) -> str:
        """An instance's file name: its SOPInstanceUID's keyed hash (the same instance sent
        twice is one file)."""
        digest = hmac.new(self._load_salt(), b"instance " + sop_uid.encode(), hashlib.sha256)
        return f"{digest.hexdigest()[:32]}.dcm"

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
        key = self.uid_key(series_uid)
        meta = SeriesMeta(key=key, study=self.uid_key(study_uid), sop_class=sop_class,
                          modality=modality, number=number, derived=derived)
        # One lock for writing and for taking a series to work: a series folder is never
        # renamed while an instance is being written into it.
        with self._lock:
            folder = self.folder(INCOMING, key)
            if not (folder / META).is_file():
                _write_durably(folder / META, json.dumps(meta.__dict__).encode())
            else:
                meta = self.meta(INCOMING, key) or meta
            _write_durably(folder / self.instance_name(sop_uid), data)
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

    def fail(self, key: str, reason: str, state: str = WORK, detail: str = "") -> Path:
        """work (or outbox) -> failed, with the reason (and its detail, which may name the
        series' files) beside the files, in reason.txt."""
        target = self.folder(FAILED, key)
        if target.exists():  # the same series failed before: keep the latest
            remove_path(target)
        os.rename(self.folder(state, key), target)
        text = f"{REASON_NOTE}\n\nreason: {reason}\n"
        if detail and detail != reason:
            text += f"detail: {detail}\n"
        (target / REASON).write_text(text)
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


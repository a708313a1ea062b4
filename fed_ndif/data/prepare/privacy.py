"""Keeping patient identity out of a prepared site: pseudonyms, and messages without names.

Subjects are numbered in the order of a keyed hash (HMAC-SHA-256) of their PatientID under the
site's secret salt, studies within a subject likewise: the numbers repeat from run to run with
the same salt but follow no order of the hospital's, and whoever holds the cohort's MRN list but
not the salt cannot rebuild which pseudonym is whose. The salt is a file kept with the
pseudonym key (``--keep-key``), never in the site folder. Reader
messages name files and sometimes UIDs; an export's file and folder names can name the
patient, so both are replaced before a message is logged or written into the site.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fed_ndif.errors import FedNdifError
from fed_ndif.staging import staged_file

log = logging.getLogger(__name__)

UID_PATTERN = re.compile(r"(?<![\w.])\d+(?:\.\d+){3,}(?![\w.])")
# Date text: DA (20240115), ISO (2024-01-15) or dotted (2024.01.15), years 1900-2099.
DATE_PATTERN = re.compile(r"(?<![\w.])(?:19|20)\d\d([-./]?)[01]\d\1[0-3]\d(?!\d)")


SALT_BYTES = 32


def _order(value: str, salt: bytes) -> str:
    return hmac.new(salt, value.encode(), hashlib.sha256).hexdigest()


def read_salt(path: Path) -> bytes | None:
    """The site's salt from ``path`` (hex text), None when the file does not exist yet."""
    if not path.exists():
        return None
    try:
        salt = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        salt = b""
    if len(salt) < 16:
        raise FedNdifError(f"--salt {path}: not a fed-ndif salt file (hex text of at least 16 "
                           "bytes); give the site's salt file, or a new path for a new one")
    return salt


def new_salt() -> bytes:
    return secrets.token_bytes(SALT_BYTES)


def write_salt(path: Path, salt: bytes) -> None:
    """Keep a new salt (readable by its owner only); the same salt gives the same pseudonyms."""
    with staged_file(path, suffix=".salt") as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_text(salt.hex() + "\n")
    log.info("kept the site's new secret salt beside the key (keep it with the key, never in "
             "the site folder)")


@dataclass(frozen=True)
class Pseudonym:
    subject: str  # sub-001
    study: str  # study-1

    @property
    def folder(self) -> str:
        return f"{self.subject}/{self.study}"


def pseudonyms(studies: dict[str, str], salt: bytes) -> dict[str, Pseudonym]:
    """StudyInstanceUID -> pseudonym, given StudyInstanceUID -> patient key and the salt."""
    patients = sorted(set(studies.values()), key=lambda p: _order(p, salt))
    width = max(3, len(str(len(patients))))
    subject = {p: f"sub-{i:0{width}d}" for i, p in enumerate(patients, start=1)}
    names: dict[str, Pseudonym] = {}
    for patient in patients:
        own = sorted((s for s, p in studies.items() if p == patient),
                     key=lambda s: _order(s, salt))
        for j, study in enumerate(own, start=1):
            names[study] = Pseudonym(subject[patient], f"study-{j}")
    return names


def scrub(message: str, paths: Iterable[Path] = (), roots: Iterable[Path] = (), *,
          root_name: str = "<export>") -> str:
    """``message`` with the given file paths, the roots (export or spool folders), any UID
    and any date replaced."""
    for path in sorted({str(p) for p in paths}, key=len, reverse=True):
        message = message.replace(path, "<file>")
    for root in sorted({str(r) for r in roots}, key=len, reverse=True):
        message = message.replace(root, root_name)
    return DATE_PATTERN.sub("<date>", UID_PATTERN.sub("<uid>", message))


@contextlib.contextmanager
def quiet_dicom_warnings() -> Iterator[None]:
    """Hold back pydicom's warnings (its validation messages can quote header values, such as
    a name or an ID) and say only how many there were."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.setLevel(level)
    if caught:
        log.info("%d warning(s) of the DICOM reader held back (they can quote header values)",
                 len(caught))

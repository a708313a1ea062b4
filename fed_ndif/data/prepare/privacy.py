"""Keeping patient identity out of a prepared site: pseudonyms, and messages without names.

Subjects are numbered in the order of a hash of their PatientID (so the numbers repeat from
run to run but follow no order of the hospital's), studies within a subject likewise. Reader
messages name files and sometimes UIDs; an export's file and folder names can name the
patient, so both are replaced before a message is logged or written into the site.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

UID_PATTERN = re.compile(r"(?<![\w.])\d+(?:\.\d+){3,}(?![\w.])")


def _order(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True)
class Pseudonym:
    subject: str  # sub-001
    study: str  # study-1

    @property
    def folder(self) -> str:
        return f"{self.subject}/{self.study}"


def pseudonyms(studies: dict[str, str]) -> dict[str, Pseudonym]:
    """StudyInstanceUID -> pseudonym, given StudyInstanceUID -> patient key."""
    patients = sorted(set(studies.values()), key=_order)
    width = max(3, len(str(len(patients))))
    subject = {p: f"sub-{i:0{width}d}" for i, p in enumerate(patients, start=1)}
    names: dict[str, Pseudonym] = {}
    for patient in patients:
        own = sorted((s for s, p in studies.items() if p == patient), key=_order)
        for j, study in enumerate(own, start=1):
            names[study] = Pseudonym(subject[patient], f"study-{j}")
    return names


def scrub(message: str, paths: Iterable[Path] = (), roots: Iterable[Path] = ()) -> str:
    """``message`` with the given file paths, export roots and any UID replaced."""
    for path in sorted({str(p) for p in paths}, key=len, reverse=True):
        message = message.replace(path, "<file>")
    for root in roots:
        message = message.replace(str(root), "<export>")
    return UID_PATTERN.sub("<uid>", message)


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

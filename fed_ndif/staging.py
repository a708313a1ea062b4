"""Staging of outputs, the one home for "write aside, then rename": a reader (or a crash) never
sees half of a file or folder, and a failed write leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_path(new: Path, target: Path) -> None:
    """Move ``new`` (file or folder) to ``target``; an existing target is removed only once
    ``new`` is in place, and restored if the move fails."""
    if not target.exists() and not target.is_symlink():
        os.rename(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    remove_path(old)


def _first_missing(folder: Path) -> Path | None:
    """The outermost ancestor of ``folder`` (itself included) that does not exist yet."""
    missing = None
    while not folder.exists() and folder != folder.parent:
        missing, folder = folder, folder.parent
    return missing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_made(folder: Path | None) -> None:
    if folder is not None:
        remove_path(folder)


@contextlib.contextmanager
def staged_file(path: Path, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error
    (or interrupt) it is deleted, and so are the parent folders that were made for it.
    ``suffix`` keeps the extension writers look at."""
    path = Path(path)
    made = _first_missing(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix or "".join(path.suffixes[-2:]),
                                   dir=path.parent)
        os.close(fd)
        # mkstemp makes a private file; the output gets the modes any new file would get.
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        _remove_made(made)
        raise
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove_made(made)
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yield an empty hidden sibling folder of ``target``; on success it replaces ``target``.

    On any error (or interrupt) the staging folder is deleted, and so are the parent folders
    that were made for it. Creating it raises ``OSError`` when the place is not writable.
    """
    target = Path(target)
    made = _first_missing(target.parent)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(staging, 0o777 & ~_umask())
    except BaseException:
        _remove_made(made)
        raise
    try:
        yield staging
        replace_path(staging, target)
    except BaseException:
        remove_path(staging)
        _remove_made(made)
        raise


def partial_folder(target: Path) -> Path:
    """Where :func:`resumable_folder` keeps ``target``'s work in progress."""
    target = Path(target)
    return target.parent / f".{target.name}.partial"


@contextlib.contextmanager
def resumable_folder(target: Path) -> Iterator[Path]:
    """Yield a fixed hidden sibling of ``target`` (kept from an interrupted run, else new); on
    success it replaces ``target``. On an error or interrupt it stays, so that a long job run
    again continues where it stopped; what it holds must be complete piece by piece (write each
    piece with :func:`staged_folder` or :func:`staged_file`).
    """
    target = Path(target)
    partial = partial_folder(target)
    partial.mkdir(parents=True, exist_ok=True)
    yield partial
    replace_path(partial, target)

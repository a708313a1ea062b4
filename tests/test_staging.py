"""Staging: an output appears whole or not at all, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from fed_ndif.staging import staged_file, staged_folder


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_staged_folder_replaces_the_target_only_when_complete(tmp_path):
    target = tmp_path / "series"
    target.mkdir()
    (target / "old.dcm").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(target) as staging:
        (staging / "new.dcm").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["old.dcm"]
    assert [p.name for p in tmp_path.iterdir()] == ["series"]  # no staging folder left
    with staged_folder(target) as staging:
        (staging / "new.dcm").write_text("whole")
    assert sorted(p.name for p in target.iterdir()) == ["new.dcm"]
    assert [p.name for p in tmp_path.iterdir()] == ["series"]


def test_a_failed_write_removes_the_parent_folders_it_made(tmp_path):
    deep = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), staged_folder(deep):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), staged_file(deep / "x.nii.gz") as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_the_permissions_of_any_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        with staged_folder(tmp_path / "folder") as staging:
            (staging / "f").write_text("x")
        with staged_file(tmp_path / "file.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "folder") == 0o755
    assert _mode(tmp_path / "file.txt") == 0o644

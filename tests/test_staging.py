"""Staging: an output appears whole or not at all, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from fed_ndif.staging import partial_folder, resumable_folder, staged_file, staged_folder


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


def test_resumable_folder_keeps_work_after_a_failure_and_renames_when_done(tmp_path):
    target = tmp_path / "site"
    with pytest.raises(KeyboardInterrupt), resumable_folder(target) as work:
        (work / "done-1").write_text("1")
        raise KeyboardInterrupt
    assert not target.exists() and (partial_folder(target) / "done-1").is_file()
    with resumable_folder(target) as work:
        assert (work / "done-1").read_text() == "1"  # picked up again
        (work / "done-2").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["done-1", "done-2"]
    assert not partial_folder(target).exists()
    with resumable_folder(target) as work:  # replaces an existing target once complete
        (work / "new").write_text("n")
    assert [p.name for p in target.iterdir()] == ["new"]

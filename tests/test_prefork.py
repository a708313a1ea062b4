"""The warm ClientApp pool (fed_ndif.runtime.prefork): tasks forked with the shim's streams,
environment and exit status; signals relayed; a missing pool falls back to the real command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fed_ndif.runtime.prefork import write_shim

TARGET = "tests.helpers.prefork_target:main"
ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and \
        "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]


def _wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def pool(tmp_path):
    socket_path = tmp_path / "pool.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "fed_ndif.runtime.prefork", "serve", str(socket_path),
         "--target", TARGET, "--preload", "--parent-pid", str(os.getpid())], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        _wait_for(socket_path.exists)
        yield process, socket_path
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def fake_real(tmp_path) -> Path:
    real = tmp_path / "real-flwr-clientapp"
    real.write_text("#!/bin/sh\necho \"real command $*\"\nexit 5\n")
    real.chmod(0o755)
    return real


def _shim(tmp_path: Path, socket_path: Path, real: Path) -> Path:
    return write_shim(tmp_path / "bin", socket_path, str(real))


def test_a_task_runs_forked_from_the_pool_with_the_shims_streams_env_and_status(
        pool, tmp_path, fake_real):
    process, socket_path = pool
    shim = _shim(tmp_path, socket_path, fake_real)
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "task.json"
    result = subprocess.run([str(shim), str(out), "3"], cwd=work, capture_output=True,
                            text=True, env={**os.environ, "PREFORK_MARKER": "m-42"}, timeout=60)
    assert result.returncode == 3
    assert "task says hello 3" in result.stdout  # the shim's stdout became the task's
    seen = json.loads(out.read_text())
    assert seen["ppid"] == process.pid  # forked by the pool, not started by the shim
    assert seen["marker"] == "m-42" and Path(seen["cwd"]) == work
    assert seen["argv0"] == "main"
    # a second task gets a fresh child
    assert subprocess.run([str(shim), str(out), "0"], capture_output=True,
                          timeout=60).returncode == 0
    assert json.loads(out.read_text())["pid"] != seen["pid"]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_task_dies_with_its_shim(pool, tmp_path, fake_real, stop):
    """Stopped, the shim relays the signal; killed with its SuperNode's process group, it
    cannot relay, and the task ends too."""
    _, socket_path = pool
    shim = _shim(tmp_path, socket_path, fake_real)
    out = tmp_path / "task.json"
    task = subprocess.Popen([str(shim), str(out), "0", "sleep"], stdout=subprocess.DEVNULL)
    _wait_for(out.exists)
    child = json.loads(out.read_text())["pid"]
    assert _alive(child)
    task.send_signal(stop)
    assert task.wait(timeout=20) != 0
    _wait_for(lambda: not _alive(child))


def test_without_a_pool_the_shim_runs_the_real_command(tmp_path, fake_real):
    shim = _shim(tmp_path, tmp_path / "absent.sock", fake_real)
    result = subprocess.run([str(shim), "--token", "abc"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 5 and "real command --token abc" in result.stdout


def test_the_pool_exits_when_its_parent_does(tmp_path):
    socket_path = tmp_path / "pool.sock"
    launcher = (
        "import subprocess, sys, os; "
        f"p = subprocess.Popen([sys.executable, '-m', 'fed_ndif.runtime.prefork', 'serve', "
        f"{str(socket_path)!r}, '--target', {TARGET!r}, '--preload', '--parent-pid', "
        "str(os.getpid())]); print(p.pid, flush=True)")
    parent = subprocess.Popen([sys.executable, "-c", launcher + "; import time; time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    pool_pid = int(parent.stdout.readline())
    try:
        _wait_for(socket_path.exists)
        parent.kill()
        parent.wait()
        _wait_for(lambda: not _alive(pool_pid))
        assert not socket_path.exists()
    finally:
        if _alive(pool_pid):
            os.kill(pool_pid, signal.SIGKILL)


def test_preloaded_pool_leaves_no_heavy_import_to_a_task():
    """A forked task must not import torch._dynamo (1.5-3 s) when it builds its optimizer."""
    script = (
        "import importlib, json, sys\n"
        "from fed_ndif.runtime.prefork import PRELOAD\n"
        "for name in PRELOAD: importlib.import_module(name)\n"
        "from tests.helpers.models import tiny_cfg\n"
        "from fed_ndif.checkpoints import build_state\n"
        "before = set(sys.modules)\n"
        "build_state(tiny_cfg(), device='cpu')\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert not [name for name in imported if name.startswith("torch._dynamo")], imported
    assert len(imported) < 20, imported

"""Launching, stopping and finding the processes fed-ndif starts: the one home for that.

Every process started here gets its own session (process group) and is stopped by its id;
processes its children leave behind are found by an environment tag and stopped too. A process
never outlives the one that started it: direct children get a parent-death signal (Linux
``PR_SET_PDEATHSIG``), and a watchdog kills the whole tagged tree when its parent dies, even by
``kill -9`` (grandchildren such as Flower's SuperExec and ServerApp get no such signal).

    python -m fed_ndif.runtime.processes watchdog TAG   # stdin: a pipe held by the parent
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import tomli_w

import fed_ndif
from fed_ndif.errors import FedNdifError

log = logging.getLogger(__name__)

PROCESS_TAG = "FED_NDIF_PROCESS_TAG"
SUPERLINK_START_TIMEOUT_S = 60.0
CONNECTION = "fed-ndif"
# Flower's SuperExec (which starts a ClientApp/ServerApp process per task) polls for tasks every
# second by default; 0.2 s costs nothing measurable and cuts the wait.
SUPEREXEC_POLL_S = 0.2


def project_root() -> Path:
    """The Flower app folder (pyproject.toml with [tool.flwr.app]) this package came from."""
    root = Path(fed_ndif.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise FedNdifError("running the federation needs the source tree (pyproject.toml beside "
                           "fed_ndif/); install fed-ndif with `pip install -e .`")
    return root


def flower_command(name: str) -> str:
    """A Flower executable: the one installed beside this Python (the venv), else on PATH.

    Looking beside ``sys.executable`` first means commands work without an activated venv.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FedNdifError(f"{name} is not installed beside {sys.executable} nor on PATH "
                           "(install flwr 1.42)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_port_free(host: str, port: int, *, what: str) -> None:
    """Fail in one line when ``host:port`` is taken, before anything claims to listen on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise FedNdifError(f"port {port} on {host} is taken by another process ({what}; "
                                   "find it with `ss -ltnp`)") from None
            raise FedNdifError(f"cannot listen on {host}:{port} ({what}): "
                               f"{exc.strerror}") from None


def wait_for_port(port: int, process: subprocess.Popen, log_file: Path, *,
                  host: str = "127.0.0.1", what: str = "the local SuperLink",
                  timeout_s: float = SUPERLINK_START_TIMEOUT_S) -> None:
    """Block until ``process`` listens on ``port``; fail early if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FedNdifError(f"{what} exited with code {process.returncode}; see {log_file}")
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise FedNdifError(f"{what} did not start within {timeout_s:.0f} s; see {log_file}")


PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, *, parent: int | None = None
                    ) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child get ``sig`` when its parent (this process, or
    ``parent``) dies (Linux).

    Chosen over polling the parent: the kernel delivers it at once, even after ``kill -9``.
    It only reaches direct children; :func:`start_watchdog` covers their descendants.
    """
    parent = os.getpid() if parent is None else parent
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork
    except (OSError, AttributeError):  # not Linux: the watchdog alone stops the tree
        return lambda: None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def _pool_worker_start(parent: int, level: int) -> None:
    die_with_parent(parent=parent)()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def run_parallel(function: Callable[..., Any], calls: list[tuple], *, workers: int) -> list:
    """``function(*call)`` for every call, in up to ``workers`` fresh (spawned) processes
    that die with this one; in this process when ``workers`` is 1. Results in call order; the
    first call that raises stops the rest. ``function`` must be importable (module level)."""
    if workers <= 1 or len(calls) <= 1:
        return [function(*call) for call in calls]
    with ProcessPoolExecutor(max_workers=min(workers, len(calls)),
                             mp_context=multiprocessing.get_context("spawn"),
                             initializer=_pool_worker_start,
                             initargs=(os.getpid(), logging.getLogger().level)) as pool:
        futures = [pool.submit(function, *call) for call in calls]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def start_watchdog(tag: str) -> subprocess.Popen:
    """A process that SIGKILLs every process tagged ``tag`` once this process is gone.

    It waits for end-of-file on a pipe whose writing end only this process holds (the kernel
    closes it however this process ends), so it reacts at once and polls nothing.
    """
    return subprocess.Popen([sys.executable, "-m", "fed_ndif.runtime.processes", "watchdog",
                             tag], stdin=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, PROCESS_TAG: f"{tag}-watchdog"})


def _watchdog(tag: str) -> None:
    parent = os.getppid()  # spared when it closes the pipe itself, alive
    while sys.stdin.buffer.read(4096):
        pass
    kill_tagged(tag, exclude=(parent,))


def stop_process(process: subprocess.Popen, *, sig: int = signal.SIGTERM,
                 timeout_s: float = 15.0) -> None:
    """Stop a process group we started, by its id: ``sig`` (SIGTERM), then SIGKILL."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def tagged(tag: str, *, exclude: Collection[int] = ()) -> list[int]:
    """Live processes whose environment carries ``PROCESS_TAG=tag`` (Linux /proc), this one
    and ``exclude`` left out."""
    needle = f"{PROCESS_TAG}={tag}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return [pid for pid in found if pid != os.getpid() and pid not in exclude]


def kill_tagged(tag: str, *, timeout_s: float = 15.0, exclude: Collection[int] = ()) -> None:
    """SIGKILL the tagged processes and wait until they are gone."""
    deadline = time.monotonic() + timeout_s
    while (pids := tagged(tag, exclude=exclude)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    if pids:
        log.warning("processes %s did not stop", pids)


def new_tag() -> str:
    """A tag unique to this process and moment, for :data:`PROCESS_TAG`."""
    return f"{os.getpid()}-{time.monotonic_ns()}"


def flower_env(flwr_home: Path | None, **extra: str) -> dict[str, str]:
    """Environment for Flower's commands: no telemetry, fast SuperExec polling, FLWR_HOME, and
    this Python's folder first on PATH (Flower starts its own helpers by name)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get(
               "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_POLL_S)), **extra}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def write_connection(flwr_home: Path, address: str, *, root_certificates: Path | None,
                     name: str = CONNECTION, options: dict[str, Any] | None = None) -> None:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection (the default)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    connection: dict[str, Any] = {"address": address}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_certificates)
    connection.update(options or {})
    (flwr_home / "config.toml").write_text(tomli_w.dumps(
        {"superlink": {"default": name, name: connection}}))


class Throttle:
    """Whether a repeated condition may be logged again: at most once per ``interval_s`` each,
    so a state that lasts hours costs a line a minute, not a line a second."""

    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.interval_s, self.clock = interval_s, clock
        self.last: dict[object, float] = {}

    def __call__(self, key: object) -> bool:
        now = self.clock()
        if key in self.last and now - self.last[key] < self.interval_s:
            return False
        self.last[key] = now
        return True


def stream_process(command: list[str], env: dict[str, str], log_file: Path, *,
                   echo: bool = True, on_line: Callable[[bytes], None] | None = None,
                   repeats: Callable[[bytes], object] | None = None) -> int:
    """Run ``command`` in its own session, copying its output to ``log_file`` (and stderr with
    ``echo``); ``on_line`` sees every line as it comes (to follow progress). Lines for which
    ``repeats`` gives a key (not None) are copied at most once a minute per key."""
    throttle = Throttle()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=die_with_parent())
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if on_line is not None:
                    on_line(line)
                key = None if repeats is None else repeats(line)
                if key is not None and not throttle(key):
                    continue
                out.write(line)
                out.flush()
                if echo:
                    sys.stderr.buffer.write(line)
                    sys.stderr.flush()
            process.wait()
        finally:
            stop_process(process)
    return process.returncode


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so that ``finally`` blocks stop our children."""
    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "watchdog":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the parent
        _watchdog(sys.argv[2])
    else:
        sys.exit("usage: python -m fed_ndif.runtime.processes watchdog TAG")

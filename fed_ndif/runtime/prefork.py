"""A warm ClientApp launcher for a site: import torch and MONAI once, fork per Flower task.

Flower 1.42's SuperExec starts a fresh ``flwr-clientapp`` process for every message, and each
one spends seconds of CPU importing torch, MONAI and fed_ndif before it trains for a round.
Flower has no option for this, so it is written here. The SuperNode's helpers find
``flwr-clientapp`` by name on PATH; a site puts a small *shim* of that name first on PATH. The
shim (standard library only, starts in milliseconds) hands its arguments, environment, working
folder and standard streams over a private Unix socket to the *pool*, a process that imported
everything once and forks one child per task. The child runs Flower's own ``flwr-clientapp``
entry point with them; its pid and then its exit status come back to the shim, which relays
signals to it and exits with its status. If the pool is not there, the shim runs the real
``flwr-clientapp``: slower, never broken.

    python -m fed_ndif.runtime.prefork serve SOCKET [--target MODULE:FUNCTION] [--parent-pid PID]
        [--preload MODULE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from pathlib import Path

log = logging.getLogger(__name__)

CLIENTAPP_TARGET = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"
# Imported once by the pool; every task's child inherits them already loaded. torch._dynamo
# is imported lazily by the first optimizer a process builds: 1.5-3 s of every task otherwise.
PRELOAD = ("fed_ndif.client.app", "torch._dynamo")
HEADER = 8  # bytes of a length or pid, big-endian

SHIM = '''#!{python} -I
"""flwr-clientapp shim written by fed_ndif.runtime.prefork: runs the task in the warm pool."""
import json, os, signal, socket, sys
SOCKET, REAL = {socket!r}, {real!r}


def run_real():
    os.execv(REAL, [REAL, *sys.argv[1:]])


def receive(conn, size):
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


try:
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(SOCKET)
    payload = json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ),
                          "cwd": os.getcwd()}}).encode()
    socket.send_fds(conn, [len(payload).to_bytes(8, "big")], [0, 1, 2])
    conn.sendall(payload)
    pid = receive(conn, 8)
except OSError:
    pid = None
if pid is None:
    run_real()
pid = int.from_bytes(pid, "big")


def forward(signum, _frame):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, forward)
status = receive(conn, 8)
sys.exit(int.from_bytes(status, "big", signed=True) if status else 1)
'''


def write_shim(folder: Path, socket_path: Path, real: str) -> Path:
    """``folder/flwr-clientapp``: the shim that sends tasks to the pool at ``socket_path``."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "flwr-clientapp"
    shim.write_text(SHIM.format(python=sys.executable, socket=str(socket_path), real=real))
    shim.chmod(stat.S_IRWXU)
    return shim


def _load(target: str):
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def _receive(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the shim closed the connection")
        data += chunk
    return data


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _die_with_shim(conn: socket.socket) -> None:
    """End this task when its shim is gone (its SuperNode stopped or was killed).

    The shim never writes after its request, so the read returns only when it has exited; a
    task forked by the pool is outside the SuperNode's process group and would else live on.
    """
    with contextlib.suppress(OSError):
        conn.recv(1)
    os.kill(os.getpid(), signal.SIGKILL)


def _run_task(conn: socket.socket, fds: list[int], size: int, target: str) -> int:
    """In the forked child: become the shim's task, run ``target``, return its exit status."""
    task = json.loads(_receive(conn, size))
    for std, fd in enumerate(fds):
        os.dup2(fd, std)
        os.close(fd)
    os.environ.clear()
    os.environ.update(task["env"])
    os.chdir(task["cwd"])
    sys.argv = [target.rpartition(":")[2].replace("_", "-"), *task["argv"]]
    conn.sendall(os.getpid().to_bytes(HEADER, "big"))
    threading.Thread(target=_die_with_shim, args=(conn,), daemon=True).start()
    try:
        _load(target)()
        return 0
    except SystemExit as stop:
        return _exit_status(stop.code)
    except BaseException:  # a task's crash is reported through its exit status
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve(socket_path: Path, *, target: str = CLIENTAPP_TARGET,
          parent_pid: int | None = None, preload: tuple[str, ...] = PRELOAD) -> None:
    """Accept tasks on ``socket_path`` until the parent process (the SuperNode) is gone."""
    started = time.perf_counter()
    for name in (*preload, target.partition(":")[0]):
        importlib.import_module(name)
    _load(target)
    log.info("ClientApp pool ready in %.1f s (pid %d, %s)", time.perf_counter() - started,
             os.getpid(), socket_path)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    server = socket.socket(socket.AF_UNIX)
    previous = os.umask(0o177)  # the socket is this user's only
    try:
        server.bind(str(socket_path))
    finally:
        os.umask(previous)
    server.listen(16)
    server.settimeout(1.0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    try:
        while parent_pid is None or os.getppid() == parent_pid:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            try:
                header, fds, _, _ = socket.recv_fds(conn, HEADER, 3)
            except OSError as exc:
                log.warning("a task could not be received: %s", exc)
                conn.close()
                continue
            if len(header) != HEADER or len(fds) != 3:
                log.warning("a malformed task request was ignored")
                for fd in fds:
                    os.close(fd)
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                server.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                status = 1
                try:
                    status = _run_task(conn, fds, int.from_bytes(header, "big"), target)
                finally:
                    with contextlib.suppress(OSError):
                        conn.sendall(status.to_bytes(HEADER, "big", signed=True))
                    os._exit(status)
            log.info("ClientApp task started in the warm pool (pid %d)", pid)
            for fd in fds:
                os.close(fd)
            conn.close()
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fed_ndif.runtime.prefork")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="run the pool on a Unix socket")
    run.add_argument("socket", type=Path)
    run.add_argument("--target", default=CLIENTAPP_TARGET)
    run.add_argument("--parent-pid", type=int, help="exit when this parent process is gone")
    run.add_argument("--preload", nargs="*", default=list(PRELOAD),
                     help=f"modules to import once (default: {' '.join(PRELOAD)})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # else a line per local API request
    serve(args.socket, target=args.target, parent_pid=args.parent_pid,
          preload=tuple(args.preload))


if __name__ == "__main__":
    main()

"""The one way fed-ndif starts a SuperLink, and runs the app on it with ``flwr run``.

The simulation (insecure, simulation mode, loopback) and the coordinator (TLS with SuperNode
authentication) differ only in options, so both go through :func:`superlink`.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fed_ndif.errors import FedNdifError
from fed_ndif.runtime.processes import (
    PROCESS_TAG,
    die_with_parent,
    flower_command,
    flower_env,
    free_port,
    kill_tagged,
    new_tag,
    project_root,
    start_watchdog,
    stop_process,
    stream_process,
    wait_for_port,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerCerts:
    """The SuperLink's TLS files, as scripts/make-certs writes them."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, folder: Path) -> ServerCerts:
        certs = cls(ca=folder / "ca.crt", cert=folder / "server.crt", key=folder / "server.key")
        for path in (certs.ca, certs.cert, certs.key):
            if not path.is_file():
                raise FedNdifError(f"missing certificate file {path}; make it with "
                                   "scripts/make-certs")
        return certs


def client_host(host: str) -> str:
    """Where local commands reach a SuperLink that listens on ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


@contextlib.contextmanager
def superlink(*, flwr_home: Path, log_file: Path, tls: ServerCerts | None = None,
              simulation: bool = False, host: str = "127.0.0.1", port: int | None = None,
              database: Path | None = None, tag: str | None = None,
              superexec_poll_s: float | None = None) -> Iterator[str]:
    """A SuperLink process, stopped with everything it spawned on exit; yields its address.

    ``tls``: serve TLS and require registered SuperNode keys (else plaintext). ``simulation``:
    run the ClientApps on Flower's simulation engine in a subprocess. ``port``: None picks a
    free loopback port. ``database``: a file for the SuperLink's state (None keeps it in
    memory). ``tag``: the :data:`PROCESS_TAG` every process it spawns inherits, so the ones that
    outlive it are found and stopped too (None: a new one). ``superexec_poll_s``: the task poll
    of the SuperLink's own SuperExec (None: :func:`flower_env`'s).
    """
    # Flower 1.42 serves the Control, Fleet and Runtime APIs on one HTTP port.
    # A given port was checked free by the caller before it wrote anything (coordinator).
    port = free_port() if port is None else port
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if tls is None:
        command = [flower_command("flower-superlink"), "--insecure"]
    else:
        command = [flower_command("flower-superlink"), "--ssl-ca-certfile", str(tls.ca),
                   "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key),
                   "--enable-supernode-auth"]
    if simulation:
        command += ["--simulation", "--isolation", "subprocess"]
    command += ["--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    if database is not None:
        command += ["--database", str(database)]
    tag = tag or new_tag()
    extra = {PROCESS_TAG: tag}
    if superexec_poll_s is not None:
        extra["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(superexec_poll_s)
    env = flower_env(flwr_home, **extra)
    watchdog = start_watchdog(tag)
    with log_file.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=die_with_parent())
    try:
        wait_for_port(port, process, log_file, host=client_host(host),
                      what="the local SuperLink" if simulation else "the SuperLink")
        if process.poll() is not None:  # the port answered, but not from our SuperLink
            raise FedNdifError(f"the SuperLink exited with code {process.returncode}; see "
                               f"{log_file}")
        if tls is not None:
            log.info("SuperLink (TLS, SuperNode authentication) listening on %s:%d; log %s",
                     host, port, log_file)
        yield f"{client_host(host)}:{port}"
    finally:
        stop_process(process)
        kill_tagged(tag)
        if watchdog.stdin is not None:
            watchdog.stdin.close()  # it finds nothing left to stop and exits
        watchdog.wait()


def flwr_run(connection: str, run_config: Path, env: dict[str, str], log_file: Path,
             *extra: str, echo: bool = True,
             on_line: Callable[[bytes], None] | None = None,
             repeats: Callable[[bytes], object] | None = None) -> None:
    """``flwr run`` this app on ``connection`` with a run-config file, output to ``log_file``
    (and to stderr with ``echo``); ``on_line`` sees every line as it comes; lines ``repeats``
    keys are copied at most once a minute (see :func:`stream_process`)."""
    code = stream_process([flower_command("flwr"), "run", str(project_root()), connection,
                           "--stream", "--run-config", str(run_config), *extra], env, log_file,
                          echo=echo, on_line=on_line, repeats=repeats)
    if code != 0:
        raise FedNdifError(f"the Flower run failed (exit {code}); see {log_file}")

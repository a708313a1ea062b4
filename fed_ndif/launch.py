"""Starting and stopping Flower's processes: the coordinator (SuperLink + ``flwr run``) and sites.

Shared by ``fed-ndif simulate`` (a SuperLink in simulation mode) and the real deployment:

- ``fed-ndif coordinator RUN_DIR``: a SuperLink with TLS and SuperNode authentication, the
  listed site keys registered, and the Fed-NDIF run launched with ``flwr run`` from hydra
  overrides of configs/federated.yaml. Everything of the run lives in RUN_DIR: ``config.yaml``,
  ``run_config.toml``, ``checkpoints/``, ``metrics.jsonl``, ``logs/``, ``.flwr/`` (FLWR_HOME)
  and, with ``--state-db``, ``state.db`` (the SuperLink's state; by default it is kept in
  memory: the file-backed SQLite state answered "database is locked" under load, which loses
  replies). ``--resume`` continues from the latest checkpoint; keys are registered at each start.
- ``fed-ndif site``: a site's SuperNode (TLS, its private key, its data folder as node config).

Every process started here gets its own session (process group) and is stopped by its id;
processes its children leave behind are found by an environment tag and stopped too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

import fed_ndif
from fed_ndif.errors import FedNdifError

log = logging.getLogger(__name__)

PROCESS_TAG = "FED_NDIF_PROCESS_TAG"
SUPERLINK_START_TIMEOUT_S = 60.0
DEFAULT_PORT = 9092
CONNECTION = "fed-ndif"
# Flower's SuperExec (which starts a ClientApp/ServerApp process per task) polls for tasks every
# second by default; 0.2 s costs nothing measurable and cuts the wait.
SUPEREXEC_POLL_S = 0.2
# The SuperNode asks the SuperLink for work every 3 s when idle (hard-coded in Flower 1.42);
# fed_ndif.launch's SuperNode wrapper can shorten it (see patch_supernode_polling).
SUPERNODE_POLL_S = 1.0


# --- processes ---------------------------------------------------------------------------------

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


def wait_for_port(port: int, process: subprocess.Popen, log_file: Path, *,
                  host: str = "127.0.0.1", what: str = "the local SuperLink",
                  timeout_s: float = SUPERLINK_START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FedNdifError(f"{what} exited with code {process.returncode}; see {log_file}")
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise FedNdifError(f"{what} did not start within {timeout_s:.0f} s; see {log_file}")


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


def tagged(tag: str) -> list[int]:
    """Live processes whose environment carries ``PROCESS_TAG=tag`` (Linux /proc)."""
    needle = f"{PROCESS_TAG}={tag}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return [pid for pid in found if pid != os.getpid()]


def kill_tagged(tag: str, *, timeout_s: float = 15.0) -> None:
    """SIGKILL the tagged processes and wait until they are gone."""
    deadline = time.monotonic() + timeout_s
    while (pids := tagged(tag)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    if pids:
        log.warning("processes %s did not stop", pids)


def new_tag() -> str:
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


def stream_process(command: list[str], env: dict[str, str], log_file: Path, *,
                   echo: bool = True) -> int:
    """Run ``command`` in its own session, copying its output to ``log_file`` (and stderr)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            assert process.stdout is not None
            for line in process.stdout:
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


# --- certificates --------------------------------------------------------------------------------

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


def check_public_key(path: Path) -> Path:
    if not path.is_file():
        raise FedNdifError(f"site key file {path} does not exist")
    text = path.read_text(errors="replace").strip()
    if not text.startswith("ecdsa-sha2-nistp"):
        raise FedNdifError(f"{path} is not an ECDSA public key in OpenSSH format (make one with "
                           "ssh-keygen -t ecdsa -b 384 -N '' -f KEY and register KEY.pub)")
    return path


def check_private_key(path: Path) -> Path:
    if not path.is_file():
        raise FedNdifError(f"site private key {path} does not exist")
    head = path.read_bytes()[:64]
    if b"PRIVATE KEY" not in head:
        raise FedNdifError(f"{path} is not a private key (pass the key file itself, not the .pub)")
    return path


# --- coordinator ---------------------------------------------------------------------------------

def _client_host(host: str) -> str:
    """Where local commands reach a SuperLink that listens on ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


@contextlib.contextmanager
def tls_superlink(run_dir: Path, certs: ServerCerts, *, host: str, port: int,
                  tag: str, state_db: bool = False) -> Iterator[str]:
    """A SuperLink with TLS and SuperNode authentication; yields its address."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / "superlink.log"
    command = [
        flower_command("flower-superlink"), "--ssl-ca-certfile", str(certs.ca), "--ssl-certfile",
        str(certs.cert), "--ssl-keyfile", str(certs.key), "--enable-supernode-auth",
        "--disable-runtime-dependency-installation", "--host", host, "--port", str(port),
    ]
    if state_db:
        command += ["--database", str(run_dir / "state.db")]
    # The SuperLink's own SuperExec (ServerApp launcher) keeps Flower's 1 s task poll: each poll
    # is a query on the SuperLink's state.
    env = flower_env(run_dir / ".flwr", **{PROCESS_TAG: tag,
                                           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"})
    with log_file.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_for_port(port, process, log_file, host=_client_host(host), what="the SuperLink")
        log.info("SuperLink (TLS, SuperNode authentication) listening on %s:%d; log %s",
                 host, port, log_file)
        yield f"{_client_host(host)}:{port}"
    finally:
        stop_process(process)
        kill_tagged(tag)


def _flwr(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([flower_command("flwr"), *args], env=env, capture_output=True,
                          text=True, check=False)


def registered_keys(env: dict[str, str]) -> int:
    result = _flwr(["supernode", "list", CONNECTION, "--format", "json"], env)
    with contextlib.suppress(json.JSONDecodeError):
        return len(json.loads(result.stdout).get("nodes", []))
    return 0


def register_site_keys(keys: Sequence[Path], env: dict[str, str]) -> None:
    """``flwr supernode register KEY.pub`` for each key (one already registered is fine)."""
    for key in keys:
        result = _flwr(["supernode", "register", str(key), CONNECTION, "--format", "json"], env)
        output = result.stdout + result.stderr
        if result.returncode == 0 and "already" not in output:
            log.info("registered site key %s", key)
        elif "already in use" in output:
            log.info("site key %s was registered before", key)
        else:
            raise FedNdifError(f"could not register {key}: "
                               f"{output.strip().splitlines()[-1] if output.strip() else '?'}")


def wait_for_sites(count: int, env: dict[str, str], *, timeout_s: float) -> None:
    """Block until ``count`` SuperNodes are online (``flwr supernode list``)."""
    deadline = time.monotonic() + timeout_s
    online = 0
    while time.monotonic() < deadline:
        result = _flwr(["supernode", "list", CONNECTION, "--format", "json"], env)
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            nodes = json.loads(result.stdout).get("nodes", [])
            online = sum(node.get("status") == "online" for node in nodes)
            if online >= count:
                log.info("%d sites online", online)
                return
        time.sleep(1.0)
    raise FedNdifError(f"only {online} of {count} sites came online within {timeout_s:.0f} s")


def coordinator_config(run_dir: Path, overrides: Sequence[str], *, resume: bool
                       ) -> dict[str, Any]:
    """The run's config: federated.yaml + overrides (on resume: the saved config + overrides)."""
    from omegaconf import OmegaConf

    from fed_ndif.config import load_config
    from fed_ndif.server.federation import latest_checkpoint

    saved = run_dir / "config.yaml"
    if resume:
        if not saved.is_file():
            raise FedNdifError(f"{run_dir} holds no run to resume (no config.yaml)")
        cfg = OmegaConf.merge(OmegaConf.load(saved), OmegaConf.from_dotlist(list(overrides)))
    else:
        if latest_checkpoint(run_dir) is not None or saved.exists():
            raise FedNdifError(f"{run_dir} already holds a run; pass --resume to continue it or "
                               "use a new run folder")
        cfg = load_config("federated", list(overrides))
    fed = OmegaConf.to_container(cfg, resolve=True)
    fed["run_dir"] = str(run_dir)
    fed["fl"]["resume"] = bool(resume)
    return fed


def run_coordinator(run_dir: Path, overrides: Sequence[str] = (), *, certs_dir: Path,
                    site_keys: Sequence[Path] = (), host: str = "127.0.0.1",
                    port: int = DEFAULT_PORT, resume: bool = False, wait_sites: int = 0,
                    wait_timeout_s: float = 600.0, state_db: bool = False) -> Path:
    """Start the SuperLink, register the site keys, run (or resume) the federation."""
    from omegaconf import OmegaConf

    from fed_ndif.run_config import pyproject_app_config

    run_dir = run_dir.resolve()
    certs = ServerCerts.from_dir(certs_dir.resolve())
    keys = [check_public_key(Path(k).resolve()) for k in site_keys]
    flower_command("flower-superlink")  # fail before anything is written
    fed = coordinator_config(run_dir, overrides, resume=resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(fed)))
    run_config = run_dir / "run_config.toml"
    run_config.write_text(tomli_w.dumps(pyproject_app_config(fed)))
    flwr_home = run_dir / ".flwr"
    tag = os.environ.get(PROCESS_TAG) or new_tag()
    env = flower_env(flwr_home, **{PROCESS_TAG: tag})
    try:
        with terminate_on_sigterm(), tls_superlink(run_dir, certs, host=host, port=port,
                                                   tag=tag, state_db=state_db) as address:
            write_connection(flwr_home, address, root_certificates=certs.ca)
            register_site_keys(keys, env)
            log.info("ready: sites can connect to %s", address)
            if not keys and registered_keys(env) == 0:
                log.warning("no site key is registered: no site can join "
                            "(pass --register KEY.pub)")
            if wait_sites:
                wait_for_sites(wait_sites, env, timeout_s=wait_timeout_s)
            log.info("%s the federation in %s", "resuming" if resume else "starting", run_dir)
            code = stream_process([flower_command("flwr"), "run", str(project_root()),
                                   CONNECTION, "--stream",
                                   "--run-config", str(run_config)], env,
                                  run_dir / "logs" / "flwr-run.log")
    except KeyboardInterrupt as exc:
        raise FedNdifError(f"stopped ({exc or 'interrupted'}); the checkpoints in {run_dir} are "
                           "kept: continue with --resume") from None
    if code != 0:
        raise FedNdifError(f"the Flower run failed (exit {code}); see "
                           f"{run_dir / 'logs' / 'flwr-run.log'}")
    done = _last_round(run_dir)
    if done < int(fed["fl"]["rounds"]):
        # `flwr run` exits 0 even when the ServerApp crashed: check the run's own record.
        raise FedNdifError(f"the run stopped after round {done} of {fed['fl']['rounds']}; see "
                           f"{run_dir / 'logs'}; continue with --resume")
    return run_dir


def _last_round(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    rounds = [0]
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                rounds.append(int(json.loads(line)["round"]))
    return max(rounds)


# --- sites ---------------------------------------------------------------------------------------

def site_manifest_path(data: Path) -> Path:
    manifest = data / "manifest.csv" if data.is_dir() else data
    if not manifest.is_file():
        raise FedNdifError(f"no site manifest at {manifest} (a site folder holds manifest.csv; "
                           "see README, 'Site data')")
    return manifest


def supernode_args(*, superlink: str, ca: Path, key: Path, data: Path, name: str,
                   device: str = "auto", port: int = 9094) -> list[str]:
    """``flower-supernode`` arguments for one site (TLS, node key, the site's data only)."""
    node_config = f"data-path='{data}' site-name='{name}' device='{device}'"
    return ["--superlink", superlink, "--root-certificates", str(ca),
            "--auth-supernode-private-key", str(key), "--port", str(port),
            "--node-config", node_config]


def site_command(*, superlink: str, ca: Path, key: Path, data: Path, name: str | None = None,
                 device: str = "auto", port: int = 9094, poll_s: float = SUPERNODE_POLL_S,
                 warm_pool: bool = True) -> tuple[list[str], dict[str, str]]:
    """Checked command line and environment that start a site's SuperNode."""
    if ":" not in superlink:
        raise FedNdifError(f"--superlink {superlink!r}: give HOST:PORT")
    if not ca.is_file():
        raise FedNdifError(f"CA certificate {ca} does not exist (get ca.crt from the "
                           "coordinator)")
    check_private_key(key)
    data = data.resolve()
    manifest = site_manifest_path(data)
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise FedNdifError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    if "'" in str(data) or (name and "'" in name):
        raise FedNdifError("the data path and site name may not contain a quote (')")
    name = name or manifest.parent.name
    args = supernode_args(superlink=superlink, ca=ca.resolve(), key=key.resolve(),
                          data=data, name=name, device=device, port=port)
    command = [sys.executable, "-m", "fed_ndif.launch", "supernode", "--poll-interval",
               f"{poll_s:g}", *(["--warm-pool"] if warm_pool else []), "--", *args]
    return command, flower_env(None)


def run_site(**kwargs: Any) -> None:
    """Replace this process with the site's SuperNode (signals then reach it directly)."""
    command, env = site_command(**kwargs)
    log.info("starting the SuperNode of site %s: %s", kwargs.get("name") or "?",
             " ".join(command[5:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command[0], command, env)


def patch_supernode_polling(poll_s: float) -> None:
    """Make an idle SuperNode ask for work every ``poll_s`` s instead of 3 s (Flower 1.42).

    Flower 1.42 hard-codes ``time.sleep(3)`` in the SuperNode's pull loop; this swaps the
    ``time`` module seen by ``flwr.supernode.start_client_internal`` for one whose ``sleep`` is
    capped at ``poll_s``. It leans on a private module: checked by tests/test_deployment.py.
    """
    import types

    from flwr.supernode import start_client_internal as sci

    real = time

    def sleep(seconds: float) -> None:
        real.sleep(min(seconds, poll_s))

    shim = types.SimpleNamespace(**{name: getattr(real, name) for name in dir(real)
                                    if not name.startswith("__")})
    shim.sleep = sleep
    if getattr(sci, "time", None) is not real:
        raise FedNdifError("this Flower version's SuperNode cannot take --poll-interval; "
                           "leave it at 3")
    sci.time = shim  # type: ignore[assignment]


def start_warm_pool() -> subprocess.Popen:
    """Start the ClientApp pool and put its ``flwr-clientapp`` shim first on this process's
    PATH, which the SuperNode's SuperExec inherits. Stopped when this process exits."""
    import atexit
    import tempfile

    from fed_ndif.prefork import write_shim

    folder = Path(tempfile.mkdtemp(prefix="fed-ndif-pool-"))
    socket_path = folder / "pool.sock"
    shim = write_shim(folder / "bin", socket_path, flower_command("flwr-clientapp"))
    pool = subprocess.Popen([sys.executable, "-m", "fed_ndif.prefork", "serve", str(socket_path),
                             "--parent-pid", str(os.getpid())])
    os.environ["PATH"] = os.pathsep.join([str(shim.parent), os.environ.get("PATH", "")])

    def stop() -> None:
        pool.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            pool.wait(timeout=5)
        shutil.rmtree(folder, ignore_errors=True)

    atexit.register(stop)
    return pool


def supernode_main(argv: Sequence[str]) -> None:
    """``python -m fed_ndif.launch supernode [--poll-interval S] -- FLOWER-SUPERNODE-ARGS``."""
    import argparse

    parser = argparse.ArgumentParser(prog="fed_ndif.launch supernode")
    parser.add_argument("--poll-interval", type=float, default=3.0)
    parser.add_argument("--warm-pool", action="store_true",
                        help="run ClientApp tasks in a warm pool (fed_ndif.prefork)")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    flower_args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli import flower_supernode

    update_console_handler(timestamps=True, colored=False)
    if ns.poll_interval < 3.0:
        patch_supernode_polling(max(0.1, ns.poll_interval))
    if ns.warm_pool:
        start_warm_pool()
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    if sys.argv[1:2] == ["supernode"]:
        supernode_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m fed_ndif.launch supernode [--poll-interval S] -- ARGS")

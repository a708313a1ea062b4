"""``fed-ndif coordinator RUN_DIR``: the federation's coordinator.

A SuperLink with TLS and SuperNode authentication, the listed site keys registered, and the
Fed-NDIF run launched with ``flwr run`` from hydra overrides of configs/federated.yaml.
Everything of the run lives in RUN_DIR: ``config.yaml``, ``run_config.toml``, ``checkpoints/``,
``metrics.jsonl``, ``logs/``, ``.flwr/`` (FLWR_HOME) and, with ``--state-db``, ``state.db``
(the SuperLink's state; by default it is kept in memory: the file-backed SQLite state answered
"database is locked" under load, which loses replies). ``--resume`` continues from the latest
checkpoint; keys are registered at each start.

Before the run, and whenever the run waits for sites, the coordinator names the registered
sites that are missing (at most once a minute) and gives up after ``--wait-for-sites-timeout``;
the sites' supervisors (:mod:`.site`) rejoin a restarted coordinator by themselves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w

from fed_ndif.errors import FedNdifError
from fed_ndif.runtime.processes import (
    CONNECTION,
    PROCESS_TAG,
    Throttle,
    check_port_free,
    flower_command,
    flower_env,
    new_tag,
    terminate_on_sigterm,
    write_connection,
)
from fed_ndif.runtime.superlink import ServerCerts, flwr_run, superlink
from fed_ndif.server.federation import rounds_recorded

log = logging.getLogger(__name__)

DEFAULT_PORT = 9092
DEFAULT_WAIT_S = 600.0
# The ServerApp's strategy logs this every second while fewer than fl.min_sites are online.
WAITING_LINE = b"Waiting for nodes to connect"


def check_public_key(path: Path) -> Path:
    """Fail early, with the fix, on a site key that Flower would refuse to register."""
    if not path.is_file():
        raise FedNdifError(f"site key file {path} does not exist")
    text = path.read_text(errors="replace").strip()
    if not text.startswith("ecdsa-sha2-nistp"):
        raise FedNdifError(f"{path} is not an ECDSA public key in OpenSSH format (make one with "
                           "ssh-keygen -t ecdsa -b 384 -N '' -f KEY and register KEY.pub)")
    return path


def _flwr(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([flower_command("flwr"), *args], env=env, capture_output=True,
                          text=True, check=False)


def _node_list(env: dict[str, str]) -> list[dict[str, Any]] | None:
    """``flwr supernode list`` (None when the SuperLink cannot say)."""
    result = _flwr(["supernode", "list", CONNECTION, "--format", "json"], env)
    with contextlib.suppress(json.JSONDecodeError, AttributeError):
        return list(json.loads(result.stdout).get("nodes", []))
    return None


def registered_keys(env: dict[str, str]) -> int:
    """How many SuperNode keys the SuperLink knows (0 when it cannot say)."""
    return len(_node_list(env) or [])


def register_site_keys(keys: Sequence[Path], env: dict[str, str]) -> dict[str, str]:
    """``flwr supernode register KEY.pub`` for each key (one already registered is fine);
    returns node id -> site name (the key file's name) for the keys registered now."""
    names = {}
    for key in keys:
        result = _flwr(["supernode", "register", str(key), CONNECTION, "--format", "json"], env)
        output = result.stdout + result.stderr
        if result.returncode == 0 and "already" not in output:
            log.info("registered site key %s", key)
            with contextlib.suppress(json.JSONDecodeError, AttributeError):
                names[str(json.loads(result.stdout)["node-id"])] = key.name.removesuffix(".pub")
        elif "already in use" in output:
            log.info("site key %s was registered before", key)
        else:
            raise FedNdifError(f"could not register {key}: "
                               f"{output.strip().splitlines()[-1] if output.strip() else '?'}")
    return names


class SiteWatch:
    """Which registered sites are online, named after their key files."""

    def __init__(self, env: dict[str, str], names: dict[str, str]):
        self.env, self.names = env, names

    def online(self) -> tuple[int, list[str]]:
        """How many sites are online, and the names of the registered ones that are not."""
        nodes = _node_list(self.env) or []
        online = {str(node.get("node-id")) for node in nodes if node.get("status") == "online"}
        return len(online), sorted(name for node_id, name in self.names.items()
                                   if node_id not in online)

    def describe(self, missing: list[str]) -> str:
        if missing:
            return ", ".join(missing)
        if self.names:
            return "none of the registered sites (all are online)"
        return "unknown (keys registered before this start)"


def wait_for_sites(count: int, watch: SiteWatch, *, min_sites: int, timeout_s: float,
                   poll_s: float = 2.0) -> None:
    """Block until ``count`` sites are online, naming the missing ones once a minute.

    Past ``timeout_s``: start if ``min_sites`` are online (what the run needs), else fail.
    """
    deadline = time.monotonic() + timeout_s
    throttle = Throttle()
    while True:
        online, missing = watch.online()
        if online >= count:
            log.info("%d sites online", online)
            return
        if time.monotonic() >= deadline:
            if online >= max(min_sites, 1):
                log.warning("starting with %d sites (fl.min_sites=%d) after %.0f s; missing: %s",
                            online, min_sites, timeout_s, watch.describe(missing))
                return
            raise FedNdifError(f"only {online} of {count} sites came online within "
                               f"{timeout_s:.0f} s (--wait-for-sites-timeout); missing: "
                               f"{watch.describe(missing)}")
        if throttle("waiting"):
            log.info("waiting for sites: %d of %d online; missing: %s", online, count,
                     watch.describe(missing))
        time.sleep(poll_s)


class RunWatch:
    """Follows ``flwr run``'s output: while a round waits for sites, names the missing ones
    once a minute, and stops the run when they stay away longer than ``timeout_s``."""

    def __init__(self, watch: SiteWatch, timeout_s: float, clock=time.monotonic):
        self.watch, self.timeout_s, self.clock = watch, timeout_s, clock
        self.since: float | None = None
        self.throttle = Throttle(clock=clock)

    @staticmethod
    def repeats(line: bytes) -> object:
        return "waiting" if WAITING_LINE in line else None

    def __call__(self, line: bytes) -> None:
        if WAITING_LINE not in line:
            self.since = None
            return
        now = self.clock()
        self.since = now if self.since is None else self.since
        if now - self.since > self.timeout_s:
            _, missing = self.watch.online()
            raise FedNdifError(f"the run waited {self.timeout_s:.0f} s for sites "
                               f"(--wait-for-sites-timeout); missing: "
                               f"{self.watch.describe(missing)}; continue with --resume")
        if self.throttle("missing"):
            online, missing = self.watch.online()
            log.info("the run waits for sites: %d online; missing: %s", online,
                     self.watch.describe(missing))


def coordinator_config(run_dir: Path, overrides: Sequence[str], *, resume: bool
                       ) -> dict[str, Any]:
    """The run's config: federated.yaml + overrides (on resume: the saved config + overrides)."""
    from omegaconf import OmegaConf

    from fed_ndif.checkpoints import latest_global_checkpoint
    from fed_ndif.config import load_config

    saved = run_dir / "config.yaml"
    if resume:
        if not saved.is_file():
            raise FedNdifError(f"{run_dir} holds no run to resume (no config.yaml)")
        cfg = OmegaConf.load(saved)
        for override in overrides:
            key = override.partition("=")[0]
            if OmegaConf.is_dict(OmegaConf.select(cfg, key)):
                raise FedNdifError(f"{override}: {key} is a config group, fixed when the run "
                                   "started; on --resume give single settings (key.name=value)")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    else:
        if latest_global_checkpoint(run_dir) is not None or saved.exists():
            raise FedNdifError(f"{run_dir} already holds a run; pass --resume to continue it or "
                               "use a new run folder")
        cfg = load_config("federated", list(overrides))
    fed = OmegaConf.to_container(cfg, resolve=True)
    fed["run_dir"] = str(run_dir)
    fed["fl"]["resume"] = bool(resume)
    return fed


def run_coordinator(run_dir: Path, overrides: Sequence[str] = (), *, certs_dir: Path,
                    site_keys: Sequence[Path] = (), host: str = "127.0.0.1",
                    port: int = DEFAULT_PORT, resume: bool = False,
                    wait_sites: int | None = None, wait_timeout_s: float = DEFAULT_WAIT_S,
                    state_db: bool = False) -> Path:
    """Start the SuperLink, register the site keys, run (or resume) the federation.

    ``wait_sites``: sites to wait for before the run (None: ``fl.min_sites``).
    """
    from omegaconf import OmegaConf

    from fed_ndif.run_config import pyproject_app_config

    run_dir = run_dir.resolve()
    certs = ServerCerts.from_dir(certs_dir.resolve())
    keys = [check_public_key(Path(k).resolve()) for k in site_keys]
    flower_command("flower-superlink")  # fail before anything is written
    check_port_free(host, port, what="a coordinator still running, or another server")
    fed = coordinator_config(run_dir, overrides, resume=resume)
    min_sites = int(fed["fl"]["min_sites"])
    wait_sites = min_sites if wait_sites is None else wait_sites
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(fed)))
    run_config = run_dir / "run_config.toml"
    run_config.write_text(tomli_w.dumps(pyproject_app_config(fed)))
    flwr_home = run_dir / ".flwr"
    tag = os.environ.get(PROCESS_TAG) or new_tag()
    env = flower_env(flwr_home, **{PROCESS_TAG: tag})
    run_log = run_dir / "logs" / "flwr-run.log"
    try:
        # The SuperLink's own SuperExec (ServerApp launcher) keeps Flower's 1 s task poll: each
        # poll is a query on the SuperLink's state.
        with terminate_on_sigterm(), superlink(
                flwr_home=flwr_home, log_file=run_dir / "logs" / "superlink.log", tls=certs,
                host=host, port=port, tag=tag, superexec_poll_s=1.0,
                database=run_dir / "state.db" if state_db else None) as address:
            write_connection(flwr_home, address, root_certificates=certs.ca)
            watch = SiteWatch(env, register_site_keys(keys, env))
            log.info("ready: sites can connect to %s", address)
            if not keys and registered_keys(env) == 0:
                log.warning("no site key is registered: no site can join "
                            "(pass --register KEY.pub)")
            if wait_sites:
                wait_for_sites(wait_sites, watch, min_sites=min_sites, timeout_s=wait_timeout_s)
            log.info("%s the federation in %s", "resuming" if resume else "starting", run_dir)
            run_watch = RunWatch(watch, wait_timeout_s)
            flwr_run(CONNECTION, run_config, env, run_log, on_line=run_watch,
                     repeats=run_watch.repeats)
    except KeyboardInterrupt as exc:
        raise FedNdifError(f"stopped ({exc or 'interrupted'}); the checkpoints in {run_dir} are "
                           "kept: continue with --resume") from None
    done = rounds_recorded(run_dir)
    if done < int(fed["fl"]["rounds"]):
        # `flwr run` exits 0 even when the ServerApp crashed: check the run's own record.
        raise FedNdifError(f"the run stopped after round {done} of {fed['fl']['rounds']}; see "
                           f"{run_dir / 'logs'}; continue with --resume")
    return run_dir

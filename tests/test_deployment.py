"""Real deployment on 127.0.0.1: SuperLink (TLS + SuperNode auth) and SuperNodes as processes.

Everything runs through the user-facing commands (``fed-ndif coordinator`` / ``fed-ndif site``
via ``python -m fed_ndif.cli``); each test stops every process it started, by its id (its
process group, then anything carrying the test's environment tag), even when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fed_ndif.runtime.processes import (
    PROCESS_TAG,
    free_port,
    kill_tagged,
    new_tag,
    stop_process,
    tagged,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site_a", "site_b", "site_c")
TINY = ["model=tiny", "fl.rounds=2", "fl.local_steps=2", "fl.evaluate_max_studies=0",
        "logger.wandb_mode=disabled", "train.batch_size=2", "fl.round_timeout_s=300"]
WAIT_S = 600.0  # a loaded 2-core machine took ~100 s per tiny round


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run([str(ROOT / "scripts" / "make-certs"), "-o", str(out), *SITES, "intruder"],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    from fed_ndif.data.sites import make_sites

    out = tmp_path_factory.mktemp("sites") / "sites"
    make_sites(out, overrides=["sites=tiny"])
    return out


@dataclass
class Processes:
    """The processes one test started; ``stop_all`` stops them by id (and their leftovers)."""

    folder: Path
    base_tag: str = field(default_factory=new_tag)
    started: dict[str, tuple[subprocess.Popen, str, Path]] = field(default_factory=dict)

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        tag = f"{self.base_tag}-{len(self.started)}"
        log_file = self.folder / f"{name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
               PROCESS_TAG: tag}
        with log_file.open("ab") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True, cwd=ROOT)
        self.started[name] = (process, tag, log_file)
        return process

    def log(self, name: str) -> str:
        return self.started[name][2].read_text(errors="replace")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int:
        process, tag, _ = self.started[name]
        stop_process(process, sig=sig, timeout_s=30)
        kill_tagged(tag)
        return process.returncode

    def stop_all(self) -> None:
        for name in list(self.started):
            self.stop(name)

    def dump(self) -> str:
        return "\n".join(f"--- {name} (last lines)\n" + "\n".join(self.log(name).splitlines()[-25:])
                         for name in self.started)


@pytest.fixture
def processes(tmp_path) -> Iterator[Processes]:
    procs = Processes(tmp_path / "logs")
    procs.folder.mkdir()
    try:
        yield procs
    finally:
        procs.stop_all()


def coordinator(procs: Processes, name: str, run_dir: Path, certs: Path, port: int,
                *extra: str, keys: tuple[str, ...] = SITES) -> subprocess.Popen:
    register = [arg for site in keys for arg in ("--register", str(certs / "nodes" /
                                                                    f"{site}.pub"))]
    return procs.start(name, [sys.executable, "-m", "fed_ndif.cli", "coordinator",
                              str(run_dir), *TINY, *extra, "--certs", str(certs),
                              "--port", str(port), *register])


def site(procs: Processes, name: str, certs: Path, sites: Path, port: int, *,
         key: str | None = None, label: str | None = None,
         extra: tuple[str, ...] = ()) -> subprocess.Popen:
    return procs.start(label or name, [sys.executable, "-m", "fed_ndif.cli", "site", "--superlink",
                              f"127.0.0.1:{port}", "--ca", str(certs / "ca.crt"), "--key",
                              str(certs / "nodes" / (key or name)), "--data",
                              str(sites / (name if key is None else "site_a")), "--name", name,
                              "--device", "cpu", "--port", str(free_port()),
                              "--poll-interval", "1", *extra])


def wait_for(condition: Callable[[], bool], what: str, procs: Processes,
             timeout_s: float = WAIT_S, *, watch: str = "coordinator") -> None:
    """Wait for ``condition``; fail at once if the ``watch`` process has exited without it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        coordinator = procs.started.get(watch)
        if coordinator is not None and coordinator[0].poll() is not None and not condition():
            pytest.fail(f"{watch} exited ({coordinator[0].returncode}) while waiting "
                        f"for {what}\n{procs.dump()}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}\n{procs.dump()}")


def rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("global-round-*.pt"))


def start_federation(procs: Processes, run_dir: Path, certs: Path, sites: Path, *extra: str,
                     wait_sites: int = 0) -> int:
    port = free_port()
    args = [*extra] + (["--wait-for-sites", str(wait_sites)] if wait_sites else [])
    coordinator(procs, "coordinator", run_dir, certs, port, *args)
    wait_for(lambda: "ready: sites can connect" in procs.log("coordinator"),
             "the coordinator to register the sites", procs)
    for name in SITES:
        site(procs, name, certs, sites, port)
    return port


@dataclass
class FederationResult:
    run_dir: Path
    logs: dict[str, str]
    returncodes: dict[str, int | None]
    seconds: float


@pytest.fixture(scope="module")
def tls_federation(tmp_path_factory, certs, sites) -> FederationResult:
    """3 registered sites + an unregistered key + a node without TLS; 2 rounds."""
    folder = tmp_path_factory.mktemp("tls")
    procs = Processes(folder / "logs")
    procs.folder.mkdir()
    run_dir = folder / "run"
    started = time.monotonic()
    try:
        port = start_federation(procs, run_dir, certs, sites, "fl.min_sites=3")
        site(procs, "unregistered", certs, sites, port, key="intruder")
        # A node without TLS (and so without a key: Flower refuses node auth over plain HTTP).
        procs.start("insecure", ["flower-supernode", "--superlink", f"127.0.0.1:{port}",
                                 "--insecure", "--port", str(free_port()), "--node-config",
                                 f"data-path='{sites / 'site_b'}' site-name='insecure'"])
        wait_for(lambda: procs.started["coordinator"][0].poll() is not None,
                 "the federation to finish", procs)
        returncodes = {name: p.poll() for name, (p, _, _) in procs.started.items()}
        return FederationResult(run_dir, {name: procs.log(name) for name in procs.started},
                                returncodes, time.monotonic() - started)
    finally:
        procs.stop_all()


def test_tls_federation_with_node_auth_runs_two_rounds_and_checkpoints(tls_federation):
    run_dir = tls_federation.run_dir
    assert tls_federation.returncodes["coordinator"] == 0, tls_federation.logs["coordinator"]
    assert checkpoints(run_dir) == [f"global-round-000{r}.pt" for r in range(3)]
    history = rounds(run_dir)
    assert [r["round"] for r in history] == [1, 2]
    assert all(r["sites"] == list(SITES) and not r["failed"] for r in history)
    # Each site's ClientApp ran forked from its warm pool (fed_ndif.runtime.prefork).
    for name in SITES:
        assert "ClientApp task started in the warm pool" in tls_federation.logs[name], name
    superlink = (run_dir / "logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1" in superlink  # TLS, loopback only
    for name in ("config.yaml", "run_config.toml", "logs/flwr-run.log"):
        assert (run_dir / name).exists(), name


def test_unregistered_key_and_plaintext_node_are_refused(tls_federation):
    logs = tls_federation.logs
    # The site whose key the coordinator never registered is told so in one line, at most
    # once a minute, and keeps trying (it may be registered later).
    # (Once the run has ended the site may also say that nothing listens any more: the log is
    # read after the coordinator exits, so only the key's lines are counted.)
    refused = [line for line in logs["unregistered"].splitlines()
               if "retrying in" in line and "refused this site's key" in line]
    assert refused and all("intruder.pub with --register" in line for line in refused), refused
    assert len(refused) <= 1 + tls_federation.seconds / 60
    assert "Failed to activate SuperNode" not in logs["unregistered"]
    assert "SuperNode ID" not in logs["unregistered"]
    assert tls_federation.returncodes["unregistered"] is None
    # The node speaking plain HTTP to the TLS SuperLink never gets a node id.
    assert "Connection attempt failed" in logs["insecure"]
    assert "SuperNode ID" not in logs["insecure"]
    for record in rounds(tls_federation.run_dir):
        assert not {"unregistered", "insecure", "intruder"} & set(record["sites"])


def test_a_site_killed_mid_round_and_restarted_at_once_trains_in_the_next_round(
        tmp_path, processes, certs, sites):
    run_dir = tmp_path / "run"
    port = start_federation(processes, run_dir, certs, sites, "fl.min_sites=3")
    # site_c gets round 1's training message, then dies with everything it started, its
    # SuperNode first (so that it cannot say goodbye to the coordinator).
    wait_for(lambda: "Receiving: train message" in processes.log("site_c"),
             "site_c to receive round 1", processes)
    _kill_site(processes, "site_c")
    site(processes, "site_c", certs, sites, port, label="site_c-restarted")
    wait_for(lambda: processes.started["coordinator"][0].poll() is not None,
             "the run to finish", processes)
    assert processes.started["coordinator"][0].returncode == 0, processes.dump()
    first, second = rounds(run_dir)
    assert first["sites"] == ["site_a", "site_b"] and len(first["failed"]) == 1, first
    assert second["sites"] == list(SITES), second
    restarted = processes.log("site_c-restarted")
    # Its crashed predecessor's connection was released: admitted at once, no wait.
    assert "released the connection its previous SuperNode" in restarted
    assert "not registered" not in restarted and "Failed to activate" not in restarted
    assert checkpoints(run_dir)[-1] == "global-round-0002.pt"


def _kill_site(procs: Processes, name: str) -> None:
    """Kill a site with everything it started, its SuperNode first (no goodbye)."""
    _, tag, _ = procs.started[name]
    for pid in tagged(tag):
        with contextlib.suppress(OSError):
            if b"fed_ndif.runtime.site\0supernode" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
    procs.stop(name, signal.SIGKILL)


def test_secure_aggregation_over_tls_goes_on_when_a_site_is_killed_mid_round(
        tmp_path, processes, certs, sites):
    """SecAgg+ with TLS and node auth; every site refuses plain rounds; site_c is killed while
    it trains in round 1 (its third SecAgg+ message) and restarted at once."""
    run_dir = tmp_path / "run"
    port = free_port()
    coordinator(processes, "coordinator", run_dir, certs, port, "fl.min_sites=3",
                "fl.secagg.max_weight=100", "--secure-aggregation")
    wait_for(lambda: "ready: sites can connect" in processes.log("coordinator"),
             "the coordinator to register the sites", processes)
    for name in SITES:
        site(processes, name, certs, sites, port, extra=("--require-secure-aggregation",))
    wait_for(lambda: processes.log("site_c").count("Receiving: train message") >= 3,
             "site_c to be asked for its masked update in round 1", processes)
    _kill_site(processes, "site_c")
    site(processes, "site_c", certs, sites, port, label="site_c-restarted",
         extra=("--require-secure-aggregation",))
    wait_for(lambda: processes.started["coordinator"][0].poll() is not None,
             "the run to finish", processes)
    assert processes.started["coordinator"][0].returncode == 0, processes.dump()
    first, second = rounds(run_dir)
    assert first["secure_aggregation"] and second["secure_aggregation"]
    # Killed before it sent its masked update: left out of the sum; after: its masks are
    # removed with the others' shares. Either way the round was unmasked and applied.
    assert {"site_a", "site_b"} <= set(first["sites"]) and first["rejected"] == {}, first
    assert "site_c" in first["sites"] or "site_c" in first["failed"], first
    assert second["sites"] == list(SITES), second
    assert checkpoints(run_dir)[-1] == "global-round-0002.pt"
    log_text = processes.log("coordinator") + (run_dir / "logs" / "flwr-run.log").read_text()
    assert "Secure aggregation completed" in log_text


def _final_weights(run_dir: Path) -> dict:
    from fed_ndif.checkpoints import read_checkpoint

    return read_checkpoint(run_dir / "checkpoints" / "global-round-0002.pt")["model"]


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_a_coordinator_killed_mid_round_resumes_and_the_sites_rejoin_by_themselves(
        tmp_path, processes, certs, sites, tls_federation):
    run_dir = tmp_path / "run"
    port = start_federation(processes, run_dir, certs, sites, "fl.min_sites=3")
    wait_for(lambda: len(rounds(run_dir)) == 1 and all(
        processes.log(name).count("Receiving: train message") >= 2 for name in SITES),
        "the sites to receive round 2", processes)
    first = {name: (run_dir / "checkpoints" / name).stat().st_mtime_ns
             for name in checkpoints(run_dir)}
    coordinator_process, coordinator_tag, _ = processes.started["coordinator"]
    os.kill(coordinator_process.pid, signal.SIGKILL)  # its main process only
    coordinator_process.wait()
    # Its SuperLink, SuperExec and ServerApp die with it: nothing keeps the port.
    wait_for(lambda: not tagged(coordinator_tag) and _port_free(port),
             "the coordinator's processes to die with it", processes, timeout_s=30,
             watch="none")

    # Without --resume the run folder is refused: nothing is overwritten.
    refused = subprocess.run([sys.executable, "-m", "fed_ndif.cli", "coordinator", str(run_dir),
                              "--certs", str(certs)], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr

    register = [arg for name in SITES for arg in ("--register", str(certs / "nodes" /
                                                                     f"{name}.pub"))]
    processes.start("coordinator-resumed", [
        sys.executable, "-m", "fed_ndif.cli", "coordinator", str(run_dir), "--resume",
        "--certs", str(certs), "--port", str(port), *register])
    wait_for(lambda: processes.started["coordinator-resumed"][0].poll() is not None,
             "the resumed run to finish", processes, watch="coordinator-resumed")
    assert processes.started["coordinator-resumed"][0].returncode == 0, processes.dump()
    history = rounds(run_dir)
    assert [r["round"] for r in history] == [1, 2]  # round 2 only was run again
    assert history[1]["sites"] == list(SITES)
    for name, mtime in first.items():  # the earlier checkpoints were not rewritten
        assert (run_dir / "checkpoints" / name).stat().st_mtime_ns == mtime
    # Nobody touched the sites: each rejoined the new coordinator by itself.
    for name in SITES:
        assert processes.started[name][0].poll() is None, processes.dump()
        assert "the coordinator ended this site's connection" in processes.log(name)
    # The same weights, bit for bit, as the uninterrupted run with the same seed.
    reference, resumed = _final_weights(tls_federation.run_dir), _final_weights(run_dir)
    assert reference.keys() == resumed.keys()
    assert all(reference[k].equal(resumed[k]) for k in reference)


def test_site_and_coordinator_refuse_bad_input_in_one_line(tmp_path, certs, sites, capsys):
    from fed_ndif.cli import main

    assert main(["coordinator", str(tmp_path / "run"), "--certs", str(tmp_path)]) == 2
    assert "missing certificate file" in capsys.readouterr().err
    assert main(["coordinator", str(tmp_path / "run"), "--certs", str(certs), "--register",
                 str(certs / "nodes" / "nobody.pub")]) == 2
    assert "site key file" in capsys.readouterr().err
    assert main(["site", "--superlink", "127.0.0.1:1", "--ca", str(certs / "ca.crt"),
                 "--key", str(certs / "nodes" / "site_a.pub"), "--data",
                 str(sites / "site_a")]) == 2
    assert "not a private key" in capsys.readouterr().err
    assert main(["site", "--superlink", "127.0.0.1:1", "--ca", str(certs / "ca.crt"),
                 "--key", str(certs / "nodes" / "site_a"), "--data", str(tmp_path)]) == 2
    assert re.search(r"no site manifest at .*manifest\.csv", capsys.readouterr().err)

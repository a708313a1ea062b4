"""Restarts without a person: orphans, one-line reasons, supervision of a site's SuperNode.

The multi-process federation cases (a coordinator or a site killed mid-round) are in
tests/test_deployment.py; these are the fast pieces, some with real processes on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fed_ndif.cli import main
from fed_ndif.runtime.coordinator import RunWatch
from fed_ndif.runtime.processes import (
    PROCESS_TAG,
    Throttle,
    check_port_free,
    free_port,
    kill_tagged,
    new_tag,
    stop_process,
    tagged,
)
from fed_ndif.runtime.reach import diagnose, remember_node, remembered_node
from fed_ndif.runtime.supervisor import Attempt, Backoff, SiteSupervisor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run([str(ROOT / "scripts" / "make-certs"), "-o", str(out), "site_a"],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("other")
    subprocess.run([str(ROOT / "scripts" / "make-certs"), "-o", str(out), "site_a"],
                   check=True, capture_output=True)
    return out / "ca.crt"


@pytest.fixture(scope="module")
def site_data(tmp_path_factory) -> Path:
    from fed_ndif.data.sites import make_sites

    out = tmp_path_factory.mktemp("sites") / "sites"
    make_sites(out, overrides=["sites=tiny"])
    return out / "site_a"


@pytest.fixture
def tls_server(certs):
    """A TLS listener on 127.0.0.1 with the federation's server certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "server.crt", certs / "server.key")
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    done.set()
    thread.join()
    server.close()


def test_throttle_allows_a_key_once_per_interval():
    now = [0.0]
    throttle = Throttle(60.0, clock=lambda: now[0])
    assert throttle("a") and throttle("b") and not throttle("a")
    now[0] = 59.0
    assert not throttle("a")
    now[0] = 60.0
    assert throttle("a")


def test_backoff_doubles_up_to_its_cap_and_resets():
    backoff = Backoff(1.0, 8.0)
    assert [backoff() for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    backoff.reset()
    assert backoff() == 1


def test_run_watch_names_missing_sites_once_a_minute_and_gives_up():
    class Watch:
        calls = 0

        def online(self):
            Watch.calls += 1
            return 2, ["site_c"]

        describe = staticmethod(lambda missing: ", ".join(missing))

    now = [0.0]
    watch = RunWatch(Watch(), timeout_s=300, clock=lambda: now[0])
    line = b"INFO :      Waiting for nodes to connect: 2 connected (minimum required: 3).\n"
    assert watch.repeats(line) == "waiting" and watch.repeats(b"round 2\n") is None
    for second in range(120):
        now[0] = float(second)
        watch(line)
    assert Watch.calls == 2  # at 0 s and 60 s
    watch(b"INFO : [ROUND 2]\n")  # the wait ended: the clock starts again
    for second in range(120, 421):
        now[0] = float(second)
        watch(line)
    now[0] = 421.0
    with pytest.raises(Exception, match=r"waited 300 s for sites .*missing: site_c; continue "
                                        r"with --resume"):
        watch(line)


class _Sites:
    """A SiteWatch stand-in: ``online`` sites of site_a..site_c are online."""

    def __init__(self, online: int):
        self.count, self.calls = online, 0

    def online(self):
        self.calls += 1
        return self.count, ["site_a", "site_b", "site_c"][self.count:]

    describe = staticmethod(lambda missing: ", ".join(missing))


def test_waiting_for_sites_starts_with_min_sites_or_fails_in_one_line(caplog):
    from fed_ndif.errors import FedNdifError
    from fed_ndif.runtime.coordinator import wait_for_sites

    caplog.set_level("INFO")
    wait_for_sites(3, _Sites(2), min_sites=2, timeout_s=0.3, poll_s=0.05)
    assert "starting with 2 sites (fl.min_sites=2) after 0 s; missing: site_c" in caplog.text
    sites = _Sites(1)
    with pytest.raises(FedNdifError, match=r"^only 1 of 3 sites came online within 0 s "
                                            r"\(--wait-for-sites-timeout\); missing: site_b, "
                                            r"site_c$"):
        wait_for_sites(3, sites, min_sites=2, timeout_s=0.3, poll_s=0.05)
    assert sites.calls > 2  # it kept asking, but said so once
    assert caplog.text.count("waiting for sites: 1 of 3 online; missing: site_b, site_c") == 1
    wait_for_sites(2, _Sites(2), min_sites=2, timeout_s=0.0)  # enough: no wait


def test_port_taken_fails_in_one_line():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(Exception, match=f"port {port} on 127.0.0.1 is taken"):
            check_port_free("127.0.0.1", port, what="test")
    check_port_free("127.0.0.1", port, what="test")  # free again


@pytest.mark.multiprocess
def test_the_watchdog_kills_the_tree_of_a_parent_killed_with_sigkill(tmp_path):
    """A parent's grandchildren (its own session, no parent-death signal) die with it."""
    tag = new_tag()
    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "from fed_ndif.runtime.processes import start_watchdog\n"
        f"start_watchdog({tag!r})\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
        " start_new_session=True)\n"
        "print('ready', flush=True)\n"
        "time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, cwd=ROOT,
                              env={**os.environ, PROCESS_TAG: tag}, start_new_session=True)
    try:
        assert parent.stdout.readline() == b"ready\n"
        assert len(tagged(tag)) == 2  # parent and sleeper (the watchdog has a tag of its own)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tagged(tag) == []
    finally:
        stop_process(parent)
        kill_tagged(tag)
        kill_tagged(f"{tag}-watchdog")


def test_diagnose_names_each_reason_a_site_cannot_connect(tls_server, certs, other_ca):
    assert diagnose(tls_server, certs / "ca.crt") is None
    assert "not signed by" in diagnose(tls_server, other_ca)
    assert "connection refused" in diagnose(f"127.0.0.1:{free_port()}", certs / "ca.crt")
    assert "cannot resolve" in diagnose("no-such-host.invalid:9092", certs / "ca.crt")


def test_node_id_is_remembered_per_coordinator_and_key(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    key = tmp_path / "site.key"
    key.write_text("x")
    address = f"127.0.0.1:{free_port()}"
    assert remembered_node(address, key) is None
    remember_node(address, key, 1234)
    assert remembered_node(address, key) == 1234
    assert remembered_node(f"127.0.0.1:{free_port()}", key) is None


def _supervisor(tmp_path: Path) -> SiteSupervisor:
    return SiteSupervisor(["true"], {}, superlink=f"127.0.0.1:{free_port()}",
                          ca=tmp_path / "ca.crt", key=tmp_path / "site_a", name="site_a",
                          port=9094)


def _attempt(lines: list[str], released: str | None = None, node_id: int | None = None):
    attempt = Attempt(released=released, node_id=node_id)
    attempt.tail.extend(lines)
    return attempt


REFUSED = ["ERROR :      Exit Code: 305", "Failed to initialize the connection to the SuperLink.",
           "[code: 21] Failed to activate SuperNode."]


def test_supervisor_says_why_the_supernode_ended(tmp_path):
    supervisor = _supervisor(tmp_path)
    # Never admitted here: the key may be unregistered (or held from before a crash).
    assert "is not registered there" in supervisor._why(_attempt(REFUSED))
    # Admitted before and the coordinator no longer knows the id: not registered.
    why = supervisor._why(_attempt(REFUSED, released="unknown"))
    assert "is not registered there" in why and "crash" not in why
    # Its earlier node was known (released or offline): never the unregistered-key message.
    why = supervisor._why(_attempt(REFUSED, released="released"))
    assert "still holds this site's previous connection" in why
    assert "not registered" not in why
    # A restarted SuperLink answered 401 and the SuperNode ended "gracefully".
    why = supervisor._why(_attempt(["SuperNode terminated gracefully.", "exit code 0"],
                                   node_id=7))
    assert "ended this site's connection" in why
    assert "port 9094 (--port) is taken" in supervisor._why(
        _attempt(["RuntimeError: SuperNode Runtime HTTP API failed to start."]))


def test_supervisor_passes_lines_but_swallows_flowers_retries_and_exit_text(tmp_path, capsys,
                                                                             caplog, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the node id is kept
    supervisor = _supervisor(tmp_path)
    attempt = Attempt()
    for line in [b"INFO : SuperNode ID: 42\n",
                 *[b"WARNING : Connection attempt failed, retrying in 3.1 seconds\n"] * 5,
                 b"INFO : Receiving: train message\n", *[f"{x}\n".encode() for x in REFUSED]]:
        supervisor._line(line, attempt)
    out = capsys.readouterr().out
    assert "SuperNode ID: 42" in out and "Receiving: train message" in out
    assert "Connection attempt failed" not in out and "Exit Code" not in out
    assert caplog.text.count("lost the coordinator: nothing listens") == 1
    assert attempt.node_id == 42
    assert remembered_node(supervisor.superlink, supervisor.key) == 42


def _site(superlink: str, ca: Path, certs: Path, data: Path, log_file: Path,
          tag: str) -> subprocess.Popen:
    with log_file.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fed_ndif.cli", "site", "--superlink", superlink, "--ca",
             str(ca), "--key", str(certs / "nodes" / "site_a"), "--data", str(data),
             "--device", "cpu", "--port", str(free_port())], stdout=out,
            stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, PROCESS_TAG: tag, "FLWR_TELEMETRY_ENABLED": "0"})


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ["wrong-ca", "plain-http"])
def test_a_site_that_cannot_connect_says_why_once_and_keeps_trying(case, tmp_path, tls_server,
                                                                   certs, other_ca, site_data):
    tag = new_tag()
    http = None
    if case == "plain-http":
        port = free_port()
        http = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                 str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, PROCESS_TAG: tag})
        superlink, ca, reason = f"127.0.0.1:{port}", certs / "ca.crt", "speaks plain HTTP"
    else:
        superlink, ca, reason = tls_server, other_ca, "certificate is not signed by"
    log_file = tmp_path / "site.log"
    site = _site(superlink, ca, certs, site_data, log_file, tag)
    try:
        deadline = time.monotonic() + 60
        while log_file.read_text().count("retrying in") < 1 and time.monotonic() < deadline:
            assert site.poll() is None, log_file.read_text()
            time.sleep(0.2)
        time.sleep(8)  # several more tries (1, 2, 4 s apart): still one line
        text = log_file.read_text()
        assert site.poll() is None, text
        lines = [line for line in text.splitlines() if "retrying in" in line]
        assert len(lines) == 1 and reason in lines[0], text
        assert "Connection attempt failed" not in text
    finally:
        stop_process(site, timeout_s=30)
        if http is not None:
            stop_process(http)
        kill_tagged(tag)
    assert site.returncode == 0, log_file.read_text()  # SIGTERM stops it cleanly
    assert "site site_a stopped" in log_file.read_text()


def test_taken_ports_and_bad_addresses_fail_in_one_line(tmp_path, certs, site_data, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["coordinator", str(tmp_path / "run"), "--certs", str(certs), "--port",
                     str(port)]) == 2
        err = capsys.readouterr().err
        assert f"port {port} on 127.0.0.1 is taken" in err and len(err.splitlines()) == 1
        assert not (tmp_path / "run").exists()  # nothing written
        assert main(["site", "--superlink", "127.0.0.1:9092", "--ca", str(certs / "ca.crt"),
                     "--key", str(certs / "nodes" / "site_a"), "--data", str(site_data),
                     "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"port {port} on 127.0.0.1 is taken" in err and len(err.splitlines()) == 1
    assert main(["site", "--superlink", "https://127.0.0.1:9092", "--ca",
                 str(certs / "ca.crt"), "--key", str(certs / "nodes" / "site_a"), "--data",
                 str(site_data)]) == 2
    assert "without a scheme" in capsys.readouterr().err


def test_leftover_pool_folders_of_dead_supernodes_are_removed(tmp_path, monkeypatch):
    import tempfile

    from fed_ndif.runtime.site import POOL_PREFIX, clean_stale_pools

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{POOL_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{POOL_PREFIX}{os.getpid()}-def"
    for folder in (stale, live):
        (folder / "bin").mkdir(parents=True)
    assert clean_stale_pools() == [stale]
    assert not stale.exists() and live.exists()


HELPER = """import os, sys, time
parent = int(sys.argv[1])
while True:  # as Flower's SuperExec: ends once its parent no longer exists (a zombie does)
    time.sleep(0.2)
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        break
"""


@pytest.mark.multiprocess
def test_supervisor_reaps_a_supernode_whose_helper_still_holds_its_output(tmp_path,
                                                                          monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tag = new_tag()
    child = (f"import os, subprocess, sys; subprocess.Popen([sys.executable, '-c', {HELPER!r}, "
             "str(os.getpid())]); print('SuperNode ID: 5', flush=True)")
    supervisor = SiteSupervisor([sys.executable, "-c", child], {**os.environ, PROCESS_TAG: tag},
                                superlink=f"127.0.0.1:{free_port()}", ca=tmp_path / "ca.crt",
                                key=tmp_path / "site_a", name="site_a", port=9094)
    attempt = Attempt()
    runner = threading.Thread(target=supervisor._run_once, args=(attempt,), daemon=True)
    try:
        runner.start()
        runner.join(timeout=8)  # under EXIT_GRACE_S: the helper ended by itself
        assert not runner.is_alive(), "the supervisor waited for the helper's end of file"
        assert attempt.node_id == 5 and "exit code 0" in attempt.tail
    finally:
        kill_tagged(tag)


HEARTBEAT_401 = """Exception in thread Thread-3 (_run):
Traceback (most recent call last):
  File "/x/threading.py", line 982, in run
    INFO 2026-12-01 11:36:48,264:      SuperNode terminated gracefully.
self._target(*self._args, **self._kwargs)
  File "/x/flwr/supercore/protobuf/client.py", line 188, in send
    raise HTTPStatusError(message, request=request, response=self)
httpx.HTTPStatusError: Client error '401 Unauthorized' for url 'https://h:1/v1/fleet/send-node-heartbeat'
For more information check: https://developer.mozilla.org/en-US/docs/Web/HTTP/Status/401
INFO:     Shutting down"""


def test_supervisor_drops_flowers_401_traceback_and_keeps_others(tmp_path, capsys):
    supervisor = _supervisor(tmp_path)
    attempt = Attempt(node_id=1)  # admitted: lines pass at once
    for line in HEARTBEAT_401.splitlines():
        supervisor._line(f"{line}\n".encode(), attempt)
    assert capsys.readouterr().out == "INFO:     Shutting down\n"
    assert attempt.saw("SuperNode terminated gracefully")
    other = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
             "ValueError: bad node config"]
    for line in other:
        supervisor._line(f"{line}\n".encode(), attempt)
    assert capsys.readouterr().out.splitlines() == other


def test_resume_refuses_a_config_group_override_in_one_line(tmp_path):
    from fed_ndif.errors import FedNdifError
    from fed_ndif.runtime.coordinator import coordinator_config

    (tmp_path / "config.yaml").write_text("model:\n  name: tiny\nfl:\n  rounds: 2\n")
    with pytest.raises(FedNdifError, match="model=tiny: model is a config group"):
        coordinator_config(tmp_path, ["model=tiny"], resume=True)
    assert coordinator_config(tmp_path, ["fl.rounds=3"], resume=True)["fl"]["rounds"] == 3


def test_start_up_lines_wait_for_admission(tmp_path, capsys, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    supervisor = _supervisor(tmp_path)
    refused = Attempt()
    for line in (b"INFO : Starting Flower SuperNode\n", b"INFO:     Uvicorn running\n"):
        supervisor._line(line, refused)
    assert capsys.readouterr().out == ""  # a refused try repeats nothing of Flower's
    assert list(refused.pending) == ["INFO : Starting Flower SuperNode",
                                     "INFO:     Uvicorn running"]
    admitted = Attempt()
    for line in (b"INFO : Starting Flower SuperNode\n", b"INFO : SuperNode ID: 3\n"):
        supervisor._line(line, admitted)
    assert capsys.readouterr().out.splitlines() == ["INFO : Starting Flower SuperNode",
                                                    "INFO : SuperNode ID: 3"]

"""``fed-ndif serve`` against dcmtk's own tools (echoscu, storescu, storescp) on loopback.

Each test starts its node and destination on free ports and stops them itself; every wait has a
deadline. The checkpoint is tiny and the series small (24 slices of 64x64), the settle time 1 s.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.helpers.dicom_node import (
    PLANTED_STRINGS,
    build_assets,
    echoscu,
    identifiers,
    make_study,
    ports,
    received_series,
    start_node,
    start_storescp,
    storescu,
    tool,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("node")
    made = build_assets(root)
    made["study"] = make_study(made["pet"], root / "study")
    made["ct_only"] = make_study(made["pet"], root / "ct_only", pet=False)
    return made


@pytest.fixture
def run(tmp_path, request):
    """Starts processes for one test and stops whatever is still running at its end."""
    started = []

    class Run:
        node_port, pacs_port = ports()
        spool = tmp_path / "spool"
        pacs_dir = tmp_path / "pacs"
        node_log = tmp_path / "node.log"

        def node(self, assets, **kwargs):
            proc = start_node(checkpoint=assets["ckpt"], spool=self.spool, port=self.node_port,
                              destination_port=self.pacs_port, log=self.node_log, **kwargs)
            started.append(proc)
            return proc

        def pacs(self):
            proc = start_storescp(self.pacs_dir, self.pacs_port, tmp_path / "storescp.log")
            started.append(proc)
            return proc

        def log(self) -> str:
            return self.node_log.read_text() if self.node_log.exists() else ""

        def check_log_clean(self, *sent: Path):
            """No planted name, and no UID, date or file path of what was sent."""
            text = self.log()
            assert not [s for s in PLANTED_STRINGS if s in text], "patient data in the log"
            leaked = sorted(s for folder in sent for s in identifiers(folder) if s in text)
            assert leaked == [], f"identifiers in the log: {leaked[:5]}"

    yield Run()
    for proc in started:
        proc.stop()


def _spool_empty(spool: Path) -> bool:
    return all(not any((spool / state).iterdir()) for state in ("incoming", "work", "outbox"))


def _source_uids(folder: Path) -> tuple[str, str, int]:
    files = sorted(folder.rglob("*"))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), len(files)


def test_echo_and_calling_ae_allow_list(assets, run):
    node = run.node(assets, extra=["--allow", "ECHOSCU", "STORESCU"])
    assert echoscu(run.node_port).returncode == 0
    refused = echoscu(run.node_port, calling="INTRUDER")
    assert refused.returncode != 0
    assert "refused an association" in run.log() and "INTRUDER" in run.log()
    assert echoscu(run.node_port).returncode == 0  # still serving
    assert node.stop() == 0  # SIGTERM: a clean stop
    assert "stopped" in run.log()


def test_allow_any_is_accepted_only_by_name_and_warned_about(assets, run):
    run.node(assets, extra=["--allow-any"])
    assert echoscu(run.node_port, calling="ANYONE").returncode == 0
    start = next(line for line in run.log().splitlines() if "listening as NODE" in line)
    assert " WARNING " in start and "ANY calling AE title (--allow-any" in start
    assert "on 127.0.0.1:" in start


def test_study_in_derived_series_out_once(assets, run):
    """PET + CT of one study in; one derived PET series, conformant, in the study, out; sending
    the same series again gives the same series (same UIDs), and the spool ends empty."""
    run.pacs()
    run.node(assets, verbose=True)  # debug logging too must not show patient data
    sent = storescu(assets["study"], run.node_port)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    study_uid, source_series, nz = _source_uids(assets["study"] / "pet")
    got = wait_until(lambda: (s := received_series(run.pacs_dir))
                     and sum(map(len, s.values())) >= nz and s, 120,
                     "the derived series at storescp", run.node_log)
    assert len(got) == 1 and len(next(iter(got.values()))) == nz
    derived_uid = next(iter(got))
    assert derived_uid != source_series
    files = sorted(run.pacs_dir.iterdir())
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert str(header.StudyInstanceUID) == study_uid
    assert list(header.ImageType)[:2] == ["DERIVED", "PRIMARY"]
    problems = []
    for path in files:
        out = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True,
                             timeout=60)
        problems += [line for line in (out.stdout + out.stderr).splitlines()
                     if line.startswith("Error")]
    assert problems == []
    wait_until(lambda: "dropped" in run.log() and _spool_empty(run.spool), 30,
               "the CT series dropped and the spool emptied", run.node_log)
    log = run.log()
    for event in ("received from STORESCU", "ready:", "denoised:", "delivered:", "dropped:"):
        assert event in log, event
    assert "model on cpu, onnxruntime, 1 thread" in log  # the command's engine and threads
    # The same PET series again: the same derived UIDs, so still one series of nz instances.
    again = storescu(assets["study"] / "pet", run.node_port)
    assert again.returncode == 0
    wait_until(lambda: run.log().count("delivered:") >= 2, 120, "the second delivery",
               run.node_log)
    assert {k: len(v) for k, v in received_series(run.pacs_dir).items()} == {derived_uid: nz}
    # Our own output routed back to the node (a PACS rule, a re-sent study): never denoised
    # again, said once, nothing new delivered.
    returned = storescu(run.pacs_dir, run.node_port)
    assert returned.returncode == 0, returned.stdout + returned.stderr
    wait_until(lambda: "fed-ndif's own output" in run.log() and _spool_empty(run.spool), 60,
               "our own series dropped", run.node_log)
    log = run.log()
    assert log.count("fed-ndif's own output") == 1 and log.count("delivered:") == 2
    assert log.count("ready:") == 2  # the returned series was never taken for denoising
    assert {k: len(v) for k, v in received_series(run.pacs_dir).items()} == {derived_uid: nz}
    run.check_log_clean(assets["study"], run.pacs_dir)


def test_kill_9_after_receipt_still_delivers_one_series(assets, run):
    run.pacs()
    node = run.node(assets, settle_s=1.0)
    sent = storescu(assets["study"] / "pet", run.node_port)
    assert sent.returncode == 0
    node.signal(signal.SIGKILL)
    node.process.wait(timeout=10)
    run.node(assets, settle_s=1.0)
    _, _, nz = _source_uids(assets["study"] / "pet")
    wait_until(lambda: "delivered:" in run.log(), 120, "delivery after the restart",
               run.node_log)
    got = received_series(run.pacs_dir)
    assert len(got) == 1 and len(next(iter(got.values()))) == nz
    wait_until(lambda: _spool_empty(run.spool), 10, "an empty spool")
    run.check_log_clean(assets["study"] / "pet")


def test_destination_that_comes_up_later_gets_the_series(assets, run):
    run.node(assets)
    assert storescu(assets["study"] / "pet", run.node_port).returncode == 0
    wait_until(lambda: "retry:" in run.log(), 60, "a failed delivery", run.node_log)
    assert not received_series(run.pacs_dir)
    run.pacs()
    wait_until(lambda: "delivered:" in run.log(), 90, "delivery once storescp is up",
               run.node_log)
    _, _, nz = _source_uids(assets["study"] / "pet")
    got = received_series(run.pacs_dir)
    assert len(got) == 1 and len(next(iter(got.values()))) == nz
    run.check_log_clean(assets["study"] / "pet")


def test_ct_only_study_produces_nothing(assets, run):
    run.pacs()
    run.node(assets)
    assert storescu(assets["ct_only"], run.node_port).returncode == 0
    wait_until(lambda: "dropped:" in run.log(), 30, "the CT series dropped", run.node_log)
    wait_until(lambda: _spool_empty(run.spool), 10, "an empty spool")
    assert not received_series(run.pacs_dir)
    assert "denoised:" not in run.log()


def test_a_refused_series_goes_to_failed_and_the_node_keeps_serving(assets, run, tmp_path):
    """A PET series with a missing slice, and one whose SeriesDate is malformed: the reader
    refuses both; their files and reasons go to spool/failed/ (reason.txt stays there and says
    so), no UID, date, path or malformed value reaches the log, and the next (good) series is
    still denoised and delivered."""
    broken = tmp_path / "broken"
    shutil.copytree(assets["study"] / "pet", broken)
    middle = sorted(broken.iterdir())
    (middle[len(middle) // 2]).unlink()
    bad_date = tmp_path / "bad_date"
    bad_date.mkdir()
    series = pydicom.uid.generate_uid()
    for path in sorted((assets["study"] / "pet").iterdir()):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber = series, 77
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesDate = "1945X203"
        ds.save_as(bad_date / path.name)
    run.pacs()
    # A longer settle time: on a loaded machine storescu can pause a second between instances,
    # and a series taken before it is whole is refused for its gap instead.
    run.node(assets, settle_s=3.0)
    assert storescu(broken, run.node_port).returncode == 0
    assert storescu(bad_date, run.node_port).returncode == 0

    def refused() -> dict[str, str]:
        found = {}
        for folder in (run.spool / "failed").iterdir():
            if (folder / "reason.txt").is_file():
                found[folder.name] = (folder / "reason.txt").read_text()
        return found

    wait_until(lambda: len(refused()) == 2 and any("is malformed" in r
                                                   for r in refused().values()),
               120, "the refusals", run.node_log)
    reasons = refused()
    assert len(reasons) == 2 and all(r.startswith("Why fed-ndif refused") and
                                      "stays in the spool" in r for r in reasons.values())
    (missing,) = [p for p, r in reasons.items() if "missing slice" in r]
    assert len(list((run.spool / "failed" / missing).glob("*.dcm"))) == len(middle) - 1
    (dated,) = [r for r in reasons.values() if "SeriesDate/SeriesTime is malformed" in r]
    assert "not a valid DICOM date/time" in dated and "1945X203" not in dated
    assert "series 77 [" in run.log() and "1945X203" not in run.log()
    assert echoscu(run.node_port).returncode == 0
    # The same series complete (another SOP instance set): processed normally.
    assert storescu(assets["study"] / "pet", run.node_port).returncode == 0
    wait_until(lambda: "delivered:" in run.log(), 120, "the good series", run.node_log)
    run.check_log_clean(broken, bad_date, assets["study"] / "pet")


def test_sigterm_finishes_the_current_step_and_a_restart_continues(assets, run):
    """SIGTERM while a series is being denoised: the denoising finishes (its derived series is in
    the outbox, nothing is left in work/), the node exits 0, and the next start delivers it."""
    node = run.node(assets, steps=20)  # long enough for the signal to land mid-denoising
    assert storescu(assets["study"] / "pet", run.node_port).returncode == 0
    wait_until(lambda: "ready:" in run.log(), 60, "the series to be taken", run.node_log)
    node.signal(signal.SIGTERM)
    assert node.process.wait(timeout=120) == 0
    log = run.log()
    assert "denoised:" in log and log.rindex("stopped") > log.index("denoised:")
    assert not any((run.spool / "work").iterdir())
    assert len(list((run.spool / "outbox").iterdir())) == 1  # the destination was never up
    run.pacs()
    run.node(assets)
    wait_until(lambda: "delivered:" in run.log(), 60, "delivery after the restart",
               run.node_log)
    _, _, nz = _source_uids(assets["study"] / "pet")
    got = received_series(run.pacs_dir)
    assert len(got) == 1 and len(next(iter(got.values()))) == nz


def test_a_port_in_use_is_one_line_and_exit_2(assets, tmp_path, capsys):
    from fed_ndif.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--checkpoint", str(assets["ckpt"]), "--ae-title", "NODE",
                     "--host", "127.0.0.1", "--port", str(port), "--destination",
                     "PACS@127.0.0.1:104", "--spool", str(tmp_path / "spool"), "--device", "cpu",
                     "--allow", "STORESCU"])
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("fed-ndif serve:")]
    assert code == 2 and len(errors) == 1 and f"--port {port}" in errors[0], errors

"""The DICOM node's receiving side and spool, in process: what the sender is told, and what is
on disk, for good, corrupt and hostile instances, a full disk, an aborted association and TLS;
and the node's settings errors as the command reports them."""

from __future__ import annotations

import errno
import os
import ssl
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import PositronEmissionTomographyImageStorage, Verification

from fed_ndif.cli import main
from fed_ndif.errors import FedNdifError
from fed_ndif.node.config import NodeConfig, parse_destination, tls_contexts
from fed_ndif.node.deliver import MAX_BACKOFF_S, backoff_s
from fed_ndif.node.receive import (
    CANNOT_UNDERSTAND,
    NOT_MATCHING_SOP_CLASS,
    OUT_OF_RESOURCES,
    Receiver,
)
from fed_ndif.node.spool import INCOMING, OUTBOX, REASON_NOTE, WORK, Spool
from fed_ndif.runtime.processes import free_port
from tests.helpers.dicom_factory import make_series
from tests.helpers.dicom_node import tool

multiprocess = pytest.mark.multiprocess


@pytest.fixture
def node(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    receiver = Receiver(spool, ae_title="NODE", allow=["TESTSCU"])
    port = free_port()
    receiver.start("127.0.0.1", port)
    yield spool, port
    receiver.stop(grace_s=1)


@pytest.fixture
def series(tmp_path) -> list[Path]:
    return make_series(tmp_path / "pet").paths


def _associate(port: int, ssl_context: ssl.SSLContext | None = None):
    ae = AE(ae_title="TESTSCU")
    # Explicit VR only: a raw element of the test data set then travels as it is.
    ae.add_requested_context(PositronEmissionTomographyImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    tls = (ssl_context, "localhost") if ssl_context else None
    assoc = ae.associate("127.0.0.1", port, ae_title="NODE", tls_args=tls)
    assert assoc.is_established
    return assoc


def _store(port: int, ds: pydicom.Dataset) -> int:
    assoc = _associate(port)
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _files(spool: Spool) -> list[Path]:
    return sorted(p for p in (spool.root / INCOMING).rglob("*") if p.is_file())


@multiprocess
def test_a_stored_instance_is_in_the_spool_whole(node, series):
    spool, port = node
    ds = pydicom.dcmread(series[0])
    assert _store(port, ds) == 0
    key = spool.uid_key(str(ds.SeriesInstanceUID))
    stored = spool.folder(INCOMING, key) / spool.instance_name(str(ds.SOPInstanceUID))
    assert stored.is_file()
    again = pydicom.dcmread(stored)
    assert again.PixelData == ds.PixelData and again.SOPInstanceUID == ds.SOPInstanceUID
    meta = spool.meta(INCOMING, key)
    assert meta is not None and meta.modality == "PT" and meta.number == "3"
    assert [p.name for p in _files(spool)] == sorted([stored.name, "series.json"])


def _garbage_sequence(ds: pydicom.Dataset) -> None:
    """A sequence of undefined length whose bytes are not items (pydicom sends raw elements as
    they are): the rest of the data set cannot be parsed."""
    tag = Tag(0x0008, 0x1140)
    ds[tag] = RawDataElement(tag, "SQ", 0xFFFFFFFF, b"\xde\xad\xbe\xef" * 3, 0, False, True)


def _truncated_pixels(ds: pydicom.Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


@multiprocess
@pytest.mark.parametrize("corrupt", [_garbage_sequence, _truncated_pixels])
def test_a_corrupt_instance_gets_a_failure_status(node, series, corrupt):
    spool, port = node
    ds = pydicom.dcmread(series[0])
    corrupt(ds)
    assert _store(port, ds) == CANNOT_UNDERSTAND
    assert _files(spool) == []


@multiprocess
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_an_instance_with_a_hostile_uid_is_refused(node, series):
    spool, port = node
    ds = pydicom.dcmread(series[0])
    ds.SeriesInstanceUID = "../../../etc"
    assert _store(port, ds) == NOT_MATCHING_SOP_CLASS
    assert _files(spool) == []


@multiprocess
def test_a_full_disk_gets_a_failure_status_and_leaves_nothing(node, series, monkeypatch,
                                                               caplog):
    spool, port = node

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert _store(port, pydicom.dcmread(series[0])) == OUT_OF_RESOURCES
    assert not [p for p in (spool.root / INCOMING).rglob("*")]  # no folder, no part file
    assert "disk full" in caplog.text
    monkeypatch.undo()
    assert _store(port, pydicom.dcmread(series[0])) == 0  # space again: stored


@multiprocess
def test_an_aborted_association_keeps_what_was_acknowledged(node, series):
    spool, port = node
    assoc = _associate(port)
    for path in series[:2]:
        assert int(assoc.send_c_store(pydicom.dcmread(path)).Status) == 0
    assoc.abort()
    assert len([p for p in _files(spool) if p.suffix == ".dcm"]) == 2
    assert _store(port, pydicom.dcmread(series[2])) == 0  # still serving
    assert not [p for p in (spool.root / INCOMING).rglob(".*")]


def test_spool_recovery_after_a_crash(tmp_path):
    """What kill -9 can leave: a part-written instance, a staged output never renamed, a series
    both in work/ and outbox/ (crash between the two steps)."""
    spool = Spool(tmp_path)
    spool.prepare()
    key = spool.uid_key("1.2.3")
    spool.store(b"data", series_uid="1.2.3", sop_uid="1.2.3.4", study_uid="1.2",
                sop_class="1.2", modality="PT", number="5")
    (spool.folder(INCOMING, key) / ".tmp-abc.part").write_bytes(b"half")
    (spool.folder(OUTBOX) / f".{key}.tmp-x").mkdir()
    other = spool.uid_key("1.2.9")
    spool.folder(WORK, other).mkdir()
    spool.folder(OUTBOX, other).mkdir()
    restarted = Spool(tmp_path)
    restarted.prepare()
    assert sorted(p.name for p in spool.folder(INCOMING, key).iterdir()) == sorted(
        [spool.instance_name("1.2.3.4"), "series.json"])
    assert restarted.uid_key("1.2.3") == key  # the salt is kept: the same names after a restart
    assert restarted.keys(OUTBOX) == [other] and restarted.keys(WORK) == []
    assert not list(spool.folder(OUTBOX).glob(".*"))
    assert restarted.settled(0.0)[0][0].name == f"series 5 [{key[:8]}]"


def _make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client one, with openssl."""
    openssl = tool("openssl")
    folder.mkdir()

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=folder,
                       timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=test ca")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")
        (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext")
    return {name: folder / name for name in ("ca.crt", "server.crt", "server.key",
                                              "client.crt", "client.key")}


@multiprocess
def test_dicom_over_tls_with_client_certificates(tmp_path, series):
    certs = _make_certs(tmp_path / "certs")
    config = NodeConfig(checkpoint=Path("unused"), ae_title="NODE", port=1,
                        destination="PACS@127.0.0.1:104", spool=tmp_path / "spool",
                        tls_cert=certs["server.crt"], tls_key=certs["server.key"],
                        tls_ca=certs["ca.crt"])
    server_tls, _ = tls_contexts(config)
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    receiver = Receiver(spool, ae_title="NODE", allow=["TESTSCU", "ECHOSCU"],
                        ssl_context=server_tls)
    port = free_port()
    receiver.start("127.0.0.1", port)
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=certs["ca.crt"])
        client.load_cert_chain(certs["client.crt"], certs["client.key"])
        assoc = _associate(port, client)
        assert int(assoc.send_c_echo().Status) == 0
        assert int(assoc.send_c_store(pydicom.dcmread(series[0])).Status) == 0
        assoc.release()
        echoscu = tool("echoscu")
        with_tls = subprocess.run(
            [echoscu, "-aec", "NODE", "+tls", str(certs["client.key"]), str(certs["client.crt"]),
             "+cf", str(certs["ca.crt"]), "127.0.0.1", str(port)],
            capture_output=True, text=True, timeout=60)
        assert with_tls.returncode == 0, with_tls.stdout + with_tls.stderr
        plain = subprocess.run([echoscu, "-aec", "NODE", "127.0.0.1", str(port)],
                               capture_output=True, text=True, timeout=60)
        assert plain.returncode != 0
        no_client_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                                    cafile=certs["ca.crt"])
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        refused = ae.associate("127.0.0.1", port, ae_title="NODE",
                               tls_args=(no_client_cert, "localhost"))
        assert not refused.is_established
    finally:
        receiver.stop(grace_s=1)


def test_backoff_grows_to_at_most_a_minute():
    waits = [backoff_s(n) for n in range(1, 12)]
    assert waits[0] == 2 and waits == sorted(waits) and max(waits) == MAX_BACKOFF_S


def test_destination_is_parsed():
    dest = parse_destination("PACS@10.0.0.5:104")
    assert (dest.ae_title, dest.host, dest.port) == ("PACS", "10.0.0.5", 104)


@pytest.mark.parametrize("extra, message", [
    (["--destination", "PACS-10.0.0.5:104"], "expected AET@HOST:PORT"),
    (["--destination", "A_TITLE_THAT_IS_TOO_LONG@h:104"], "AE title"),
    (["--settle-seconds", "0"], "--settle-seconds"),
    (["--tls-cert", "{tmp}/missing.crt", "--tls-key", "{tmp}/k"], "no such file"),
    (["--tls-ca", "{tmp}/ca.crt"], "--tls-ca"),
    (["--port", "70000"], "a port is 1 to 65535"),
    (["--allow-any"], "--allow and --allow-any exclude each other"),
    ([], "checkpoint"),
])
def test_bad_settings_are_one_line_and_exit_2(extra, message, tmp_path, capsys):
    (tmp_path / "ca.crt").write_text("x")
    argv = ["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--ae-title", "NODE",
            "--port", "11112", "--destination", "PACS@127.0.0.1:104", "--spool",
            str(tmp_path / "spool"), "--allow", "SCANNER"]
    for option in [e.replace("{tmp}", str(tmp_path)) for e in extra]:
        argv.append(option)
    # Later options win in argparse: the case's value replaces the default one.
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("fed-ndif serve: error:"), errors
    assert message in errors[0], errors[0]
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("allow", [[], ["--allow", ","]])
def test_a_node_without_an_allow_list_refuses_to_start(allow, tmp_path, capsys):
    """Closed by default: neither --allow nor --allow-any is one line and exit 2, before the
    checkpoint is read or the spool made."""
    argv = ["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--ae-title", "NODE",
            "--port", "11112", "--destination", "PACS@127.0.0.1:104", "--spool",
            str(tmp_path / "spool"), *allow]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("fed-ndif serve: error: no sender is "
                                                     "allowed"), errors
    assert "--allow AET" in errors[0] and "--allow-any" in errors[0]
    assert not (tmp_path / "spool").exists()


def test_the_receiver_itself_refuses_an_empty_allow_list(tmp_path):
    with pytest.raises(ValueError):
        Receiver(Spool(tmp_path), ae_title="NODE")


def test_instances_that_arrive_during_denoising_rejoin_their_series(tmp_path):
    spool = Spool(tmp_path)
    spool.prepare()
    key = spool.uid_key("1.2.3")

    def store(sop: str) -> None:
        spool.store(sop.encode(), series_uid="1.2.3", sop_uid=sop, study_uid="1.2",
                    sop_class="1.2", modality="PT", number="5")

    store("1.1")
    store("1.2")
    assert spool.take(key)
    store("1.3")  # late: while the taken series is being denoised
    spool.requeue(key)
    assert spool.keys(WORK) == []
    assert [p.name for p in spool.instances(INCOMING, key)] == sorted(
        spool.instance_name(sop) for sop in ("1.1", "1.2", "1.3"))
    assert spool.settled(3600) == []  # it settles again from now


def _bare_node(tmp_path: Path):
    from fed_ndif.node.service import Node

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    config = NodeConfig(checkpoint=Path("unused"), ae_title="NODE", port=1,
                        destination="PACS@127.0.0.1:1", spool=spool.root, settle_s=0.01)
    return Node(config=config, model=None, destination=parse_destination(config.destination),
                spool=spool, receiver=None)


def _taken(node) -> str:
    node.spool.store(b"x", series_uid="1.2.3", sop_uid="1.1", study_uid="1.2",
                     sop_class="1.2.840.10008.5.1.4.1.1.128", modality="PT", number="7")
    key = node.spool.uid_key("1.2.3")
    assert node.spool.take(key)
    return key


def test_a_disk_error_while_denoising_keeps_the_series_and_pauses(tmp_path, monkeypatch, caplog):
    node = _bare_node(tmp_path)
    key = _taken(node)

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fed_ndif.node.service.denoise_study", disk_full)
    assert node.step()
    assert node.spool.keys(WORK) == [key]  # kept for later, not failed
    assert not any((node.spool.root / "failed").iterdir())
    assert "retry:" in caplog.text and "No space left" in caplog.text
    assert not node.step()  # paused: no busy loop over the same series


def test_a_series_the_reader_refuses_goes_to_failed_with_its_reason(tmp_path, caplog):
    node = _bare_node(tmp_path)
    key = _taken(node)
    # The model is never used: the file is not DICOM, and the reader refuses it first.
    node.model = SimpleNamespace(uncertainty=False, precision="fp32", batch_size=None,
                                 state=None, device=None)
    assert node.step()
    failed = node.spool.folder("failed", key)
    reason = (failed / "reason.txt").read_text()
    assert "DICOM" in reason and reason.startswith(REASON_NOTE)
    assert f"failed: series 7 [{key[:8]}]" in caplog.text
    # The log names no path (the spool's, the file's) and no UID; reason.txt's detail may.
    assert str(tmp_path) not in caplog.text and "1.2.3" not in caplog.text
    assert "<series>" in caplog.text and f"detail: {node.spool.root}" in reason


def test_an_implausible_liver_sends_the_series_to_failed(tmp_path, monkeypatch, caplog):
    """The liver check refuses the series (no override at a node): failed/ with its reason."""
    node = _bare_node(tmp_path)
    key = _taken(node)

    def implausible(*_args, **_kwargs):
        raise FedNdifError("automatic liver VOI is implausible: its centre lies 80 mm to the "
                           "patient's left of the body's midline; pass a liver mask "
                           "(--liver-mask) or the noise level (--nstd)")

    monkeypatch.setattr("fed_ndif.node.service.denoise_study", implausible)
    assert node.step()
    reason = (node.spool.folder("failed", key) / "reason.txt").read_text()
    assert "reason: automatic liver VOI is implausible" in reason
    assert node.spool.keys(WORK) == []
    assert f"failed: series 7 [{key[:8]}]: automatic liver VOI is implausible" in caplog.text

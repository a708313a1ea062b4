"""Running the DICOM node and dcmtk's tools on loopback for tests and the benchmark.

Every process is started in its own session and stopped by its id (never by name); every wait
has a deadline, so a broken node fails a test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage

from fed_ndif.runtime.processes import free_port

# Planted in every test study: none of it may ever reach the node's log.
PLANTED = {"PatientName": "Planted^Secretname^Zorro", "PatientID": "MRN-7741-PLANTED",
           "PatientBirthDate": "19450203"}
PLANTED_STRINGS = ("Secretname", "Zorro", "MRN-7741-PLANTED", "19450203")


def wait_until(condition: Callable[[], object], timeout_s: float, what: str,
               log: Path | None = None) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")


@dataclass
class Proc:
    process: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()
        return int(self.process.returncode)


def _start(command: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    handle = log.open("ab")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                               start_new_session=True, env=env)
    handle.close()
    return Proc(process, log)


def start_node(*, checkpoint: Path, spool: Path, port: int, destination_port: int, log: Path,
               settle_s: float = 1.0, extra: list[str] | None = None,
               verbose: bool = False, steps: int | None = 2, threads: int = 1,
               ready_timeout_s: float = 90.0) -> Proc:
    """``fed-ndif serve`` as NODE on 127.0.0.1, sending to PACS@127.0.0.1:destination_port."""
    command = [sys.executable, "-m", "fed_ndif.cli", *(["-v"] if verbose else []), "serve",
               "--checkpoint", str(checkpoint), "--ae-title", "NODE", "--host", "127.0.0.1",
               "--port", str(port),
               "--destination", f"PACS@127.0.0.1:{destination_port}", "--spool", str(spool),
               "--settle-seconds", str(settle_s), "--device", "cpu",
               "--threads", str(threads),
               *(["--steps", str(steps)] if steps else []), *(extra or [])]
    if not {"--allow", "--allow-any"} & set(extra or []):
        command += ["--allow", "STORESCU", "ECHOSCU"]  # dcmtk's default calling AE titles
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    node = _start(command, log, env)
    wait_until(lambda: "listening as NODE" in node.text() or node.process.poll() is not None,
               ready_timeout_s, "the node to listen", log)
    assert node.process.poll() is None, node.text()
    return node


def start_storescp(out: Path, port: int, log: Path) -> Proc:
    """dcmtk's storescp as the destination PACS (AE title PACS), all transfer syntaxes."""
    out.mkdir(parents=True, exist_ok=True)
    pacs = _start([tool("storescp"), "-aet", "PACS", "-od", str(out), "+xa", str(port)], log)
    wait_until(lambda: _listening(port), 20, "storescp to listen", log)
    return pacs


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def storescu(folder: Path, port: int, *, calling: str = "STORESCU",
             timeout_s: float = 120) -> subprocess.CompletedProcess:
    """``storescu +sd +r``: send a folder (recursively) to NODE, as a PACS would."""
    return subprocess.run([tool("storescu"), "-aet", calling, "-aec", "NODE", "+sd", "+r",
                           "127.0.0.1", str(port), str(folder)], capture_output=True, text=True,
                          timeout=timeout_s)


def echoscu(port: int, *, calling: str = "ECHOSCU") -> subprocess.CompletedProcess:
    return subprocess.run([tool("echoscu"), "-aet", calling, "-aec", "NODE", "127.0.0.1",
                           str(port)], capture_output=True, text=True, timeout=60)


def tool(name: str) -> str:
    """A dcmtk tool. pynetdicom installs console scripts of the same names (echoscu,
    storescu, ...) with other options into the environment's bin folder, so that folder is
    not searched."""
    own_bin = Path(sys.executable).parent.absolute()
    path = os.pathsep.join(folder for folder in os.environ.get("PATH", "").split(os.pathsep)
                           if folder and Path(folder).absolute() != own_bin)
    found = shutil.which(name, path=path)
    if found is None:
        import pytest

        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} is not installed, and CI must run this check")
        pytest.skip(f"{name} (dcmtk) is not installed")
    return found


def received_series(folder: Path) -> dict[str, set[str]]:
    """SeriesInstanceUID -> SOPInstanceUIDs of what storescp wrote."""
    series: dict[str, set[str]] = {}
    if not folder.is_dir():
        return series
    for path in folder.iterdir():
        if path.is_file():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            series.setdefault(str(ds.SeriesInstanceUID), set()).add(str(ds.SOPInstanceUID))
    return series


def identifiers(folder: Path) -> set[str]:
    """What identifies the sent study besides the planted names: its UIDs, its dates (as DICOM
    stores them and in ISO form) and its files' paths. None of it may reach the node's log."""
    found = {str(folder), str(folder.resolve())}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        found.add(str(path))
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                        "FrameOfReferenceUID"):
            if keyword in ds:
                found.add(str(ds[keyword].value))
        # (Not ContentDate: a derived series was made today, the date of the log's own stamps.)
        for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "PatientBirthDate"):
            text = str(ds.get(keyword, "") or "")
            if len(text) == 8 and text.isdigit():
                found |= {text, f"{text[:4]}-{text[4:6]}-{text[6:]}"}
            elif text:
                found.add(text)  # a malformed date, quoted as it is
    return found


def plant(ds: pydicom.Dataset) -> None:
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)


def make_study(pet_series: Path, out: Path, *, with_ct: bool = True,
               pet: bool = True, ct_slices: int = 3) -> Path:
    """A study folder as a PACS would send it: the PET series (copied, patient data planted)
    and a CT series of the same study, in subfolders."""
    from tests.helpers.dicom_factory import SeriesSpec, make_series

    out.mkdir(parents=True)
    study_uid = None
    for path in sorted(pet_series.iterdir()):
        ds = pydicom.dcmread(path)
        study_uid = str(ds.StudyInstanceUID)
        if pet:
            plant(ds)
            (out / "pet").mkdir(exist_ok=True)
            ds.save_as(out / "pet" / path.name)
    if with_ct:
        spec = SeriesSpec(nz=ct_slices, modality="CT", sop_class=str(CTImageStorage),
                          units=None, decay=None, description="CT WB",
                          study_uid=study_uid or SeriesSpec().study_uid)
        make_series(out / "ct", spec, edit=lambda _k, ds: plant(ds))
    return out


def ports() -> tuple[int, int]:
    first = free_port()
    second = free_port()
    while second == first:
        second = free_port()
    return first, second


def build_assets(root: Path) -> dict[str, Path]:
    """A tiny diffusion checkpoint and a small PET series (24 slices of 64x64) whose automatic
    liver VOI is found, so the node can denoise it without a mask."""
    from fed_ndif.data.sites import make_sites
    from fed_ndif.training.trainer import train_local

    manifests = make_sites(root / "sites", overrides=[
        "sites=tiny", "write_dicom=true", "sites.site_a.subjects=3", "sites.site_b.subjects=1",
        "sites.site_c.subjects=1", "sites.site_a.scanner.matrix=64",
        "sites.site_a.scanner.pixel_mm=6.25", "sites.site_a.scanner.slices=24",
        "sites.site_a.scanner.slice_mm=8", "sites.site_a.scanner.angles=64"])
    train_local(manifests[0], root / "train", overrides=[
        "model=tiny", "train.steps=2", "train.batch_size=2", "train.val_every=0",
        "train.val_max_studies=1", "train.device=cpu"])
    dicom = root / "sites" / "site_a" / "sub-001" / "dicom"
    return {"ckpt": root / "train" / "last.pt", "pet": dicom / "low_count_25pct",
            "pet_no_liver": dicom / "low_count_5pct"}

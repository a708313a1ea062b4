"""Latency of the DICOM node (``fed-ndif serve``): from the last instance of a PET series received
to the derived series delivered, against ``fed-ndif denoise`` on the same series.

    python benchmarks/node_latency.py --work runs/bench_node [--size 128x128x96]
        [--settle 10] [--threads 1] [--json results.json]

The series is a synthetic noisy phantom written as a PET DICOM series (``denoise_volume.py``'s
volume), the checkpoint the same ``model=small`` one (timing only; weights do not change the
cost), sampled with its default sampler. Both paths run on this machine's CPU with the same
threads. dcmtk's storescu sends the series to the node; dcmtk's storescp is the destination.
The requirement: latency <= denoise time + settle time + 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from denoise_volume import _parse_size, make_checkpoint, make_volume  # noqa: E402

from tests.helpers.dicom_node import (  # noqa: E402
    ports,
    received_series,
    start_node,
    start_storescp,
    storescu,
    wait_until,
)

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def make_series(size: tuple[int, int, int], work: Path) -> Path:
    """The benchmark volume as a PET DICOM series (Bq/ml with SUV tags)."""
    from fed_ndif.data.dicom import SyntheticPatient, write_pet_series
    from fed_ndif.data.nifti import load_nifti

    text = "x".join(map(str, size))
    out = work / "inputs" / f"{text}_dicom"
    if out.is_dir():
        return out
    volume = load_nifti(make_volume(size, work / "inputs" / f"{text}.nii.gz"))
    patient = SyntheticPatient(patient_id="BENCH", weight_kg=75.0, injected_dose_bq=370e6)
    write_pet_series(volume, out, template=None, synthetic_patient=patient,
                     series_description="benchmark low count",
                     derivation_description="synthetic phantom for the node benchmark")
    return out


def _stamp(line: str) -> float:
    match = _STAMP.match(line)
    assert match, line
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _event(log: str, prefix: str) -> tuple[float, str]:
    line = next(line for line in log.splitlines() if prefix in line)
    return _stamp(line), line


def measure_denoise(series: Path, ckpt: Path, work: Path, threads: int) -> dict:
    out = work / "denoise_out"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "fed_ndif.cli", "denoise", str(series), str(out),
                          "--checkpoint", str(ckpt), "--device", "cpu",
                          "--threads", str(threads)],
                         capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(run.stderr[-2000:])
    seconds = float(re.search(r"\n  ([0-9.]+) s \(", run.stderr).group(1))
    return {"denoise_command_wall_s": wall, "denoise_seconds": seconds}


def measure_node(series: Path, ckpt: Path, work: Path, settle: float, threads: int) -> dict:
    node_port, pacs_port = ports()
    for name in ("spool", "pacs", "node.log", "storescp.log"):
        path = work / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    pacs = start_storescp(work / "pacs", pacs_port, work / "storescp.log")
    node = start_node(checkpoint=ckpt, spool=work / "spool", port=node_port,
                      destination_port=pacs_port, log=work / "node.log", settle_s=settle,
                      steps=None,  # the checkpoint's sampler, as denoise uses it
                      threads=threads)
    try:
        nz = len(list(series.iterdir()))
        sent_start = time.time()
        sent = storescu(series, node_port, timeout_s=600)
        last_received = time.time()
        if sent.returncode != 0:
            raise SystemExit(sent.stdout + sent.stderr)
        wait_until(lambda: "delivered:" in node.text() or "failed:" in node.text(), 900,
                   "the delivery", node.log)
        log = node.text()
        delivered, _ = _event(log, "delivered:")
        got = received_series(work / "pacs")
        assert len(got) == 1 and len(next(iter(got.values()))) == nz, got
        _, denoised_line = _event(log, "denoised:")
        _, delivered_line = _event(log, "delivered:")
        return {
            "instances": nz, "send_seconds": last_received - sent_start,
            "settle_seconds": settle,
            "latency_seconds": delivered - last_received,
            "node_denoise_seconds": float(re.search(r" in ([0-9.]+) s", denoised_line)[1]),
            "delivery_seconds": float(re.search(r" in ([0-9.]+) s", delivered_line)[1]),
        }
    finally:
        node.stop()
        pacs.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench_node")
    parser.add_argument("--size", default="128x128x96", help="XxYxZ")
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads of both the "
                        "command and the node (default 1: on a 2-core machine shared with "
                        "other jobs, 2 threads oversubscribe the cores)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by both child processes
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(work)
    series = make_series(_parse_size(args.size), work)
    # The command both before and after the node: on a shared machine the load moves, and the
    # faster of the two is the fairer (stricter) bound.
    first = measure_denoise(series, ckpt, work, args.threads)
    record = {"size": args.size, "threads": args.threads,
              **measure_node(series, ckpt, work, args.settle, args.threads)}
    second = measure_denoise(series, ckpt, work, args.threads)
    record["denoise_seconds_runs"] = [first["denoise_seconds"], second["denoise_seconds"]]
    record["denoise_command_wall_s_runs"] = [first["denoise_command_wall_s"],
                                             second["denoise_command_wall_s"]]
    record["denoise_seconds"] = min(record["denoise_seconds_runs"])
    record["bound_seconds"] = record["denoise_seconds"] + args.settle + 10.0
    record["within_bound"] = record["latency_seconds"] <= record["bound_seconds"]
    # What the node adds beyond its own denoising and the settle time (robust to the load).
    record["overhead_seconds"] = (record["latency_seconds"] - record["node_denoise_seconds"]
                                  - args.settle)
    print(json.dumps(record, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

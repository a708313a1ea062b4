"""benchmarks/gpu.sh's one JSON and one markdown table: the claims of benchmarks/converge.py
with their intervals, each seed's plateau table, the model observer's table and the speed
numbers, with the device and the times they took. Whatever a stage did not finish is named as
missing, so a run cut short by its deadline still reports what it has.

    python benchmarks/gpu_summary.py WORK OUT --device cuda --experiment converge_gpu --seeds 3 \
        --claims-seconds 400 --total-seconds 520
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch


def section(report: Path, title: str) -> str | None:
    """A report.md section (heading to the next heading), or None when it is not there."""
    if not report.is_file():
        return None
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", report.read_text(),
                      re.MULTILINE | re.DOTALL)
    if not found:
        return None
    # The report's figures stay in its folder: gpu.md keeps the text and tables.
    return "\n".join(line for line in found.group(1).strip().splitlines()
                     if not line.startswith("!["))


def _device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def _speed_lines(speed: dict) -> list[str]:
    lines = []
    for row in speed.get("train_throughput", []):
        lines.append(f"- training, {row['kind']} {row['size']}² batch {row['batch']}: "
                     f"{row['stacks_per_s_median']:.1f} stacks/s")
    for row in speed.get("denoise", []):
        gpu = row.get("peak_gpu_mib")
        lines.append(f"- whole body {row['size']} ({row['sampler']}, {row['precision']}): "
                     f"{row['seconds']:.1f} s, of which sampling {row['sampling_seconds']:.1f} s; "
                     f"peak RSS {row['peak_rss_mib']:.0f} MiB"
                     + (f", peak GPU {gpu:.0f} MiB" if gpu is not None else ""))
    return lines


def summarize(work: Path, out: Path, *, device: str, experiment: str, seeds: int,
              claims_seconds: int, total_seconds: int) -> dict:
    claims_root = work / "claims"
    claims_file = claims_root / "claims.json"
    claims = json.loads(claims_file.read_text()) if claims_file.is_file() else None
    # converge.py writes the table beside the JSON; gpu.md takes it as it is.
    claims_table = claims_root / "claims.md"
    plateau = {f"s{k}": section(claims_root / f"s{k}" / "report.md", "Training curves")
               for k in range(seeds)}
    detectability = section(claims_root / "joined" / "report.md",
                            "Detectability of small lesions (channelized Hotelling observer)")
    speed = {p.stem: json.loads(p.read_text())
             for p in (work / "train_throughput.json", work / "denoise.json") if p.is_file()}
    summary = {"device": _device_name(device), "torch": torch.__version__,
               "experiment": experiment, "seeds": seeds, "claims_seconds": claims_seconds,
               "total_seconds": total_seconds, "claims": claims, "plateau": plateau,
               "detectability": detectability, "speed": speed}
    (out / "gpu.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# benchmarks/gpu.sh on {summary['device']} (torch {torch.__version__})", "",
             f"experiment={experiment}, {seeds} seeds; claims {claims_seconds} s, "
             f"all {total_seconds} s.", "", "## The method's claims", ""]
    lines += ([claims_table.read_text().rstrip()] if claims and claims_table.is_file()
              else ["missing: the claims did not finish (gpu.log, runs.tgz)"])
    for seed, table in plateau.items():
        lines += ["", f"## Training curves, seed {seed[1:]}", "", table or "missing"]
    lines += ["", "## Detectability (all seeds)", "", detectability or "missing",
              "", "## Speed", ""]
    lines += _speed_lines(speed) or ["missing"]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--seeds", type=int, required=True)
    parser.add_argument("--claims-seconds", type=int, required=True)
    parser.add_argument("--total-seconds", type=int, required=True)
    args = parser.parse_args()
    summarize(args.work, args.out, device=args.device, experiment=args.experiment,
              seeds=args.seeds, claims_seconds=args.claims_seconds,
              total_seconds=args.total_seconds)


if __name__ == "__main__":
    main()

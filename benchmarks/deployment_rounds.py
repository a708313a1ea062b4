"""Per-round overhead of a real deployment on 127.0.0.1 (issue 8): TLS, node authentication,
a SuperLink and three SuperNodes as separate processes, through the user-facing commands.

Overhead of a round = its wall time (``seconds`` in metrics.jsonl) minus the slowest site's
training time (``per_site[*].train_seconds``): message exchange, ClientApp start, aggregation.

Bytes of a round = everything the training step's messages carry, both ways (``train_bytes``;
in secure mode the four SecAgg+ exchanges).

    python benchmarks/deployment_rounds.py --rounds 3 [--no-warm-pool] [--poll-interval 3]
        [--secure] [--model tiny|small]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fed_ndif.data.sites import make_sites
from fed_ndif.runtime.processes import PROCESS_TAG, free_port, kill_tagged, new_tag, stop_process

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site_a", "site_b", "site_c")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--no-warm-pool", dest="warm_pool", action="store_false")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--secure", action="store_true", help="secure aggregation (SecAgg+)")
    parser.add_argument("--model", default="tiny", help="model config (tiny, small)")
    parser.add_argument("--json", help="also write the rounds here")
    parser.add_argument("--keep", help="copy the run folder and every process's log here")
    args = parser.parse_args()
    tag = new_tag()
    env = {**os.environ, "OMP_NUM_THREADS": "1", PROCESS_TAG: tag}
    started: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        certs, sites, run_dir = tmp / "certs", tmp / "sites", tmp / "run"
        subprocess.run([str(ROOT / "scripts" / "make-certs"), "-o", str(certs), *SITES],
                       check=True, capture_output=True)
        make_sites(sites, overrides=["sites=tiny"])
        port = free_port()
        register = [a for s in SITES for a in ("--register", str(certs / "nodes" / f"{s}.pub"))]
        cli = [sys.executable, "-m", "fed_ndif.cli"]

        def start(command: list[str], log_name: str) -> subprocess.Popen:
            with (tmp / log_name).open("ab") as out:
                process = subprocess.Popen(command, env=env, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            started.append(process)
            return process

        try:
            # Tiny sites have 40-50 training slice stacks: max_weight near that (secure mode).
            secure = ["fl.secagg.max_weight=100", "--secure-aggregation"] if args.secure else []
            coordinator = start([*cli, "coordinator", str(run_dir), f"model={args.model}",
                                 f"fl.rounds={args.rounds}", f"fl.local_steps={args.local_steps}",
                                 "fl.evaluate_max_studies=0", "logger.wandb_mode=disabled",
                                 "train.batch_size=2", *secure, "--certs", str(certs), "--port",
                                 str(port), *register], "coordinator.log")
            deadline = time.monotonic() + args.timeout
            while "ready: sites can connect" not in (tmp / "coordinator.log").read_text():
                if coordinator.poll() is not None or time.monotonic() > deadline:
                    sys.exit((tmp / "coordinator.log").read_text()[-3000:])
                time.sleep(0.5)
            for site in SITES:
                start([*cli, "site", "--superlink", f"127.0.0.1:{port}", "--ca",
                       str(certs / "ca.crt"), "--key", str(certs / "nodes" / site), "--data",
                       str(sites / site), "--device", "cpu", "--port", str(free_port()),
                       "--poll-interval", f"{args.poll_interval:g}",
                       *([] if args.warm_pool else ["--no-warm-pool"])], f"{site}.log")
            coordinator.wait(timeout=max(1.0, deadline - time.monotonic()))
            if coordinator.returncode != 0:
                sys.exit((tmp / "coordinator.log").read_text()[-3000:])
            rounds = [json.loads(line) for line in
                      (run_dir / "metrics.jsonl").read_text().splitlines()]
        finally:
            for process in started:
                stop_process(process)
            kill_tagged(tag)
            if args.keep:
                shutil.copytree(tmp, args.keep, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("sites", "certs"))
    print(f"warm pool: {args.warm_pool}, SuperNode poll: {args.poll_interval:g} s, "
          f"secure aggregation: {args.secure}, model {args.model}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| round | sites | wall s | slowest site training s | overhead s | MB sent "
          "| MB received |")
    print("|---|---|---|---|---|---|---|")
    for r in rounds:
        slowest = max(m["train_seconds"] for m in r["per_site"].values())
        r["overhead_s"] = r["seconds"] - slowest
        wire = r.get("train_bytes", {})
        print(f"| {r['round']} | {len(r['sites'])} | {r['seconds']:.1f} | {slowest:.1f} | "
              f"{r['overhead_s']:.1f} | {wire.get('sent', 0) / 1e6:.2f} | "
              f"{wire.get('received', 0) / 1e6:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()

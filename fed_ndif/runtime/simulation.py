"""A Flower simulation of the federation on 127.0.0.1, for ``fed-ndif simulate``.

The federation runs through ``flwr run`` against a SuperLink in simulation mode started on a
free loopback port (no runtime ``uv sync``, its own FLWR_HOME inside the work folder) and
stopped by its process id: the same ServerApp and ClientApps as a real deployment, on Flower's
simulation engine (Ray), one virtual node per site.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import tomli_w
from tqdm import tqdm

from fed_ndif.run_config import pyproject_app_config
from fed_ndif.runtime.processes import flower_env, write_connection
from fed_ndif.runtime.superlink import flwr_run, superlink
from fed_ndif.server.federation import ROUND_RECORD, rounds_recorded

log = logging.getLogger(__name__)

CONNECTION = "simulation"


def run_flower_simulation(fed: dict[str, Any], *, n_sites: int, cpus_per_site: float,
                          gpus_per_site: float, work_dir: Path, name: str = "federation") -> None:
    """``flwr run`` the fed-ndif app over ``n_sites`` virtual nodes with run config ``fed``.

    Flower's, Ray's and wandb's own output goes to the log file only; the console shows a
    progress bar over the federated rounds, read from the run's metrics as they are written.
    """
    flwr_home = work_dir / ".flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    logs = work_dir / "logs"
    run_config = work_dir / "run_config.toml"
    run_config.write_text(tomli_w.dumps(pyproject_app_config(fed)))
    with superlink(flwr_home=flwr_home, log_file=logs / "superlink.log", simulation=True,
                   database=flwr_home / "state.db") as address:
        write_connection(flwr_home, address, root_certificates=None, name=CONNECTION)
        federation = (f"num-supernodes={n_sites} client-resources-num-cpus={cpus_per_site:g} "
                      f"client-resources-num-gpus={gpus_per_site:g}")
        env = flower_env(flwr_home, OMP_NUM_THREADS=os.environ.get(
            "OMP_NUM_THREADS", str(max(1, int(cpus_per_site)))))
        log.info("running %d simulated sites with Flower (logs in %s)", n_sites, logs)
        run_dir = Path(fed["run_dir"])
        total = int(fed["fl"]["rounds"])
        record = run_dir / ROUND_RECORD
        with tqdm(total=total, initial=rounds_recorded(run_dir), desc=name, unit="round") as bar:
            seen = {"size": -1}

            def follow(_line: bytes) -> None:
                """Re-read the round record only when it grew: this runs on every output line."""
                size = record.stat().st_size if record.is_file() else 0
                if size != seen["size"]:
                    seen["size"] = size
                    bar.update(rounds_recorded(run_dir) - bar.n)

            flwr_run(CONNECTION, run_config, env, logs / "flwr-run.log",
                     "--federation-config", federation, echo=False, on_line=follow)
            follow(b"")

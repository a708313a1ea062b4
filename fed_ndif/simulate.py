"""``fed-ndif simulate``: synthetic sites + a Flower simulation of the federation, one run folder.

The federation runs through ``flwr run`` against a SuperLink in simulation mode that this module
starts on 127.0.0.1 (free ports, no runtime ``uv sync``, its own FLWR_HOME inside the run folder)
and stops by its process id: the same ServerApp and ClientApps as a real deployment, on Flower's
simulation engine (Ray), one virtual node per site.

The stages after the sites (federations, personalization, baselines, evaluation, report) and the
run folder's layout are in :mod:`fed_ndif.experiment`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tomli_w
from omegaconf import DictConfig, OmegaConf

from fed_ndif.config import load_config
from fed_ndif.data.sites import SITE_CONFIG_KEYS, write_sites
from fed_ndif.errors import FedNdifError
from fed_ndif.launch import (
    PROCESS_TAG,
    flower_command,
    flower_env,
    free_port,
    kill_tagged,
    new_tag,
    project_root,
    stop_process,
    stream_process,
    wait_for_port,
)
from fed_ndif.run_config import pyproject_app_config

log = logging.getLogger(__name__)

FEDERATED_KEYS = ("model", "diffusion", "train", "data", "fl", "logger", "run_dir")
__all__ = ["PROCESS_TAG", "federated_config", "local_superlink", "project_root",
           "run_flower_simulation", "simulate"]


def federated_config(cfg: DictConfig, *, sites_dir: Path, run_dir: Path) -> dict[str, Any]:
    """The federated part of a simulate config, pointed at the run folder's sites."""
    fed = OmegaConf.to_container(cfg, resolve=True)
    fed = {key: fed[key] for key in FEDERATED_KEYS}
    sites = list(cfg.sites.keys())
    fed["run_dir"] = str(run_dir)
    fed["data"]["root"] = str(sites_dir)
    fed["data"]["sites"] = sites
    fed["fl"]["min_sites"] = len(sites)
    return fed


@contextlib.contextmanager
def local_superlink(flwr_home: Path, logs: Path) -> Iterator[str]:
    """A SuperLink in simulation mode on a free loopback port; yields its address."""
    # Flower 1.42 serves the Control, Fleet and Runtime APIs on one HTTP port.
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / "superlink.log"
    command = [
        flower_command("flower-superlink"), "--insecure", "--simulation", "--isolation",
        "subprocess", "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
        "--port", str(port), "--database", str(flwr_home / "state.db"),
    ]
    # Every process the SuperLink spawns (SuperExec, simulation, Ray workers) inherits this
    # tag, so the ones that outlive it can be found and stopped too.
    tag = new_tag()
    env = flower_env(flwr_home, **{PROCESS_TAG: tag})
    with log_file.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_for_port(port, process, log_file)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(process)
        kill_tagged(tag)


def run_flower_simulation(fed: dict[str, Any], *, n_sites: int, cpus_per_site: float,
                          gpus_per_site: float, work_dir: Path) -> None:
    """``flwr run`` the fed-ndif app over ``n_sites`` virtual nodes with run config ``fed``."""
    flwr_home = work_dir / ".flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    run_config = work_dir / "run_config.toml"
    run_config.write_text(tomli_w.dumps(pyproject_app_config(fed)))
    with local_superlink(flwr_home, work_dir / "logs") as address:
        (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {
            "default": "simulation",
            "simulation": {"address": address, "insecure": True},
        }}))
        federation = (f"num-supernodes={n_sites} client-resources-num-cpus={cpus_per_site:g} "
                      f"client-resources-num-gpus={gpus_per_site:g}")
        command = [flower_command("flwr"), "run", str(project_root()), "simulation",
                   "--stream", "--run-config", str(run_config), "--federation-config", federation]
        env = flower_env(flwr_home, OMP_NUM_THREADS=os.environ.get(
            "OMP_NUM_THREADS", str(max(1, int(cpus_per_site)))))
        log.info("running %d simulated sites with Flower (logs in %s)", n_sites,
                 work_dir / "logs")
        returncode = stream_process(command, env, work_dir / "logs" / "flwr-run.log")
    if returncode != 0:
        raise FedNdifError(f"the Flower run failed (exit {returncode}); see "
                           f"{work_dir / 'logs' / 'flwr-run.log'}")


def simulate(overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Make the sites if missing, then every stage of the comparison; return report.md."""
    from fed_ndif.experiment import run_experiment

    cfg = load_config("simulate", overrides)
    out_dir = Path(cfg.out_dir).resolve()
    sites_dir = out_dir / "sites"
    out_dir.mkdir(parents=True, exist_ok=True)
    site_cfg = OmegaConf.create({key: cfg[key] for key in SITE_CONFIG_KEYS if key in cfg})
    if sites_dir.exists():
        made = OmegaConf.load(sites_dir / "config.yaml") if (
            sites_dir / "config.yaml").is_file() else None
        if made != site_cfg:
            raise FedNdifError(f"{sites_dir} holds sites made with other settings; use a new "
                               "out_dir or delete that folder")
        log.info("using the existing sites in %s", sites_dir)
    else:
        write_sites(sites_dir, cfg)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    report = run_experiment(cfg, out_dir, sites_dir)
    log.info("report: %s", report)
    return report

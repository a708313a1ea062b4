"""The Flower app as `flwr run` sees it: pyproject config, and a real simulation with Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tomllib

from fed_ndif.cli import main
from fed_ndif.config import load_config
from fed_ndif.run_config import pyproject_app_config
from fed_ndif.simulate import PROCESS_TAG

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_mirrors_the_hydra_config():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fed_ndif.server.app:app",
                                 "clientapp": "fed_ndif.client.app:app"}
    assert app["config"] == pyproject_app_config(load_config("federated")), (
        "pyproject.toml is out of date: run scripts/sync-flwr-config")


def test_simulate_refuses_sites_made_with_other_settings(tmp_path, capsys):
    from fed_ndif.data.sites import make_sites

    make_sites(tmp_path / "sites", overrides=["sites=tiny", "seed=5"])
    assert main(["simulate", "experiment=tiny", f"out_dir={tmp_path}"]) == 2
    assert "other settings" in capsys.readouterr().err


def _tagged_processes() -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if PROCESS_TAG.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.multiprocess
def test_simulate_runs_a_real_flower_simulation_over_three_sites(tmp_path):
    run = tmp_path / "run"
    assert main(["simulate", "experiment=tiny", f"out_dir={run}", "fl.evaluate_max_studies=0",
                 "logger.wandb_mode=disabled"]) == 0
    checkpoints = sorted(p.name for p in (run / "federated" / "checkpoints").iterdir())
    assert checkpoints == [f"global-round-000{r}.pt" for r in range(3)]
    rounds = [json.loads(x) for x in (run / "federated" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["sites"] == ["site_a", "site_b", "site_c"] for r in rounds)
    assert (run / "sites" / "site_a" / "manifest.csv").is_file()
    assert (run / "config.yaml").is_file() and (run / "run_config.toml").is_file()
    assert _tagged_processes() == [], "processes of the simulation outlived it"
    assert os.environ.get(PROCESS_TAG) is None

"""The Flower app as `flwr run` sees it: pyproject config, and a real simulation with Ray."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import numpy as np
import pytest

from fed_ndif.checkpoints import read_checkpoint
from fed_ndif.cli import main
from fed_ndif.config import load_config
from fed_ndif.run_config import pyproject_app_config
from fed_ndif.runtime.processes import PROCESS_TAG

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


def test_simulate_refuses_an_unknown_engine(tmp_path, capsys):
    assert main(["simulate", "experiment=tiny", f"out_dir={tmp_path}",
                 "simulation.engine=spark"]) == 2
    assert "simulation.engine" in capsys.readouterr().err
    assert not (tmp_path / "federated").exists()


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
def test_simulate_runs_real_flower_simulations_and_reports_from_their_data(tmp_path, capfd):
    """experiment=tiny end to end: three Flower simulations (Ray), fine-tuning, local and
    pooled training, baselines, evaluation and the report."""
    run = tmp_path / "run"
    assert main(["simulate", "experiment=tiny", f"out_dir={run}", "compare.val_every=5",
                 "logger.wandb_mode=offline"]) == 0
    # Equal budgets: 2 rounds of 5 steps + 5 fine-tuning steps = 3 rounds for the federations.
    for federation in ("fedndif", "fedavg_unet", "fedavg_no_nstd"):
        checkpoints = sorted(p.name for p in
                             (run / "federated" / federation / "checkpoints").iterdir())
        assert checkpoints == [f"global-round-000{r}.pt" for r in range(4)]
    rounds = [json.loads(x) for x in
              (run / "federated" / "fedndif" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    personalized = (run / "personalized" / "site_a" / "config.yaml").read_text()
    assert "global-round-0002.pt" in personalized  # fine-tuned from the round before the last
    # The console shows the experiment's progress; Flower's, Ray's and wandb's chatter is in
    # the federations' log files.
    console = "".join(capfd.readouterr())
    assert "federation fedndif" in console
    for chatter in ("configure_train", "wandb:", "FutureWarning", "Successfully installed"):
        assert chatter not in console, chatter
    assert "configure_train" in (run / "federated" / ".fedndif" / "logs" /
                                 "flwr-run.log").read_text()
    assert all(r["sites"] == ["site_a", "site_b", "site_c"] for r in rounds)
    assert _tagged_processes() == [], "processes of the simulation outlived it"

    # Every cell of the report comes from metrics.csv of this run.
    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    methods = {r["method"] for r in rows}
    assert methods == {"input", "noise_free", "gaussian", "nlm", "local", "fedavg_unet",
                       "fedavg_no_nstd", "fedndif_global", "fedndif_personalized", "pooled"}
    assert {r["site"] for r in rows} == {"site_a", "site_b", "site_c"}
    report = (run / "report.md").read_text()
    for method in methods:
        mine = [float(r["psnr"]) for r in rows if r["method"] == method]
        labels = {r["label"] for r in rows if r["method"] == method}
        label = labels.pop() if len(labels) == 1 else (
            f"{sorted(labels)[0].split(' (')[0]} (tuned per site)")
        line = next(x for x in report.splitlines() if x.startswith(f"| {label} |"))
        assert line.split("|")[3].strip().startswith(f"{np.mean(mine):.2f}"), (method, line)
    for words in ("SUVpeak", "noise-free", "95 % CI", "≥ 10 mm", "< 10 mm", "| budget |"):
        assert words in report, words
    # Every learned method's validation curve, on steps per site: local-only 15 steps and
    # pooled 45 steps validated every 5 per site, fine-tuning after the 10 federated steps.
    curves = report.split("## Training curves")[1].split("## ")[0]
    for name, points, steps in (("Fed-NDIF global", 3, 15), ("FedAvg U-Net", 3, 15),
                                ("Local-only diffusion (site_a)", 3, 15),
                                ("Pooled diffusion (upper bound)", 3, 15)):
        assert f"| {name} | {points} | {steps} |" in curves, (name, curves)
    assert "| Fed-NDIF personalized (site_a) |" in curves
    for figure in ("metrics_vs_count_level", "training_curves", "lesion_site_a"):
        assert (run / "figures" / f"{figure}.png").stat().st_size > 5_000
    assert (run / "config.yaml").is_file()
    for site in ("site_a", "site_b", "site_c"):
        assert (run / "personalized" / site / "last.pt").is_file()
        assert (run / "local" / site / "last.pt").is_file()
    assert (run / "pooled" / "last.pt").is_file()

    # A second call finds every stage done and only re-reads the results.
    before = (run / "metrics.csv").stat().st_mtime_ns
    assert main(["simulate", "experiment=tiny", f"out_dir={run}",
                 "logger.wandb_mode=disabled"]) == 0
    assert (run / "metrics.csv").stat().st_mtime_ns == before

    # The in-process engine runs the same apps without Ray or a SuperLink: the same global
    # models (up to float summation order), no Flower processes or logs.
    inprocess = tmp_path / "inprocess"
    shutil.copytree(run / "sites", inprocess / "sites")
    assert main(["simulate", "experiment=tiny", f"out_dir={inprocess}",
                 "simulation.engine=inprocess", "compare.methods=[input,fedndif_global]",
                 "logger.wandb_mode=disabled"]) == 0
    assert not (inprocess / "federated" / ".fedndif" / "logs").exists()
    for server_round in (1, 3):
        name = f"global-round-000{server_round}.pt"
        flower = read_checkpoint(run / "federated" / "fedndif" / "checkpoints" / name)["model"]
        mine = read_checkpoint(inprocess / "federated" / "fedndif" / "checkpoints" / name)["model"]
        assert flower.keys() == mine.keys()
        for key in flower:
            np.testing.assert_allclose(mine[key].numpy(), flower[key].numpy(), rtol=1e-4,
                                       atol=1e-6, err_msg=key)
    assert _tagged_processes() == []


@pytest.mark.slow
@pytest.mark.multiprocess
def test_secure_aggregation_runs_in_a_flower_simulation(tmp_path):
    """fl.secure_aggregation=true on Flower's simulation engine (Ray): the SecAgg+ mod keeps its
    keys in each virtual node's context across the four messages of a round."""
    from fed_ndif.data.sites import make_sites
    from fed_ndif.runtime.simulation import run_flower_simulation

    sites = ["site_a", "site_b", "site_c"]
    make_sites(tmp_path / "sites", overrides=["sites=tiny"])
    run_dir = tmp_path / "run"
    cfg = load_config("federated", [
        "model=tiny", "fl.rounds=2", "fl.local_steps=2", "train.batch_size=4",
        "fl.evaluate_max_studies=0", f"data.root={tmp_path / 'sites'}",
        f"data.sites=[{','.join(sites)}]", f"run_dir={run_dir}", "logger.wandb_mode=disabled",
        "fl.secure_aggregation=true", "fl.secagg.max_weight=100"])
    from omegaconf import OmegaConf

    run_flower_simulation(OmegaConf.to_container(cfg, resolve=True), n_sites=3,
                          cpus_per_site=1, gpus_per_site=0, work_dir=tmp_path / "work")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["secure_aggregation"] and record["sites"] == sites, record
    log = (tmp_path / "work" / "logs" / "flwr-run.log").read_text()
    assert log.count("Secure aggregation completed") == 2

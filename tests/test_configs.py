"""Every shipped config composes, and what it composes to is usable by the code that reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fed_ndif.checkpoints import build_state, sampler_config
from fed_ndif.config import load_config
from fed_ndif.data.sites import parse_sites
from fed_ndif.errors import FedNdifError
from fed_ndif.experiment import LABELS, Budget
from fed_ndif.run_config import federated_config, from_run_config, to_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def test_the_shipped_experiments_are_all_here():
    # A new experiment file is picked up by the parametrized test below without editing it.
    assert {"tiny", "demo", "cpu_hour", "gpu"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_into_a_runnable_simulation(experiment, tmp_path):
    cfg = load_config("simulate", [f"experiment={experiment}"])
    specs = parse_sites(cfg)  # every site and scanner is valid
    assert specs and all(s.subjects >= 1 for s in specs)
    assert set(cfg.compare.methods) <= set(LABELS), cfg.compare.methods
    fed = federated_config(cfg, sites_dir=tmp_path / "sites", run_dir=tmp_path / "run")
    assert fed["fl"]["min_sites"] == len(specs)
    # The federated part survives Flower's flat run config unchanged, and Flower knows every
    # key it sends (it refuses a run-config key that pyproject.toml does not declare).
    assert from_run_config(to_run_config(fed)) == fed
    declared = to_run_config(load_config("federated"))
    assert set(to_run_config(fed)) <= set(declared), set(to_run_config(fed)) - set(declared)
    sampler = sampler_config(fed)
    assert sampler.steps >= 1 and sampler.samples >= 1
    budget = Budget.from_config(cfg)  # every learned method can get it
    assert budget.federated_rounds * budget.local_steps == budget.per_site
    assert budget.megapixels > 0 and budget.sites == len(specs)
    state = build_state({**fed, "train": {**fed["train"], "device": "cpu"}})
    assert state.kind == fed["model"]["kind"]
    assert sum(p.numel() for p in state.model.parameters()) > 0


@pytest.mark.parametrize("name", ["train_local", "federated", "make_sites", "simulate"])
def test_top_level_configs_compose(name):
    cfg = load_config(name, [])
    assert OmegaConf.to_container(cfg, resolve=True)


def test_a_budget_that_cannot_be_shared_equally_is_refused():
    with pytest.raises(FedNdifError, match=r"multiple of fl\.local_steps"):
        Budget(pixels=(64 ** 2,) * 3, rounds=3, local_steps=40, finetune_steps=50, batch=8)


def test_the_budget_counts_pixels_so_patches_cost_what_they_compute():
    cfg = load_config("simulate", ["experiment=scarce"])
    patches = Budget.from_config(cfg)
    slices = Budget.from_config(load_config("simulate", ["experiment=scarce",
                                                         "data.patch_size=null"]))
    matrices = [s.scanner.matrix for s in parse_sites(cfg)]
    assert patches.pixels == (64 ** 2,) * 3 and slices.pixels == tuple(m * m for m in matrices)
    assert slices.megapixels / patches.megapixels == pytest.approx(
        sum(m * m for m in matrices) / (3 * 64 ** 2))

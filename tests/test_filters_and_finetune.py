"""Classical baselines tuned on validation; fine-tuning and evaluation commands on a tiny site."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fed_ndif.checkpoints import read_checkpoint
from fed_ndif.cli import main
from fed_ndif.data.sites import make_sites
from fed_ndif.evaluation.filters import tune_filter
from fed_ndif.training.trainer import train_local


def test_tuned_gaussian_smooths_noise_and_leaves_clean_data_nearly_alone():
    rng = np.random.default_rng(0)
    _, y, x = np.mgrid[:12, :24, :24]
    truth = 2.0 + 6.0 * (((y - 12) ** 2 + (x - 12) ** 2) < 25)
    noisy = [(truth + rng.normal(0, 1.0, truth.shape), truth, (4.0, 4.0, 4.0)) for _ in range(2)]
    tuned = tune_filter("gaussian", noisy)
    assert tuned.value >= 4.0  # heavy noise: a wide filter wins
    clean = [(truth + rng.normal(0, 0.01, truth.shape), truth, (4.0, 4.0, 4.0))]
    assert tune_filter("gaussian", clean).value == 2.0  # the smallest width on the grid


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    make_sites(root / "sites", overrides=["sites=tiny", "sites.site_b.subjects=1",
                                          "sites.site_c.subjects=1"])
    manifest = root / "sites" / "site_a" / "manifest.csv"
    train_local(manifest, root / "global", overrides=[
        "model=tiny", "train.steps=3", "train.batch_size=2", "train.val_every=0",
        "diffusion.sampler.steps=2"])
    return root, manifest


def test_finetune_starts_from_the_checkpoint_and_keeps_its_settings(site, tmp_path):
    root, manifest = site
    out = tmp_path / "personal"
    assert main(["finetune", str(root / "global" / "last.pt"), str(manifest), str(out),
                 "--steps", "2", "--lr", "1e-3"]) == 0
    tuned, base = read_checkpoint(out / "last.pt"), read_checkpoint(root / "global" / "last.pt")
    assert tuned["step"] == 2 and tuned["config"]["train"]["lr"] == 1e-3
    assert tuned["config"]["model"] == base["config"]["model"]
    assert tuned["normalization"] == base["normalization"]
    changed = [n for n in base["model"] if not np.array_equal(base["ema"]["weights"][n].numpy(),
                                                               tuned["model"][n].numpy())]
    assert changed  # it trained
    assert main(["finetune", str(root / "global" / "last.pt"), str(manifest), str(out)]) == 2


def test_evaluate_scores_input_filters_and_models_on_the_test_split(site, tmp_path, capsys):
    root, manifest = site
    out = tmp_path / "eval"
    assert main(["evaluate", str(manifest), str(out), "--model",
                 f"mine={root / 'global' / 'last.pt'}"]) == 0
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    # make-sites writes a noise-free reference, so it is scored as well
    assert {r["method"] for r in rows} == {"input", "noise_free", "gaussian", "nlm", "mine"}
    assert {r["subject"] for r in rows} == {"sub-003"}  # the site's only test subject
    report = (out / "report.md").read_text()
    psnr = np.mean([float(r["psnr"]) for r in rows if r["method"] == "mine"])
    assert f"{psnr:.2f}" in report
    assert main(["evaluate", str(manifest), str(out)]) == 2  # not empty: refused
    paired = tmp_path / "paired"
    assert main(["evaluate", str(manifest), str(paired), "--no-filters", "--model",
                 f"mine={root / 'global' / 'last.pt'}", "--reference", "mine"]) == 0
    report = (paired / "report.md").read_text()
    assert "Paired differences against mine" in report
    assert "too few subjects" in report  # the tiny site has one test subject
    assert (paired / "figures" / "paired_differences.png").is_file()
    assert main(["evaluate", str(manifest), str(tmp_path / "z"), "--no-filters",
                 "--count-level", "0.33"]) == 2
    assert "no studies in split test at count levels [0.33]" in capsys.readouterr().err
    assert main(["evaluate", str(manifest), str(tmp_path / "y"), "--model",
                 f"mine={root / 'global' / 'last.pt'}", "--reference", "gaussian"]) == 2
    assert "--reference gaussian: not one of the --model names" in capsys.readouterr().err
    assert main(["evaluate", str(manifest), str(tmp_path / "x"), "--model", "bad"]) == 2
    assert "NAME=CHECKPOINT" in capsys.readouterr().err


def test_evaluate_refuses_a_missing_checkpoint(site, tmp_path, capsys):
    _, manifest = site
    assert main(["evaluate", str(manifest), str(tmp_path / "e"), "--model",
                 f"m={tmp_path / 'nope.pt'}"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_finetune_keeps_the_global_model_when_no_step_beats_it_on_validation(site, tmp_path):
    root, manifest = site
    good, bad = tmp_path / "good", tmp_path / "bad"
    start = root / "global" / "last.pt"
    # A learning rate that wrecks the network: no fine-tuned step can beat the start.
    assert main(["finetune", str(start), str(manifest), str(bad), "--steps", "4", "--lr", "0.3",
                 "--val-every", "2", "--patience", "1"]) == 0
    chosen = json.loads((bad / "selection.json").read_text())
    assert chosen["kept_start"] and chosen["best_step"] == 0
    kept, base = read_checkpoint(bad / "best.pt"), read_checkpoint(start)
    for name, value in base["ema"]["weights"].items():
        assert np.array_equal(kept["ema"]["weights"][name].numpy(), value.numpy()), name
    # patience 1: one check without a gain (step 2) and it stops, before step 4
    assert read_checkpoint(bad / "last.pt")["step"] == 2
    # A sane one records its choice and keeps that step's model.
    assert main(["finetune", str(start), str(manifest), str(good), "--steps", "4",
                 "--val-every", "2"]) == 0
    chosen = json.loads((good / "selection.json").read_text())
    assert chosen["best_step"] in (0, 2, 4)
    assert chosen["val_psnr_best"] >= chosen["val_psnr_start"]
    assert read_checkpoint(good / "best.pt")["step"] == chosen["best_step"]


def test_a_rival_checkpoint_competes_with_the_fine_tuned_steps(site, tmp_path):
    """At equal budgets the experiment fine-tunes an earlier round; the final global model
    competes on validation, and a site keeps it when no fine-tuned step beats it."""
    from fed_ndif.training.trainer import finetune

    root, manifest = site
    start = root / "global" / "last.pt"
    out = tmp_path / "rivalled"
    # The rival is the start itself, so the wrecked steps (lr 0.3) cannot beat it, and a tie
    # with the start goes to the rival, seen first.
    finetune(start, manifest, out, steps=2, lr=0.3, device="cpu", val_every=1, rival=start)
    chosen = json.loads((out / "selection.json").read_text())
    assert chosen["kept_rival"] and chosen["best_step"] == -1
    assert chosen["val_psnr_rival"] == chosen["val_psnr_best"] == chosen["val_psnr_start"]
    assert (out / "best.pt").read_bytes() == start.read_bytes()

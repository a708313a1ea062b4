"""Single-site trainer: seeds, checkpoints (round trip, exact resume, wrong k), weights API,
evaluation and the train-local command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fed_ndif.checkpoints import (
    build_state,
    get_weights,
    load_checkpoint,
    save_checkpoint,
    set_weights,
)
from fed_ndif.cli import main
from fed_ndif.data.dataset import SliceStackDataset
from fed_ndif.data.normalization import Normalization
from fed_ndif.errors import FedNdifError
from fed_ndif.training.trainer import make_train_batches, train_steps, validate
from tests.helpers.models import tiny_cfg
from tests.helpers.synthetic import write_site


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    # 24x24 (FOV 400 mm, coarse) keeps every training step a few milliseconds.
    return write_site(tmp_path_factory.mktemp("site"), splits=("train", "train", "val"),
                      levels=(0.1,), matrix=24, slices=8)


@pytest.fixture(scope="module")
def train_set(site):
    return SliceStackDataset(site, split="train", k=1, normalization=Normalization())


@pytest.mark.parametrize("kind", ["diffusion", "unet"])
def test_seeds_give_identical_runs(train_set, kind):
    runs = []
    for _ in range(2):
        bundle = build_state(tiny_cfg(kind=kind))
        metrics = train_steps(bundle, make_train_batches(bundle, train_set), 3)
        runs.append((metrics["last_loss"], get_weights(bundle)))
    assert runs[0][0] == runs[1][0]
    for name, value in runs[0][1].items():
        np.testing.assert_array_equal(value, runs[1][1][name])


@pytest.mark.parametrize("insert_lesions", [0.0, 0.5])
def test_checkpoint_round_trip_and_exact_resume(train_set, tmp_path, insert_lesions):
    cfg = tiny_cfg()
    cfg["train"]["insert_lesions"] = {"probability": insert_lesions, "radius_mm": [2.5, 10.0],
                                      "contrast": [0.5, 4.0], "fwhm_mm": 6.0}
    bundle = build_state(cfg)
    train_steps(bundle, make_train_batches(bundle, train_set), 3)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(bundle, path)
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write leaves no temporary file
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 3 and raw["schema_version"] == 1 and raw["package_version"]
    assert raw["normalization"] == Normalization().to_dict()
    assert set(raw) >= {"model", "ema", "optimizer", "config"}

    expected = train_steps(bundle, make_train_batches(bundle, train_set), 1)["last_loss"]
    restored = load_checkpoint(path, device="cpu")
    assert restored.step == 3 and restored.normalization == bundle.normalization
    resumed = train_steps(restored, make_train_batches(restored, train_set), 1)["last_loss"]
    assert resumed == expected
    for name, value in get_weights(bundle).items():
        np.testing.assert_array_equal(value, get_weights(restored)[name])
    for name, value in get_weights(bundle, ema=True).items():
        np.testing.assert_array_equal(value, get_weights(restored, ema=True)[name])


def test_checkpoint_with_wrong_channel_count_is_a_clear_error(tmp_path):
    bundle = build_state(tiny_cfg(k=1))
    path = tmp_path / "k1.pt"
    save_checkpoint(bundle, path)
    with pytest.raises(FedNdifError, match=r"k=1 \(3 low-count slices\).*k=2"):
        load_checkpoint(path, expect_k=2)
    raw = torch.load(path, weights_only=True)
    raw["config"]["model"]["k"] = 2  # config says 5 slices, weights hold 3
    torch.save(raw, tmp_path / "lying.pt")
    with pytest.raises(FedNdifError, match=r"lying\.pt.*k=2 \(5 low-count slices\)"):
        load_checkpoint(tmp_path / "lying.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FedNdifError, match=r"junk\.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_get_set_weights(train_set):
    a, b = build_state(tiny_cfg()), build_state({**tiny_cfg(), "train": {
        **tiny_cfg()["train"], "seed": 1}})
    weights = get_weights(a)
    assert all(isinstance(v, np.ndarray) for v in weights.values())
    set_weights(b, weights)
    for name, value in get_weights(b, ema=True).items():
        np.testing.assert_array_equal(value, weights[name])
    name = next(iter(weights))
    with pytest.raises(FedNdifError, match=name):
        set_weights(b, {**weights, name: np.zeros((1, 2, 3), np.float32)})
    with pytest.raises(FedNdifError, match="missing"):
        set_weights(b, {})


def test_evaluate_reports_volume_metrics(site):
    bundle = build_state(tiny_cfg())
    val = SliceStackDataset(site, split="val", k=1, normalization=bundle.normalization)
    metrics = validate(bundle, val)
    assert {"psnr", "ssim", "nmse", "input_psnr", "num-examples"} <= set(metrics)
    assert metrics["num-examples"] == 1 and np.isfinite(metrics["psnr"])


@pytest.mark.slow
def test_train_local_command_trains_resumes_and_refuses_to_overwrite(site, tmp_path, capsys):
    out = tmp_path / "run"

    def args(steps: int, *extra: str) -> list[str]:
        return ["train-local", str(site), str(out), "model=tiny", "model.k=1",
                "model.diffusion_net.channels=[8,16,16]",
                "model.diffusion_net.num_head_channels=8", "model.diffusion_net.norm_num_groups=4",
                f"train.steps={steps}", "train.batch_size=2", "train.log_every=2",
                "train.val_every=4", "diffusion.sampler.steps=2", "train.device=cpu", *extra]

    assert main(args(4)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and "val_psnr" in records[-1]
    assert load_checkpoint(out / "last.pt").step == 4
    assert main(args(4)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(args(6, "--resume")) == 0
    assert load_checkpoint(out / "last.pt").step == 6
    assert main(args(8, "model.k=2", "--resume")) == 2
    assert "model settings differ" in capsys.readouterr().err


def test_uptake_weighted_loss_puts_the_loss_on_hot_pixels():
    import torch.nn.functional as F

    from fed_ndif.models.diffusion import pixel_loss
    from fed_ndif.training.trainer import uptake_weight

    full = torch.zeros(2, 1, 8, 8)
    full[:, :, 3, 3] = 20.0  # a lesion peak
    assert uptake_weight(full, 0.0) is None
    weight = uptake_weight(full, 1.0)
    torch.testing.assert_close(weight.mean(dim=(1, 2, 3)), torch.ones(2))
    assert float(weight[0, 0, 3, 3]) > 15 * float(weight[0, 0, 0, 0])
    out = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(pixel_loss(out, full, kind="l2"), F.mse_loss(out, full))
    torch.testing.assert_close(pixel_loss(out, full, kind="l1"), F.l1_loss(out, full))
    wrong_at_peak = full.clone()
    wrong_at_peak[:, :, 3, 3] -= 1.0
    wrong_elsewhere = full.clone()
    wrong_elsewhere[:, :, 0, 0] -= 1.0
    assert (pixel_loss(wrong_at_peak, full, kind="l2", weight=weight)
            > 10 * pixel_loss(wrong_elsewhere, full, kind="l2", weight=weight))


def test_training_leaves_out_the_sites_held_out_levels(site, tmp_path):
    """Every study of this site is at 10 %: holding 10 % out leaves it nothing to train on."""
    from fed_ndif.training.trainer import train_local

    held = f"data.held_out_levels=[{{site:{site.parent.name},levels:[0.1]}}]"
    with pytest.raises(FedNdifError, match="no studies in split train"):
        train_local(site, tmp_path / "out", overrides=["model=tiny", "train.steps=1", held])


def test_a_resumed_run_keeps_its_best_model_and_patience(site, tmp_path, monkeypatch):
    """keep_best with --resume: a run interrupted after its best step (step 1) and resumed
    keeps that best (best.pt, selection.json) and counts patience on from where it stopped;
    a fresh selection would take step 3 as the best and train on to step 4."""
    import fed_ndif.training.trainer as trainer

    scores = {0: 10.0, 1: 12.0, 2: 11.0, 3: 11.5, 4: 11.8}
    interrupt = {"at": 3}

    def scripted(state, _val_sets):
        if state.step == interrupt["at"]:
            raise KeyboardInterrupt
        return {"val_psnr": scores[state.step], "val_ssim": 0.5, "val_nmse": 0.1}

    monkeypatch.setattr(trainer, "_validation", scripted)
    out = tmp_path / "run"
    overrides = ["model=tiny", "model.k=1", "model.diffusion_net.channels=[8,16,16]",
                 "model.diffusion_net.num_head_channels=8",
                 "model.diffusion_net.norm_num_groups=4", "train.steps=4", "train.batch_size=2",
                 "train.log_every=1", "train.val_every=1", "train.checkpoint_every=1",
                 "train.keep_best=true", "train.patience=2", "train.device=cpu"]
    with pytest.raises(KeyboardInterrupt):
        trainer.train_local(site, out, overrides=overrides)
    assert load_checkpoint(out / "last.pt").step == 2
    assert load_checkpoint(out / "best.pt").step == 1
    interrupt["at"] = None
    trainer.train_local(site, out, overrides=overrides, resume=True)
    chosen = json.loads((out / "selection.json").read_text())
    assert chosen["best_step"] == 1 and chosen["val_psnr_best"] == 12.0
    assert chosen["val_psnr_start"] == 10.0
    assert load_checkpoint(out / "best.pt").step == 1
    # Patience 2 counts steps 2 and 3 without a gain: it stops at 3, not 4.
    assert load_checkpoint(out / "last.pt").step == 3


@pytest.mark.multiprocess
def test_trainings_in_worker_processes_match_this_process(site, tmp_path):
    """Local-only and pooled run side by side in spawned workers (compare.workers): the same
    seeds give the same weights as one after another here; an error in a worker reaches the
    caller as itself."""
    from fed_ndif.experiment import _train_unless_done
    from fed_ndif.runtime.processes import run_parallel

    cfg = tiny_cfg()
    calls = {workers: [(cfg, [site], tmp_path / f"w{workers}" / name)
                       for name in ("pooled", "local")] for workers in (1, 2)}
    for workers, jobs in calls.items():
        lasts = run_parallel(_train_unless_done, jobs, workers=workers)
        assert lasts == [out / "last.pt" for _, _, out in jobs]
    for name in ("pooled", "local"):
        here = load_checkpoint(tmp_path / "w1" / name / "last.pt")
        there = load_checkpoint(tmp_path / "w2" / name / "last.pt")
        assert there.step == here.step == 4
        for key, value in get_weights(here, ema=True).items():
            np.testing.assert_array_equal(get_weights(there, ema=True)[key], value, err_msg=key)
    broken = (cfg, [tmp_path / "missing" / "manifest.csv"], tmp_path / "broken")
    with pytest.raises(FedNdifError, match="manifest"):
        run_parallel(_train_unless_done, [broken, broken], workers=2)

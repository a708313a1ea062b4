"""FedAvg federation over the real ServerApp and ClientApp, driven in-process (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fed_ndif.checkpoints import latest_global_checkpoint, read_checkpoint
from fed_ndif.client.app import app as client_app
from fed_ndif.run_config import from_array_record, from_run_config, to_array_record, to_run_config
from fed_ndif.runtime.inprocess import InProcessGrid
from fed_ndif.server.app import app as server_app
from tests.helpers.federation import SITES, tiny_run_config, tiny_sites


@pytest.fixture(scope="module")
def sites_root(tmp_path_factory) -> Path:
    return tiny_sites(tmp_path_factory.mktemp("fed") / "sites")


_run_config = tiny_run_config


class RecordingGrid(InProcessGrid):
    """Keeps every train reply so a test can recompute the average by hand."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.train_replies: dict[int, list[Message]] = {}
        self.wire_dtypes: set[np.dtype] = set()  # of float arrays in train replies, as sent

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for message, message_id in zip(messages, ids, strict=True):
            if message.metadata.message_type == "train":
                server_round = int(message.content["config"]["server-round"])
                reply = self._replies[message_id]
                self.train_replies.setdefault(server_round, []).append(reply)
                self.wire_dtypes |= {a.dtype for a in from_array_record(
                    reply.content["arrays"]).values() if a.dtype.kind == "f"}
        return ids


def _federate(run_config: dict, *, app: ClientApp = client_app, grid_cls=InProcessGrid,
              fail=None) -> InProcessGrid:
    nodes = {11 + i: {"partition-id": i, "num-partitions": len(SITES)} for i in range(len(SITES))}
    grid = grid_cls(app, nodes, run_config=run_config, fail=fail)
    server_app(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(),
                             run_config=run_config))
    return grid


def _global(run_dir: Path, server_round: int) -> dict[str, np.ndarray]:
    ckpt = read_checkpoint(run_dir / "checkpoints" / f"global-round-{server_round:04d}.pt")
    return {k: v.numpy() for k, v in ckpt["model"].items()}


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_config_round_trips_the_hydra_config(sites_root, tmp_path):
    flat = _run_config(sites_root, tmp_path)
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    nested = from_run_config(flat)
    assert nested["data"]["sites"] == SITES and nested["fl"]["rounds"] == 2
    assert nested["diffusion"]["sampler"]["t_start"] == 150
    assert to_run_config(nested) == flat
    # A null (sampling from pure noise) must survive the flat run config too.
    nested["diffusion"]["sampler"].update(warm_start="none", t_start=None)
    assert from_run_config(to_run_config(nested))["diffusion"]["sampler"]["t_start"] is None


def test_global_model_is_the_example_weighted_mean_of_site_updates(sites_root, tmp_path):
    run_dir = tmp_path / "run"
    grid = _federate(_run_config(sites_root, run_dir), grid_cls=RecordingGrid)
    for server_round in (1, 2):
        replies = grid.train_replies[server_round]
        assert len(replies) == 3
        weights = [float(r.content["metrics"]["num-examples"]) for r in replies]
        assert len(set(weights)) > 1  # sites differ in size, so weighting matters
        updates = [from_array_record(r.content["arrays"]) for r in replies]
        expected_loss = sum(float(r.content["metrics"]["train_loss"]) * w
                            for r, w in zip(replies, weights, strict=True)) / sum(weights)
        global_weights = _global(run_dir, server_round)
        for name, value in global_weights.items():
            by_hand = sum(u[name].astype(np.float64) * w
                          for u, w in zip(updates, weights, strict=True)) / sum(weights)
            np.testing.assert_allclose(value, by_hand.astype(value.dtype), rtol=1e-6, atol=1e-7,
                                       err_msg=name)
        record = _rounds(run_dir)[server_round - 1]
        assert record["sites"] == SITES and record["rejected"] == {} and record["failed"] == {}
        assert record["train"]["train_loss"] == pytest.approx(expected_loss, rel=1e-9)
    # Round 2 started from round 1's average: the sites' updates differ from round 1's.
    assert not np.array_equal(_global(run_dir, 1)[name], _global(run_dir, 2)[name])


def test_a_site_that_fails_mid_round_is_left_out_and_named(sites_root, tmp_path):
    run_dir = tmp_path / "run"

    def fail(node_id: int, message: Message):
        round_ = int(message.content["config"]["server-round"])
        if node_id == 12 and round_ == 2 and message.metadata.message_type == "train":
            return RuntimeError("GPU fell off the bus")
        return None

    _federate(_run_config(sites_root, run_dir), fail=fail)
    first, second = _rounds(run_dir)
    assert first["sites"] == SITES
    assert second["sites"] == ["site_a", "site_c"]
    assert "site_b" in second["failed"] and "GPU fell off the bus" in second["failed"]["site_b"]
    assert latest_global_checkpoint(run_dir)[0] == 2


def _hostile_app(corrupt) -> ClientApp:
    """The real ClientApp, except that site_b's update is corrupted by ``corrupt``."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        reply = client_app(msg, context)
        if int(context.node_config["partition-id"]) == 1:
            arrays = from_array_record(reply.content["arrays"])
            reply.content["arrays"] = to_array_record(corrupt(arrays))
        return reply

    return app


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda a: {**a, next(iter(a)): np.full_like(next(iter(a.values())), np.nan)},
         "NaN or infinite"),
        (lambda a: {**a, next(iter(a)): np.zeros((3, 3), np.float32)}, "has shape"),
        (lambda a: {k: v.astype(np.float64) for k, v in a.items()}, "dtype"),
        (lambda a: dict(list(a.items())[1:]), "missing"),
    ],
    ids=["nan", "shape", "dtype", "missing-parameter"],
)
def test_bad_updates_are_rejected_named_and_not_averaged(sites_root, tmp_path, corrupt, reason):
    run_dir = tmp_path / "run"
    grid = _federate(_run_config(sites_root, run_dir, "fl.rounds=1"),
                     app=_hostile_app(corrupt), grid_cls=RecordingGrid)
    (record,) = _rounds(run_dir)
    assert record["sites"] == ["site_a", "site_c"]
    assert reason in record["rejected"]["site_b"]
    good = [r for r in grid.train_replies[1] if r.content["site"]["name"] != "site_b"]
    weights = [float(r.content["metrics"]["num-examples"]) for r in good]
    updates = [from_array_record(r.content["arrays"]) for r in good]
    for name, value in _global(run_dir, 1).items():
        assert np.all(np.isfinite(value))
        by_hand = sum(u[name].astype(np.float64) * w
                      for u, w in zip(updates, weights, strict=True)) / sum(weights)
        np.testing.assert_allclose(value, by_hand.astype(value.dtype), rtol=1e-6, atol=1e-7)


def test_restart_after_round_one_ends_with_the_uninterrupted_weights(sites_root, tmp_path):
    torch.set_num_threads(1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _federate(_run_config(sites_root, straight))
    _federate(_run_config(sites_root, resumed, "fl.rounds=1"))  # the coordinator stops here
    assert latest_global_checkpoint(resumed)[0] == 1
    grid = _federate(_run_config(sites_root, resumed))  # restarted with the same run_dir
    assert {t for _, t in grid.calls} == {"train"} and len(grid.calls) == 3  # only round 2 ran
    assert [r["round"] for r in _rounds(resumed)] == [1, 2]
    final_a, final_b = _global(straight, 2), _global(resumed, 2)
    for name in final_a:
        np.testing.assert_array_equal(final_a[name], final_b[name], err_msg=name)


def test_resume_with_a_different_model_is_refused(sites_root, tmp_path, caplog):
    run_dir = tmp_path / "run"
    _federate(_run_config(sites_root, run_dir, "fl.rounds=1"))
    with pytest.raises(Exception, match="model settings differ"):
        _federate(_run_config(sites_root, run_dir, "model.k=1"))


def test_validation_metrics_are_aggregated_by_examples(sites_root, tmp_path):
    run_dir = tmp_path / "run"
    _federate(_run_config(sites_root, run_dir, "fl.rounds=1", "fl.evaluate_max_studies=1",
                          "diffusion.sampler.steps=2"))
    (record,) = _rounds(run_dir)
    for key in ("val_psnr", "val_ssim", "val_nmse", "val_input_psnr"):
        assert np.isfinite(record["evaluate"][key])
    assert 0 < record["evaluate"]["val_ssim"] <= 1


@pytest.mark.parametrize("transfer", ["float32", "float16"])
def test_server_side_differential_privacy_clips_and_adds_noise(sites_root, tmp_path, transfer):
    plain, private = tmp_path / "plain", tmp_path / "private"
    _federate(_run_config(sites_root, plain, "fl.rounds=1"))
    _federate(_run_config(sites_root, private, "fl.rounds=1", "fl.dp.enabled=true",
                          "fl.dp.noise_multiplier=0.5", "fl.dp.clipping_norm=1.0",
                          f"fl.transfer_dtype={transfer}"))
    a, b = _global(plain, 1), _global(private, 1)
    assert all(np.all(np.isfinite(v)) for v in b.values())
    assert any(not np.allclose(a[name], b[name]) for name in a)
    (record,) = _rounds(private)
    assert record["sites"] == SITES


def test_half_precision_transfer_halves_the_bytes_and_rebuilds_site_weights(sites_root,
                                                                            tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    _federate(_run_config(sites_root, full, "fl.rounds=1"))
    grid = _federate(_run_config(sites_root, half, "fl.rounds=1", "fl.transfer_dtype=float16"),
                     grid_cls=RecordingGrid)
    assert grid.wire_dtypes == {np.dtype(np.float16)}
    (record_full,), (record_half,) = _rounds(full), _rounds(half)
    assert record_half["sites"] == SITES
    # Half the payload; each array's serialization header (~100 bytes) is not halved.
    assert 0.5 * record_full["update_bytes"] < record_half["update_bytes"] \
        < 0.52 * record_full["update_bytes"]
    a, b = _global(full, 1), _global(half, 1)
    # Sites trained from float16-rounded weights: the global model differs only by that rounding.
    for name in a:
        if a[name].dtype.kind == "f":
            scale = max(1.0, float(np.abs(a[name]).max()))
            np.testing.assert_allclose(b[name], a[name], atol=2e-3 * scale, err_msg=name)
    assert any(not np.array_equal(a[n], b[n]) for n in a)


def test_an_unknown_transfer_dtype_is_refused_before_the_run_folder_is_made(sites_root,
                                                                            tmp_path):
    from fed_ndif.errors import FedNdifError
    from fed_ndif.server.federation import run_federation

    run_dir = tmp_path / "run"
    cfg = from_run_config(_run_config(sites_root, run_dir, "fl.transfer_dtype=bfloat16"))
    with pytest.raises(FedNdifError, match="transfer_dtype"):
        run_federation(InProcessGrid(client_app, {}, run_config={}), cfg)
    assert not run_dir.exists()

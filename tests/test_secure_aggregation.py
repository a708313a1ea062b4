"""Secure aggregation (Flower's SecAgg+) over the real ServerApp and ClientApp, in-process.

The grid below records every message the ServerApp sends and every reply it receives; a mod
inside the sites' ClientApp (after the SecAgg+ mod, so before masking) records each site's
true update. The tests compare the two.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import recorddict_to_fitres

from fed_ndif.checkpoints import latest_global_checkpoint, read_checkpoint
from fed_ndif.client import app as client_module
from fed_ndif.errors import FedNdifError
from fed_ndif.run_config import from_array_record, from_run_config
from fed_ndif.runtime.inprocess import InProcessGrid
from fed_ndif.secagg import SecAggSettings
from fed_ndif.server.app import app as server_app
from tests.helpers.federation import SITES, tiny_run_config, tiny_sites

# Tiny sites have 40-50 training slice stacks: max_weight near that keeps quantization fine.
SECURE = ["fl.secure_aggregation=true", "fl.secagg.reconstruction_threshold=2",
          "fl.secagg.max_weight=100"]


@pytest.fixture(scope="module")
def sites_root(tmp_path_factory) -> Path:
    return tiny_sites(tmp_path_factory.mktemp("secagg") / "sites")


_run_config = tiny_run_config


class Recorder:
    """Each site's update as its train handler returned it, before the SecAgg+ mod masked it."""

    def __init__(self) -> None:
        self.updates: dict[tuple[int, str], tuple[list[np.ndarray], int]] = {}

    def mod(self, msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if "fitres.parameters" in reply.content.array_records:
            fitres = recorddict_to_fitres(reply.content, keep_input=True)
            server_round = int(msg.content["fitins.config"]["server-round"])
            site = str(fitres.metrics["site"])
            self.updates[(server_round, site)] = (parameters_to_ndarrays(fitres.parameters),
                                                  fitres.num_examples)
        return reply


def _client_app(recorder: Recorder | None = None, train=None) -> ClientApp:
    """The real ClientApp's handlers and mod, with a recorder just inside the SecAgg+ mod."""
    app = ClientApp(mods=[client_module.secure_mod, *([recorder.mod] if recorder else [])])
    app.train()(train or client_module.train)
    app.evaluate()(client_module.validate_global)
    return app


class CapturingGrid(InProcessGrid):
    """Keeps everything the ServerApp receives (replies) and sends."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[Message] = []

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.received.extend(replies)
        return replies


def _federate(run_config: dict, app: ClientApp, *, fail=None, grid_cls=CapturingGrid,
              node_configs: dict | None = None) -> CapturingGrid:
    nodes = {11 + i: {"partition-id": i, "num-partitions": len(SITES), **(node_configs or {})}
             for i in range(len(SITES))}
    grid = grid_cls(app, nodes, run_config=run_config, fail=fail)
    server_app(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(),
                             run_config=run_config))
    return grid


def _global(run_dir: Path, server_round: int) -> OrderedDict[str, np.ndarray]:
    ckpt = read_checkpoint(run_dir / "checkpoints" / f"global-round-{server_round:04d}.pt")
    return OrderedDict((k, v.numpy()) for k, v in ckpt["model"].items())


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _received_arrays(message: Message) -> list[np.ndarray]:
    """Every array a reply carries: array records, and byte strings in config records (where
    SecAgg+ puts the masked vectors), decoded as numpy arrays where they are."""
    from flwr.common import bytes_to_ndarray

    found = []
    for record in message.content.array_records.values():
        found += list(from_array_record(record).values())  # packed or not
    for record in message.content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bytes):
                    try:
                        found.append(bytes_to_ndarray(item))
                    except Exception:  # keys, ciphertexts: not arrays
                        found.append(np.frombuffer(item, np.uint8))
    return found


def test_the_coordinator_receives_no_single_sites_update_and_gets_their_fedavg(sites_root,
                                                                               tmp_path):
    run_dir = tmp_path / "run"
    recorder = Recorder()
    grid = _federate(_run_config(sites_root, run_dir, *SECURE), _client_app(recorder))
    assert {site for _, site in recorder.updates} == set(SITES)
    settings = SecAggSettings.from_config(from_run_config(grid.contexts[11].run_config)["fl"])
    flat_updates = {key: np.concatenate([a.ravel() for a in arrays])
                    for key, (arrays, _) in recorder.updates.items()}
    size = next(iter(flat_updates.values())).size
    noise = 6.0 / np.sqrt(size)  # |correlation| of unrelated vectors of this length: < 6 sigma
    checked = 0
    for reply in grid.received:
        assert not reply.has_error()
        assert not reply.content.array_records or all(
            len(r) == 0 for r in reply.content.array_records.values())
        arrays = _received_arrays(reply)
        flat = [a.astype(np.float64).ravel() for a in arrays if a.dtype.kind in "fiu"]
        big = np.concatenate(flat) if flat else np.zeros(0)
        for (_, site), update in flat_updates.items():
            parts = recorder.updates[(_, site)][0]
            for array in arrays:  # no received array equals one of the site's update arrays
                assert not any(array.shape == u.shape and u.size > 1 and np.allclose(
                    array.astype(np.float64), u, rtol=1e-3, atol=1e-6) for u in parts), site
            if big.size >= size:  # the masked vector (factor first) against the update
                masked = big[-size:]
                r = np.corrcoef(masked, update)[0, 1]
                assert abs(r) < noise, (site, r)
                checked += 1
    assert checked >= 2 * len(SITES) * len(SITES)  # 2 rounds x 3 masked vectors x 3 sites
    # The unmasked aggregate is FedAvg of the sites' changes, within the quantization error.
    for server_round in (1, 2):
        before, after = _global(run_dir, server_round - 1), _global(run_dir, server_round)
        updates = [recorder.updates[(server_round, s)] for s in SITES]
        weights = [n for _, n in updates]
        assert len(set(weights)) > 1  # sites differ in size, so weighting matters
        bound = settings.max_error(weights)
        for i, name in enumerate(before):
            fedavg = sum(u[i] * w for (u, _), w in zip(updates, weights, strict=True)) \
                / sum(weights)
            got = after[name].astype(np.float64) - before[name].astype(np.float64)
            assert np.max(np.abs(got - fedavg)) <= bound + 1e-7, name
        assert bound < 1e-3 * max(np.abs(recorder.updates[(server_round, "site_a")][0][0]).max(),
                                  1e-4)
        record = _rounds(run_dir)[server_round - 1]
        assert record["secure_aggregation"] is True
        assert record["sites"] == SITES and record["failed"] == {} and record["rejected"] == {}
        assert record["train_bytes"]["received"] > 0


def _stage(message: Message) -> str | None:
    record = message.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if record is None else str(record.get(Key.STAGE))


def _fedavg_holds(run_dir: Path, recorder: Recorder, server_round: int, sites: list[str],
                  settings: SecAggSettings) -> None:
    before, after = _global(run_dir, server_round - 1), _global(run_dir, server_round)
    updates = [recorder.updates[(server_round, s)] for s in sites]
    weights = [n for _, n in updates]
    bound = settings.max_error(weights)
    for i, name in enumerate(before):
        fedavg = sum(u[i] * w for (u, _), w in zip(updates, weights, strict=True)) / sum(weights)
        got = after[name].astype(np.float64) - before[name].astype(np.float64)
        assert np.max(np.abs(got - fedavg)) <= bound + 1e-7, name


@pytest.mark.parametrize("stage", [Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK])
def test_a_site_lost_mid_round_does_not_stop_the_round(sites_root, tmp_path, stage):
    """site_b dies in round 1 before sending its masked update (left out of the sum) or after
    it (its masked update stays in the sum: the others' shares unmask it)."""
    run_dir = tmp_path / "run"
    recorder = Recorder()

    def fail(node_id: int, message: Message):
        round_ = int(message.metadata.group_id or 0)
        if node_id == 12 and round_ == 1 and _stage(message) == stage:
            return ConnectionError("site_b's SuperNode was killed")
        return None

    run_config = _run_config(sites_root, run_dir, *SECURE)
    _federate(run_config, _client_app(recorder), fail=fail)
    settings = SecAggSettings.from_config(from_run_config(run_config)["fl"])
    first, second = _rounds(run_dir)
    in_sum = ["site_a", "site_c"] if stage == Stage.COLLECT_MASKED_VECTORS else SITES
    assert first["sites"] == in_sum and first["rejected"] == {}
    if stage == Stage.COLLECT_MASKED_VECTORS:
        assert "killed" in first["failed"]["site_b"]
    _fedavg_holds(run_dir, recorder, 1, in_sum, settings)
    assert second["sites"] == SITES  # the site is back next round
    _fedavg_holds(run_dir, recorder, 2, SITES, settings)


def test_below_the_reconstruction_threshold_the_round_changes_nothing(sites_root, tmp_path):
    run_dir = tmp_path / "run"

    def fail(node_id: int, message: Message):
        if node_id in (12, 13) and int(message.metadata.group_id or 0) == 1 \
                and _stage(message) == Stage.SHARE_KEYS:
            return ConnectionError("lost")
        return None

    _federate(_run_config(sites_root, run_dir, *SECURE), _client_app(), fail=fail)
    first, second = _rounds(run_dir)
    assert first["sites"] == [] and "halted" in first["rejected"]["aggregate"]
    assert set(first["failed"]) == {"site_b", "site_c"}
    for name, value in _global(run_dir, 0).items():
        np.testing.assert_array_equal(_global(run_dir, 1)[name], value)
    assert second["sites"] == SITES


def test_a_site_checks_its_own_update_and_refuses_one_that_would_be_clipped(sites_root,
                                                                           tmp_path):
    run_dir = tmp_path / "run"
    _federate(_run_config(sites_root, run_dir, *SECURE, "fl.rounds=1",
                          "fl.secagg.clipping_range=1e-9"), _client_app())
    (record,) = _rounds(run_dir)
    assert record["sites"] == []
    assert len(record["failed"]) == 3
    assert all("fl.secagg.clipping_range" in reason for reason in record["failed"].values())
    assert latest_global_checkpoint(run_dir)[0] == 1


def test_own_update_checks_name_the_problem():
    from fed_ndif.secagg import check_own_change

    settings = SecAggSettings.from_config({"min_sites": 3})
    received = OrderedDict(w=np.zeros((2, 2), np.float32), b=np.zeros(2, np.float32))
    good = OrderedDict(w=np.full((2, 2), 0.01), b=np.zeros(2))
    check_own_change(good, received, 100, settings)
    for change, n, reason in [
        ({**good, "w": np.full((2, 2), np.nan)}, 100, "NaN"),
        ({**good, "b": np.zeros(3)}, 100, "shape"),
        (OrderedDict(w=good["w"]), 100, "names"),
        (good, 1e6, "max_weight"),
        (good, 0, "num-examples"),
        ({**good, "w": np.full((2, 2), 1e3)}, 100, "clipping_range"),
    ]:
        with pytest.raises(FedNdifError, match=reason):
            check_own_change(OrderedDict(change), received, n, settings)


def test_the_aggregate_is_checked_after_unmasking():
    from fed_ndif.secagg import AggregateRejected, check_aggregate

    reference = OrderedDict(w=np.zeros((2, 2), np.float32), b=np.zeros(2, np.float32))
    assert list(check_aggregate([np.ones((2, 2)), np.ones(2)], reference)) == ["w", "b"]
    for arrays, reason in [([np.ones((2, 2))], "holds 1 arrays"),
                           ([np.ones((2, 2)), np.ones(3)], "shape"),
                           ([np.full((2, 2), np.inf), np.ones(2)], "NaN or infinite")]:
        with pytest.raises(AggregateRejected, match=reason):
            check_aggregate(arrays, reference)


@pytest.mark.parametrize(("setting", "reason"), [
    (["fl.dp.enabled=true"], "cannot both be true"),
    (["fl.secagg.reconstruction_threshold=4"], "more than fl.min_sites"),
    (["fl.secagg.reconstruction_threshold=1"], "at least 2"),
    (["fl.secagg.clipping_range=0"], "clipping_range"),
    (["fl.secagg.num_shares=2"], "num_shares"),
    (["fl.secagg.quantization_range=2147483648"], "wraps around"),
])
def test_bad_secure_settings_fail_in_one_line_before_the_run_folder_is_made(
        sites_root, tmp_path, setting, reason):
    from fed_ndif.server.federation import run_federation

    run_dir = tmp_path / "run"
    cfg = from_run_config(_run_config(sites_root, run_dir, *SECURE, *setting))
    with pytest.raises(FedNdifError, match=reason):
        run_federation(InProcessGrid(client_module.app, {}, run_config={}), cfg)
    assert not run_dir.exists()


def test_a_site_that_requires_secure_aggregation_refuses_a_plain_round(sites_root, tmp_path):
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    required = {"secure-aggregation": "required"}
    _federate(_run_config(sites_root, plain, "fl.rounds=1"), client_module.app,
              node_configs=required)
    (record,) = _rounds(plain)
    assert record["sites"] == [] and len(record["failed"]) == 3
    assert all("requires secure aggregation" in r for r in record["failed"].values())
    _federate(_run_config(sites_root, secure, *SECURE, "fl.rounds=1"), client_module.app,
              node_configs=required)
    assert _rounds(secure)[0]["sites"] == SITES


def test_a_restarted_coordinator_resumes_a_secure_run(sites_root, tmp_path):
    run_dir = tmp_path / "run"
    recorder = Recorder()
    _federate(_run_config(sites_root, run_dir, *SECURE, "fl.rounds=1"), _client_app(recorder))
    grid = _federate(_run_config(sites_root, run_dir, *SECURE), _client_app(recorder))
    assert {int(m.metadata.group_id) for m in grid.received} == {2}  # only round 2 ran
    assert [r["round"] for r in _rounds(run_dir)] == [1, 2]
    settings = SecAggSettings.from_config(from_run_config(grid.contexts[11].run_config)["fl"])
    _fedavg_holds(run_dir, recorder, 2, SITES, settings)


def test_flowers_mask_generator_keeps_32_bits_of_its_seed():
    """Pins a limitation stated in deploy/README.md: Flower 1.42 folds a mask's 256-bit seed
    into 32 bits (XOR of its 4-byte words) for NumPy's Mersenne Twister, so two seeds with the
    same fold give the same mask. If this fails, Flower changed it: update the README."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    seed = bytes(range(32))
    words = [seed[i:i + 4] for i in range(0, 32, 4)]
    other = b"".join(words[1:] + words[:1])  # the same words in another order
    assert other != seed
    a, b = (pseudo_rand_gen(s, 2**32, [(1000,)])[0] for s in (seed, other))
    np.testing.assert_array_equal(a, b)


def test_the_command_line_flags_reach_the_run_config_and_the_node_config(tmp_path):
    from fed_ndif.cli import build_parser
    from fed_ndif.client.secure import requires_secure
    from fed_ndif.runtime.site import supernode_args

    args = build_parser().parse_args(["coordinator", str(tmp_path), "fl.rounds=2",
                                      "--secure-aggregation"])
    assert args.secure_aggregation and args.overrides == ["fl.rounds=2"]
    site_args = build_parser().parse_args(["site", "--superlink", "h:1", "--ca", "ca",
                                           "--key", "k", "--data", "d",
                                           "--require-secure-aggregation"])
    assert site_args.require_secure_aggregation
    node_config = supernode_args(superlink="h:1", ca=Path("ca"), key=Path("k"),
                                 data=Path("d"), name="s", require_secure=True)[-1]
    assert "secure-aggregation='required'" in node_config
    assert requires_secure({"secure-aggregation": "required"})
    assert not requires_secure({})
    with pytest.raises(FedNdifError, match="use 'required'"):
        requires_secure({"secure-aggregation": "yes"})

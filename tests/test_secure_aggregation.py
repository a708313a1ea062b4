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
from flwr.compat.common.recorddict_compat import recorddict_to_fitres

from fed_ndif.checkpoints import latest_global_checkpoint, read_checkpoint
from fed_ndif.client import app as client_module
from fed_ndif.client.secure import secure_aggregation_mod
from fed_ndif.config import load_config
from fed_ndif.data.sites import make_sites
from fed_ndif.errors import FedNdifError
from fed_ndif.run_config import from_array_record, from_run_config, to_run_config
from fed_ndif.secagg import SecAggSettings
from fed_ndif.server.app import app as server_app
from tests.helpers.inprocess_grid import InProcessGrid

SITES = ["site_a", "site_b", "site_c"]
# Tiny sites have 40-50 training slice stacks: max_weight near that keeps quantization fine.
SECURE = ["fl.secure_aggregation=true", "fl.secagg.reconstruction_threshold=2",
          "fl.secagg.max_weight=100"]


@pytest.fixture(scope="module")
def sites_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("secagg") / "sites"
    make_sites(root, overrides=["sites=tiny"])
    return root


def _run_config(sites_root: Path, run_dir: Path, *extra: str) -> dict:
    cfg = load_config("federated", [
        "model=tiny", "fl.rounds=2", "fl.local_steps=2", "train.batch_size=4",
        "fl.evaluate_max_studies=0", f"data.root={sites_root}", f"data.sites=[{','.join(SITES)}]",
        f"run_dir={run_dir}", "logger.wandb_mode=disabled", *extra])
    return to_run_config(cfg)


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
    app = ClientApp(mods=[secure_aggregation_mod, *([recorder.mod] if recorder else [])])
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

"""The coordinator's federation: FedAvg rounds with checked updates, checkpoints and resume.

Flower's ``FedAvg`` samples sites and builds messages; :class:`CheckedFedAvg` replaces its
aggregation with one that checks every update and averages in a fixed order. The round loop is
ours (not ``Strategy.start``) so that a restarted coordinator continues at round N+1 from the
latest global checkpoint instead of round 1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from fed_ndif.checkpoints import (
    GLOBAL_CHECKPOINTS,
    build_state,
    get_weights,
    global_checkpoint_path,
    latest_global_checkpoint,
    read_checkpoint,
    save_checkpoint,
    set_weights,
)
from fed_ndif.errors import FedNdifError
from fed_ndif.run_config import from_array_record, to_array_record
from fed_ndif.secagg import AggregateRejected, SecAggSettings, apply_change, check_aggregate
from fed_ndif.server.aggregation import (
    UpdateRejected,
    check_update,
    spec_of,
    weighted_average,
    weighted_metrics,
)
from fed_ndif.server.secure import content_bytes, secure_train_round
from fed_ndif.transfer import check_transfer_dtype, decode_update, encode_global, received_weights

log = logging.getLogger(__name__)

# How often the ServerApp asks the SuperLink for replies. Flower 1.42's HttpGrid sleeps 3 s
# between pulls, which adds up to 3 s to every exchange of a deployed round. Much faster polling
# made the SuperLink's SQLite state report "database is locked" on a loaded 2-core machine.
REPLY_POLL_S = 1.0


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float,
                     destinations: dict[str, int] | None = None) -> list[Message]:
    """``grid.send_and_receive``, polling a deployed SuperLink every REPLY_POLL_S seconds.

    ``destinations`` receives message id -> destination node: an error reply the SuperLink
    makes for a node that vanished comes from the SuperLink, not from that node.
    """
    from flwr.superlink.grid import HttpGrid

    if not isinstance(grid, HttpGrid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    if destinations is not None:
        destinations.clear()
        destinations.update({i: m.metadata.dst_node_id for i, m in zip(ids, messages,
                                                                        strict=False)})
    pending = set(ids)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        try:
            got = list(grid.pull_messages(pending))
        except Exception as exc:  # a busy SuperLink answers 500 now and then: ask again
            if time.monotonic() >= deadline:
                raise
            log.warning("pulling replies failed (%s); retrying", exc)
            got = []
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(REPLY_POLL_S)
    return replies


def _on_the_wire(weights: dict[str, np.ndarray], transfer: str) -> ArrayRecord:
    """The global weights as sent to the sites: in the transfer dtype, packed."""
    return to_array_record(encode_global(weights, transfer), packed=True)


def decode_replies(replies: Iterable[Message], received: dict[str, np.ndarray],
                   transfer: str) -> list[Message]:
    """Replies with each site's update unpacked and turned back into its float32 weights
    (fed_ndif.transfer), as plain records the strategies (FedAvg, DP clipping) understand."""
    decoded = []
    for reply in replies:
        if not reply.has_error() and "arrays" in reply.content:
            with contextlib.suppress(TypeError, ValueError, KeyError):
                reply.content["arrays"] = to_array_record(
                    decode_update(from_array_record(reply.content["arrays"]), received,
                                  transfer))
        decoded.append(reply)
    return decoded


@dataclass
class RoundReport:
    """What happened to each site's reply in one aggregation."""

    accepted: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # per accepted site
    rejected: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


class CheckedFedAvg(FedAvg):
    """FedAvg that rejects bad updates (naming the site) and averages in a fixed order.

    Replies are sorted by site name, then node id, before averaging, so seeded runs repeat
    bitwise whatever order the replies arrive in.
    """

    def __init__(self, *, reference: dict[str, np.ndarray], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec_of(reference)
        self.site_names: dict[int, str] = {}  # node id -> site name, learnt from replies
        self.destinations: dict[str, int] = {}  # message id -> node id, of the last exchange
        self.last_train = RoundReport()
        self.last_evaluate = RoundReport()

    def _sorted_checked(self, server_round: int, replies: Iterable[Message], *,
                        train: bool) -> tuple[list[tuple[Message, dict, float]], RoundReport]:
        report = RoundReport()
        kept = []
        ordered = sorted(replies, key=lambda r: (self._site_of(r), r.metadata.src_node_id))
        for reply in ordered:
            site = self._site_of(reply)
            if reply.has_error():
                report.failed[site] = reply.error.reason
                log.warning("round %d: site %s failed: %s", server_round, site,
                            reply.error.reason)
                continue
            try:
                metrics = dict(reply.content["metrics"])
                weight = float(metrics.get(self.weighted_by_key, float("nan")))
                if train:
                    check_update(from_array_record(reply.content["arrays"]), self.spec,
                                 num_examples=weight)
                elif not (np.isfinite(weight) and weight > 0):
                    raise UpdateRejected(f"num-examples is {weight!r}")
            except (UpdateRejected, KeyError, TypeError, ValueError) as exc:
                report.rejected[site] = str(exc)
                log.warning("round %d: rejected %s from site %s (node %d): %s", server_round,
                            "update" if train else "metrics", site, reply.metadata.src_node_id,
                            exc)
                continue
            report.accepted.append(site)
            report.metrics[site] = {k: float(v) for k, v in metrics.items()}
            kept.append((reply, metrics, weight))
        return kept, report

    def _site_of(self, reply: Message) -> str:
        node = reply.metadata.src_node_id
        if reply.has_error():
            node = self.destinations.get(reply.metadata.reply_to_message_id, node)
        else:
            with contextlib.suppress(KeyError, TypeError):
                self.site_names[node] = str(reply.content["site"]["name"])
        return self.site_names.get(node, f"node {node}")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept, self.last_train = self._sorted_checked(server_round, replies, train=True)
        if not kept:
            log.warning("round %d: no acceptable update; the global model is unchanged",
                        server_round)
            return None, None
        average = weighted_average(
            [(from_array_record(r.content["arrays"]), w) for r, _, w in kept], self.spec)
        metrics = weighted_metrics([(m, w) for _, m, w in kept])
        metrics.pop(self.weighted_by_key, None)
        return to_array_record(average), MetricRecord(metrics)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        kept, self.last_evaluate = self._sorted_checked(server_round, replies, train=False)
        if not kept:
            return None
        metrics = weighted_metrics([(m, w) for _, m, w in kept])
        metrics.pop(self.weighted_by_key, None)
        return MetricRecord(metrics)


def secure_train(grid: Grid, strategy: CheckedFedAvg, server_round: int, sent: ArrayRecord,
                 train_config: ConfigRecord, settings: SecAggSettings, *, timeout: float,
                 global_weights: dict[str, np.ndarray], transfer: str
                 ) -> tuple[dict[str, np.ndarray] | None, MetricRecord | None, dict[str, int]]:
    """A training step through SecAgg+ (fed_ndif.server.secure): the new global weights (None:
    the round changed nothing), the train metrics, and the bytes each way. Fills
    ``strategy.last_train`` as the plain path does, with the aggregate's rejection under
    ``"aggregate"``."""
    nodes = [m.metadata.dst_node_id
             for m in strategy.configure_train(server_round, sent, train_config, grid)]
    result = secure_train_round(grid, server_round=server_round, nodes=nodes, sent=sent,
                                train_config=train_config, settings=settings, timeout=timeout,
                                exchange=send_and_receive, site_names=strategy.site_names)
    report = RoundReport(failed=dict(result.failed))
    wire = {"sent": result.sent_bytes, "received": result.received_bytes}
    for site, reason in result.failed.items():
        log.warning("round %d: site %s is not in the secure sum: %s", server_round, site, reason)
    strategy.last_train = report
    if result.mean_change is None:
        log.warning("round %d: secure aggregation halted (fewer than the reconstruction "
                    "threshold of sites answered); the global model is unchanged", server_round)
        report.rejected["aggregate"] = "secure aggregation halted"
        return None, None, wire
    try:
        change = check_aggregate(result.mean_change, global_weights)
    except AggregateRejected as exc:
        log.warning("round %d: rejected the unmasked aggregate: %s", server_round, exc)
        report.rejected["aggregate"] = str(exc)
        return None, None, wire
    report.accepted = sorted(result.metrics)
    report.metrics = result.metrics
    metrics = weighted_metrics([(m, result.num_examples[site])
                                for site, m in sorted(result.metrics.items())])
    metrics.pop(strategy.weighted_by_key, None)
    return (apply_change(received_weights(global_weights, transfer), change),
            MetricRecord(metrics), wire)


ROUND_RECORD = "metrics.jsonl"  # one JSON line per finished round, in the run folder


def rounds_recorded(run_dir: Path) -> int:
    """The last round the federation has recorded in ``run_dir`` (0 if none)."""
    path = Path(run_dir) / ROUND_RECORD
    rounds = [0]
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError, ValueError):
                rounds.append(int(json.loads(line)["round"]))
    return max(rounds)


def _tracker(cfg: dict[str, Any], run_dir: Path):
    mode = str(cfg.get("logger", {}).get("wandb_mode", "offline"))
    if mode == "disabled":
        return None
    import wandb

    # Only the experiment config and aggregate numbers go to wandb: no paths, no subjects.
    return wandb.init(project=cfg["logger"].get("project", "fed-ndif"), dir=str(run_dir),
                      mode=mode, config={k: cfg[k] for k in ("model", "diffusion", "train", "fl")},
                      reinit="finish_previous")


def run_federation(grid: Grid, cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run (or resume) the configured FedAvg rounds; return the final global weights."""
    fl = cfg["fl"]
    transfer = str(fl.get("transfer_dtype", "float32"))
    check_transfer_dtype(transfer)  # a bad setting fails before anything is written
    secure = SecAggSettings.from_config(fl) if fl.get("secure_aggregation") else None
    run_dir = Path(cfg["run_dir"])
    (run_dir / GLOBAL_CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    state = build_state(cfg, device="cpu")
    start_round = 0
    latest = latest_global_checkpoint(run_dir) if fl.get("resume", True) else None
    if latest is not None:
        start_round, path = latest
        ckpt = read_checkpoint(path)
        for section in ("model", "diffusion", "data"):
            if ckpt["config"][section] != state.cfg[section]:
                raise FedNdifError(f"{path}: its {section} settings differ from this run's; "
                                   "resume with the same settings or use a new run_dir")
        set_weights(state, {k: v.numpy() for k, v in ckpt["model"].items()})
        log.info("resuming from %s (round %d of %d)", path, start_round, fl["rounds"])
    else:
        save_checkpoint(state, global_checkpoint_path(run_dir, 0), federated_round=0)
    weights = get_weights(state)
    strategy: Any = CheckedFedAvg(
        reference=weights, fraction_train=float(fl["fraction_train"]),
        fraction_evaluate=1.0 if int(fl["evaluate_max_studies"]) > 0 else 0.0,
        min_train_nodes=int(fl["min_sites"]), min_evaluate_nodes=int(fl["min_sites"]),
        min_available_nodes=int(fl["min_sites"]))
    checked = strategy
    if fl["dp"]["enabled"]:
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=float(fl["dp"]["noise_multiplier"]),
            clipping_norm=float(fl["dp"]["clipping_norm"]),
            num_sampled_clients=int(fl["min_sites"]))
    tracker = _tracker(cfg, run_dir)
    arrays, global_weights = to_array_record(weights), weights
    train_config = ConfigRecord({"local-steps": int(fl["local_steps"])})
    timeout = float(fl["round_timeout_s"])
    try:
        for server_round in range(start_round + 1, int(fl["rounds"]) + 1):
            started = time.perf_counter()
            sent = _on_the_wire(global_weights, transfer)
            if secure is not None:
                new_weights, train_metrics, wire = secure_train(
                    grid, checked, server_round, sent, train_config, secure, timeout=timeout,
                    global_weights=global_weights, transfer=transfer)
                if new_weights is not None:
                    arrays, global_weights = to_array_record(new_weights), new_weights
            else:
                messages = list(strategy.configure_train(server_round, sent, train_config, grid))
                replies = send_and_receive(grid, messages, timeout=timeout,
                                           destinations=checked.destinations)
                wire = {"sent": sum(content_bytes(m.content) for m in messages),
                        "received": sum(content_bytes(r.content) for r in replies
                                        if not r.has_error())}
                replies = decode_replies(replies, received_weights(global_weights, transfer),
                                         transfer)
                # The DP wrapper clips each (decoded) update against the round's model: give
                # it the float32 master, not the float16 copy that was sent.
                if strategy is not checked:
                    strategy.current_arrays = arrays
                new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
                if new_arrays is not None:
                    arrays, global_weights = new_arrays, from_array_record(new_arrays)
            set_weights(state, global_weights)
            save_checkpoint(state, global_checkpoint_path(run_dir, server_round),
                            federated_round=server_round)
            eval_metrics = None
            if int(fl["evaluate_max_studies"]) > 0:
                eval_replies = send_and_receive(
                    grid, strategy.configure_evaluate(
                        server_round, _on_the_wire(global_weights, transfer), ConfigRecord(),
                        grid),
                    timeout=timeout, destinations=checked.destinations)
                eval_metrics = strategy.aggregate_evaluate(server_round, eval_replies)
            record = {
                "round": server_round, "seconds": time.perf_counter() - started,
                "train": dict(train_metrics or {}), "evaluate": dict(eval_metrics or {}),
                "sites": checked.last_train.accepted, "rejected": checked.last_train.rejected,
                "failed": checked.last_train.failed,
                "per_site": {site: {**m, **checked.last_evaluate.metrics.get(site, {})}
                             for site, m in checked.last_train.metrics.items()},
                "update_bytes": int(sent.count_bytes()),
                "train_bytes": wire, "secure_aggregation": secure is not None,
            }
            with (run_dir / ROUND_RECORD).open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            log.info("round %d/%d done in %.1f s: sites %s, %s", server_round, fl["rounds"],
                     record["seconds"], record["sites"], ", ".join(
                         f"{k}={v:.4g}" for k, v in {**record["train"],
                                                       **record["evaluate"]}.items()))
            if tracker is not None:
                tracker.log({"round": server_round, **record["train"], **record["evaluate"],
                             "sites_accepted": len(record["sites"])}, step=server_round)
    finally:
        if tracker is not None:
            tracker.finish()
    return global_weights

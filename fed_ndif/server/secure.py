"""One training round through Flower's SecAgg+, inside our Message-API round loop.

How it is bridged, and why. Flower 1.42's ``SecAggPlusWorkflow`` runs only with a
``LegacyContext`` (a legacy ``Strategy`` and ``ClientManager``): ``DefaultWorkflow`` calls it as
its ``fit_workflow`` once per round. We do not hand the federation to ``DefaultWorkflow``: its
loop always starts at round 1 (no resume from the latest global checkpoint), keeps the model as
nameless legacy ``Parameters``, and has no place for our checkpoints, round records, checked
evaluation and site names. So :func:`fed_ndif.server.federation.run_federation` keeps its own
loop and, in secure mode, calls the workflow for the training step of each round exactly as
``DefaultWorkflow`` would, with a ``LegacyContext`` made for that round. Its legacy strategy
(:class:`_OneRound`) only hands out the instructions we built (the nodes Flower's Message-API
``FedAvg`` sampled, the global weights) and receives the unmasked aggregate. Everything after
(the check of the aggregate, the checkpoint, evaluation, the round record) is the same code as
in plain mode. No cryptography is written here: masking, key sharing, dropout recovery and
unmasking are Flower's (``secaggplus_mod`` on the sites, see fed_ndif.client.secure).

What travels: the global weights packed as in plain mode (two legacy tensors: index, payload);
back, each site's masked, quantized change (trained - received) and its scalar metrics (site
name, loss, example count, seconds) in the clear. The workflow's result is the example-weighted
mean of the changes (fed_ndif.secagg).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fed_ndif.errors import FedNdifError
from fed_ndif.run_config import INDEX, PACKED
from fed_ndif.secagg import MODULUS_RANGE, SecAggSettings

log = logging.getLogger(__name__)

Exchange = Callable[..., list[Message]]  # federation.send_and_receive


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's records (arrays, metrics, configs: masked vectors travel in one).

    Counted here for config records: Flower 1.42's ``ConfigRecord.count_bytes`` fails on an
    empty list, which SecAgg+'s unmask stage sends (no dropped neighbour).
    """
    total = 0
    for record in content.values():
        if not isinstance(record, ConfigRecord):
            total += record.count_bytes()
            continue
        for key, value in record.items():
            total += len(key.encode()) + sum(_value_bytes(v) for v in (
                value if isinstance(value, list) else [value]))
    return int(total)


def _value_bytes(value: Any) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    return 1 if isinstance(value, bool) else 8


def make_workflow(settings: SecAggSettings, timeout: float | None) -> SecAggPlusWorkflow:
    try:
        return SecAggPlusWorkflow(
            num_shares=settings.num_shares,
            reconstruction_threshold=settings.reconstruction_threshold,
            max_weight=settings.max_weight, clipping_range=settings.clipping_range,
            quantization_range=settings.quantization_range, modulus_range=MODULUS_RANGE,
            timeout=timeout)
    except (TypeError, ValueError) as exc:
        raise FedNdifError(f"fl.secagg: {exc}") from None


def legacy_tensors(packed: ArrayRecord) -> Parameters:
    """A packed weight record (fed_ndif.run_config) as the two tensors of legacy Parameters."""
    return ndarrays_to_parameters([packed[INDEX].numpy(), packed[PACKED].numpy()])


class _OneRound(Strategy):
    """The legacy strategy of one SecAgg+ round: hands out our instructions, keeps the result.

    The workflow replaces every result's parameters with the unmasked aggregate before it calls
    :meth:`aggregate_fit`; per-site parameters never reach this object.
    """

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return self.instructions

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Exchange:
    """The grid as the workflow sees it: exchanges go through ``exchange`` (our faster polling
    of a deployed SuperLink); bytes each way are counted and error replies kept per node."""

    def __init__(self, grid: Grid, exchange: Exchange, timeout: float) -> None:
        self.grid, self.exchange, self.timeout = grid, exchange, timeout
        self.sent_bytes = self.received_bytes = 0
        self.errors: dict[int, str] = {}  # node id -> first error of the round
        self.names: dict[int, str] = {}  # node id -> site name, from any stage's reply
        self.stages = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        messages = list(messages)
        self.stages += 1
        self.sent_bytes += sum(content_bytes(m.content) for m in messages)
        destinations: dict[str, int] = {}
        replies = self.exchange(self.grid, messages, timeout=timeout or self.timeout,
                                destinations=destinations)
        answered = set()
        for reply in replies:
            node = destinations.get(reply.metadata.reply_to_message_id,
                                    reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error():
                self.errors.setdefault(node, f"stage {self.stages}: {reply.error.reason}")
                continue
            self.received_bytes += content_bytes(reply.content)
            if "site" in reply.content.config_records:
                self.names[node] = str(reply.content.config_records["site"].get("name"))
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in answered:
                self.errors.setdefault(node, f"stage {self.stages}: no reply within "
                                             f"{timeout or self.timeout:.0f} s")
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


@dataclass
class SecureRound:
    """What one SecAgg+ round gave the coordinator."""

    mean_change: list[np.ndarray] | None = None  # None: the workflow halted
    num_examples: dict[str, float] = field(default_factory=dict)  # per contributing site
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    sent_bytes: int = 0
    received_bytes: int = 0


def secure_train_round(grid: Grid, *, server_round: int, nodes: list[int],
                       sent: ArrayRecord, train_config: ConfigRecord,
                       settings: SecAggSettings, timeout: float, exchange: Exchange,
                       site_names: dict[int, str]) -> SecureRound:
    """Run SecAgg+ over ``nodes`` with the (packed) global weights ``sent``.

    ``site_names`` (node id -> site) is read to name failures and updated from the replies.
    """
    settings.check_sites(len(nodes))
    config = {**dict(train_config), "server-round": server_round}
    tensors = legacy_tensors(sent)
    proxies = [GridClientProxy(node, grid, 0) for node in sorted(nodes)]
    strategy = _OneRound([(p, FitIns(tensors, dict(config))) for p in proxies])
    manager = SimpleClientManager()
    for proxy in proxies:
        manager.register(proxy)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}),
                            strategy=strategy, client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    wire = _Exchange(grid, exchange, timeout)
    make_workflow(settings, timeout)(wire, context)  # type: ignore[arg-type]

    result = SecureRound(sent_bytes=wire.sent_bytes, received_bytes=wire.received_bytes)
    site_names.update(wire.names)
    contributors = set()
    for proxy, fitres in strategy.results or []:
        metrics = dict(fitres.metrics)
        name = str(metrics.pop("site", f"node {proxy.node_id}"))
        site_names[proxy.node_id] = name
        contributors.add(proxy.node_id)
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        result.metrics[name] = {**numbers, "num-examples": float(fitres.num_examples)}
        result.num_examples[name] = float(fitres.num_examples)
    for node in sorted(set(nodes) - contributors):
        # When the round halted, a site that answered every stage it was asked is not at fault.
        if node in wire.errors or strategy.results:
            result.failed[site_names.get(node, f"node {node}")] = wire.errors.get(
                node, "dropped out of secure aggregation")
    for node, reason in wire.errors.items():
        if node in contributors:  # sent its masked change, then dropped: still in the sum
            log.warning("round %d: site %s dropped after sending its masked update (%s)",
                        server_round, site_names.get(node, f"node {node}"), reason)
    if strategy.results:
        result.mean_change = parameters_to_ndarrays(strategy.results[0][1].parameters)
    return result


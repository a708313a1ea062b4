"""The federation in one process: the real ServerApp and ClientApps, with messages handed over
in memory instead of through a SuperLink.

``simulation.engine: inprocess`` runs ``fed-ndif simulate``'s federations this way: the same
FedAvg rounds, checks, checkpoints and round records as Flower's simulation engine, with no Ray
and no SuperLink (a machine without them, such as a GPU box that cannot install Ray, and the
federation unit tests). Sites train one after another on one device. Flower offers no in-memory
Grid, hence this one; it leans on Flower 1.42's private ``TaskIdentity`` (a ``Message`` cannot
be built outside Flower's runtime without it), so that private use stays in this one module.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fed_ndif.run_config import to_run_config

RUN_ID = 7
SERVER_NODE_ID = 0


class InProcessGrid(Grid):
    """Delivers each message to ``client_app`` with a per-node Context kept across rounds.

    ``node_configs`` maps node id -> node config (e.g. the site's data path). ``fail`` may
    return an exception to raise instead of calling the client (to simulate a site crash).
    """

    def __init__(self, client_app: ClientApp, node_configs: dict[int, dict], *,
                 run_config: dict, fail: Callable[[int, Message], Exception | None] | None = None
                 ) -> None:
        TaskIdentity.run_id = RUN_ID
        TaskIdentity.node_id = SERVER_NODE_ID
        TaskIdentity.task_id = 1
        self.client_app = client_app
        self.fail = fail
        self.contexts = {
            node_id: Context(run_id=RUN_ID, node_id=node_id, node_config=dict(config),
                             state=RecordDict(), run_config=dict(run_config))
            for node_id, config in node_configs.items()
        }
        self._run: Run | None = None
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count(1)
        self.calls: list[tuple[int, str]] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            self.calls.append((node_id, message.metadata.message_type))
            injected = self.fail(node_id, message) if self.fail else None
            try:
                if injected is not None:
                    raise injected
                # A copy, as the real runtime delivers a deserialized one: a ClientApp (or a
                # mod: SecAgg+ pops keys) may change what it receives.
                reply = self.client_app(copy.deepcopy(message), self.contexts[node_id])
            except Exception as exc:  # the real runtime turns a ClientApp crash into an Error
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"),
                                reply_to=message)
            message_id = str(next(self._ids))
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_inprocess_federation(fed: dict[str, Any], *, n_sites: int) -> None:
    """Run the fed-ndif ServerApp over ``n_sites`` ClientApps (node ``i`` is ``data.sites[i]``,
    as Flower's simulation assigns partitions) with run config ``fed``, in this process."""
    from fed_ndif.client.app import app as client_app
    from fed_ndif.server.app import app as server_app

    run_config = to_run_config(fed)
    nodes = {i + 1: {"partition-id": i, "num-partitions": n_sites} for i in range(n_sites)}
    grid = InProcessGrid(client_app, nodes, run_config=run_config)
    server_app(grid, Context(run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={},
                             state=RecordDict(), run_config=run_config))

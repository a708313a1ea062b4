"""The site's side of secure aggregation: Flower's ``secaggplus_mod`` and the legacy layout.

A SecAgg+ round sends a site four ``train`` messages (setup, share keys, collect masked
vectors, unmask). Flower's ``secaggplus_mod`` answers all but the third itself; for the third it
calls our train handler, takes the update out of its legacy ``FitRes`` reply, and sends it back
quantized and masked, with the reply's array records emptied. :func:`secure_aggregation_mod`
lets only the messages of a SecAgg+ round into that mod, so plain rounds and evaluation pass
unchanged; a site whose node config says ``secure-aggregation='required'`` refuses to train
for any round that is not secure, whatever the coordinator's run config says.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from fed_ndif.errors import FedNdifError
from fed_ndif.run_config import INDEX, PACKED, from_array_record
from fed_ndif.secagg import SecAggSettings, check_own_change, site_change

log = logging.getLogger(__name__)

REQUIRE_KEY = "secure-aggregation"  # node config: 'required' refuses plain training rounds


def requires_secure(node_config: Mapping[str, Any]) -> bool:
    value = str(node_config.get(REQUIRE_KEY, "")).strip().lower()
    if value not in ("", "required", "optional"):
        raise FedNdifError(f"node config {REQUIRE_KEY}='{value}': use 'required' or 'optional'")
    return value == "required"


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable, *,
                           site_name: Callable[[Context], str] | None = None) -> Message:
    """``secaggplus_mod`` for the messages of a SecAgg+ round; others pass through.

    ``site_name``: each SecAgg+ reply also carries the site's name (as plain replies do), so
    the coordinator can name a site that drops out at a later stage.
    """
    if msg.metadata.message_type == MessageType.TRAIN:
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            reply = secaggplus_mod(msg, context, call_next)
            if site_name is not None and not reply.has_error():
                reply.content["site"] = ConfigRecord({"name": site_name(context)})
            return reply
        if requires_secure(context.node_config):
            raise FedNdifError("this site requires secure aggregation (node config "
                               f"{REQUIRE_KEY}='required'); the coordinator asked for a plain "
                               "update, which is refused")
    return call_next(msg, context)


def is_secure(msg: Message) -> bool:
    """Whether a train message is the SecAgg+ round's request for the update."""
    return "fitins.parameters" in msg.content.array_records


def secure_instructions(msg: Message) -> tuple[OrderedDict[str, np.ndarray], dict[str, Any]]:
    """The global weights and the train config of a SecAgg+ request (legacy ``FitIns``)."""
    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    try:
        index, payload = parameters_to_ndarrays(fitins.parameters)
    except ValueError:
        raise FedNdifError("the secure round's weights are not the packed global model") \
            from None
    packed = ArrayRecord(OrderedDict([(INDEX, Array(index)), (PACKED, Array(payload))]))
    return from_array_record(packed), dict(fitins.config)


def masked_reply(msg: Message, name: str, metrics: dict[str, float],
                 trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                 settings: SecAggSettings) -> Message:
    """The reply the SecAgg+ mod masks: this site's checked change, in the legacy layout.

    Raises FedNdifError (the site then counts as dropped) if the change fails the checks that
    the coordinator can no longer make on it.
    """
    change = site_change(trained, received)
    num_examples = float(metrics["num-examples"])
    check_own_change(change, received, num_examples, settings)
    fitres = FitRes(status=Status(Code.OK, "Success"),
                    parameters=ndarrays_to_parameters(list(change.values())),
                    num_examples=int(num_examples),
                    metrics={"site": name, **{k: float(v) for k, v in metrics.items()}})
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

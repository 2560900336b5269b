"""SecAgg+ at the institution: Flower's ``secaggplus_mod`` around the one train handler.

A SecAgg+ round (:mod:`fedsilo.server.secagg`) runs four message stages; only the third
trains. Its message comes in Flower's legacy layout (``fitins.*`` records: the tensors
unnamed, their names under ``TENSOR_NAMES_KEY`` in the config). :func:`secagg_mod`
translates it into the Message-API train message every round uses and runs the same
handler inside :func:`~fedsilo.client.messages.secure_round`, so the handler checks the
received model, charges the ledger and releases the *update* (trained − received) as in
any round. Only then does the adapter check that the update fits the quantization range
and weight (a failed check is already charged, and a resent round is answered from the
replay, not trained again), and hand it to Flower's mod in the layout it masks.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
)
from flwr.compat.common import recorddict_compat as compat

from fedsilo.client.messages import error_reply, secure_round
from fedsilo.common.wire import (
    FAILED_CODE,
    INSTITUTION_KEY,
    SECAGG_RANGE_CODE,
    TENSOR_NAMES_KEY,
    named_arrays,
)

log = logging.getLogger(__name__)


class SecAggRangeError(RuntimeError):
    """An update SecAgg+ cannot represent exactly (quantization range, weight)."""


def check_secagg_range(context: Context, update: list[np.ndarray], num_examples: int) -> None:
    """Refuse an update SecAgg+ would silently clip or overflow.

    Flower's SecAgg+ clips every coordinate to ±``clipping_range`` before quantizing
    and warns only when the weight exceeds ``max_weight``; both would corrupt the
    aggregate without an error.

    Raises
    ------
    SecAggRangeError
        If a coordinate or the example count is out of range.
    """
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if state is None:
        return
    limit, max_weight = float(state["clipping_range"]), float(state["max_weight"])
    largest = max((float(np.abs(a).max()) for a in update if a.size), default=0.0)
    if largest > limit:
        raise SecAggRangeError(
            f"this update has a coordinate of size {largest:.4g}, beyond the SecAgg+ "
            f"quantization range ±{limit:g}; it would be clipped silently. Raise "
            "--secagg-clipping-range (costs precision) or lower --learning-rate")
    if num_examples > max_weight:
        raise SecAggRangeError(
            f"{num_examples} training examples exceed --secagg-max-weight {max_weight:g}; "
            "the weighted SecAgg+ sum would overflow. Raise --secagg-max-weight")


def as_train_message(msg: Message) -> Message:
    """The SecAgg+ training stage's legacy message as a Message-API train message.

    Raises
    ------
    ValueError
        If the tensor names are missing or do not match the tensors.
    """
    tensors = msg.content.array_records["fitins.parameters"].to_numpy_ndarrays()
    config = dict(msg.content.config_records["fitins.config"])
    names = config.pop(TENSOR_NAMES_KEY, None)
    if (not isinstance(names, list) or len(names) != len(tensors)
            or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names)):
        raise ValueError(f"the SecAgg+ train message names its {len(tensors)} tensors "
                         f"wrongly ({TENSOR_NAMES_KEY!r}); both sides must run fedsilo")
    content = RecordDict({"arrays": ArrayRecord({n: Array(t) for n, t in
                                                 zip(names, tensors, strict=True)}),
                          "config": ConfigRecord(config)})  # type: ignore[arg-type]
    return Message(content=content, metadata=msg.metadata)


def as_fit_reply(reply: Message, msg: Message) -> Message:
    """The handler's train reply (update and metrics) in the layout Flower's mod masks."""
    metrics = dict(reply.content["metrics"])
    name = str(reply.content[INSTITUTION_KEY]["name"])
    update = list(named_arrays(reply.content["arrays"]).values())
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update),
                 int(metrics["num-examples"]), {**metrics, INSTITUTION_KEY: name})
    return Message(content=compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


class _ErrorReply(Exception):
    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run SecAgg+ messages through Flower's ``secaggplus_mod`` and the translation above.

    Any other message goes to the handler as it is. An error reply of the handler (a
    declined round, a refused model) is passed back as the error it is (Flower's mod
    would fail reading its missing content); a failed translation or range check
    becomes a generic error reply, its details in the institution's log.
    """
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def train_secure(legacy: Message, ctx: Context) -> Message:
        try:
            inner = as_train_message(legacy)
        except (KeyError, TypeError, ValueError):
            log.exception("refused a SecAgg+ train message")
            raise _ErrorReply(error_reply(legacy, FAILED_CODE)) from None
        with secure_round():
            reply = call_next(inner, ctx)
        if reply.has_error():
            raise _ErrorReply(reply)
        update = list(named_arrays(reply.content["arrays"]).values())
        try:
            check_secagg_range(ctx, update, int(reply.content["metrics"]["num-examples"]))
        except SecAggRangeError as err:
            log.error("%s", err)
            raise _ErrorReply(error_reply(legacy, SECAGG_RANGE_CODE)) from None
        return as_fit_reply(reply, legacy)

    try:
        return secaggplus_mod(msg, context, train_secure)
    except _ErrorReply as err:
        return Message(err.reply.error, reply_to=msg)

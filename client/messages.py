"""Both message layouts an institution answers, and Flower's SecAgg+ mod around them.

fedsilo's coordinator speaks the Message API (``arrays`` + ``config`` records). With
SecAgg+ on, it runs Flower's legacy workflow instead, whose train and evaluate
messages carry ``fitins.*`` / ``evaluateins.*`` records with unnamed arrays in the
order of the trainable tensors; under SecAgg+ the institution replies with its
*update* (trained − received), which the SecAgg+ mod quantizes and masks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
)
from flwr.compat.common import recorddict_compat as compat

from fedsilo.client.runtime_bundle import Origin
from fedsilo.common.wire import (
    CORRECTION_KEY,
    DECLINED_CODE,
    FAILED_CODE,
    INSTITUTION_KEY,
    REFUSED_MODEL_CODE,
    SECAGG_RANGE_CODE,
    named_arrays,
)

log = logging.getLogger(__name__)

#: What handles one message at the institution (:mod:`fedsilo.client.handlers`).
Handler = Callable[[Message, Context, Origin], Message]


#: The only text an error reply carries besides a decline's reason: one fixed message
#: per code, so no path, traceback, count or value derived from the data leaves.
GENERIC_REASONS = {
    FAILED_CODE: "failed: this institution could not process the message; the details "
                 "are in its own log",
    REFUSED_MODEL_CODE: "refused: the received model is not finite or lies outside the "
                        "bounds of the approved agreement",
    SECAGG_RANGE_CODE: "failed: this update is outside the SecAgg+ range or weight the run "
                       "allows",
}


def error_reply(msg: Message, code: int) -> Message:
    """An error reply to ``msg`` carrying ``code`` and its fixed generic reason only."""
    return Message(Error(code=code, reason=GENERIC_REASONS.get(code,
                                                               GENERIC_REASONS[FAILED_CODE])),
                   reply_to=msg)


def generic_errors(refused: type[Exception]) -> Callable[[Handler], Handler]:
    """Make a handler answer any failure with a code and its fixed generic reason.

    A decline keeps its reason (terms of the run or the budget, never data); ``refused``
    (a received model outside the agreed bounds) gets ``REFUSED_MODEL_CODE``; every other
    error reply, and any exception (a traceback, a data file's path, per-label counts),
    gets ``FAILED_CODE``. The details go to the institution's own log.
    """
    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def guarded(msg: Message, context: Context, origin: Origin) -> Message:
            try:
                reply = handler(msg, context, origin)
            except refused:
                log.exception("refused the received model of a %s message",
                              msg.metadata.message_type)
                return error_reply(msg, REFUSED_MODEL_CODE)
            except Exception:  # noqa: BLE001 - the details stay in the institution's log
                log.exception("the %s message failed", msg.metadata.message_type)
                return error_reply(msg, FAILED_CODE)
            if reply.has_error() and reply.error.code != DECLINED_CODE:
                log.error("the %s message failed: %s", msg.metadata.message_type,
                          reply.error.reason)
                return error_reply(msg, reply.error.code)
            return reply

        return guarded

    return wrap


class SecAggRangeError(RuntimeError):
    """An update SecAgg+ cannot represent exactly (quantization range, weight)."""


@dataclass(frozen=True)
class Request:
    """A train or evaluate request in either layout.

    ``arrays`` is a name → array mapping (Message API) or the arrays in trainable
    order (legacy layout, ``legacy=True``).
    """

    arrays: Mapping[str, np.ndarray] | list[np.ndarray]
    config: Mapping[str, Any]
    legacy: bool
    correction: Mapping[str, np.ndarray] = field(default_factory=dict)  # scaffold


def read_request(msg: Message) -> Request:
    """Decode the received global tensors and round config."""
    content = msg.content
    for prefix in ("fitins", "evaluateins"):
        if f"{prefix}.parameters" in content.array_records:
            arrays = content.array_records[f"{prefix}.parameters"].to_numpy_ndarrays()
            return Request(arrays, dict(content.config_records[f"{prefix}.config"]), True)
    config = dict(content.config_records["config"]) if "config" in content else {}
    correction = (named_arrays(content.array_records[CORRECTION_KEY])
                  if CORRECTION_KEY in content.array_records else {})
    return Request(named_arrays(content["arrays"]), config, False, correction)


def name_arrays(request: Request, names: list[str]) -> dict[str, np.ndarray]:
    """Name the received arrays after the model's trainable tensors (legacy order)."""
    if not request.legacy:
        return dict(request.arrays)  # type: ignore[arg-type]
    if len(request.arrays) != len(names):
        raise ValueError(f"the coordinator sent {len(request.arrays)} tensors but this "
                         f"model trains {len(names)}; both sides must use the same "
                         "model and trainable settings")
    return dict(zip(names, request.arrays, strict=True))


def train_reply(msg: Message, request: Request, name: str, metrics: dict[str, float],
                released: Mapping[str, np.ndarray]) -> Message:
    """Reply with what :func:`released_arrays` chose, in the request's layout."""
    if not request.legacy:
        content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v))
                                                     for k, v in released.items()}),
                              "metrics": MetricRecord(metrics),
                              INSTITUTION_KEY: ConfigRecord({"name": name})})
        return Message(content=content, reply_to=msg)
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(released.values())),
                 int(metrics["num-examples"]), {**metrics, INSTITUTION_KEY: name})
    return Message(content=compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def released_arrays(request: Request, state: Mapping[str, np.ndarray],
                    received: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """What leaves: the trained tensors, or the update (trained − received).

    The update travels under SecAgg+ (float32, quantized by Flower's mod) and with
    ``update-dtype = float16`` (half precision; the coordinator adds it back in float32).
    """
    if not request.legacy and dtype == "float32":
        return dict(state)
    wire = np.float16 if dtype == "float16" and not request.legacy else np.float32
    return {k: np.asarray(v - received[k], dtype=wire) for k, v in state.items()}


def evaluate_reply(msg: Message, request: Request, name: str,
                   metrics: dict[str, float]) -> Message:
    """Reply with local evaluation metrics in the request's layout."""
    if not request.legacy:
        content = RecordDict({"metrics": MetricRecord(metrics),
                              INSTITUTION_KEY: ConfigRecord({"name": name})})
        return Message(content=content, reply_to=msg)
    res = EvaluateRes(Status(Code.OK, ""), float(metrics["loss"]),
                      int(metrics["num-examples"]), {**metrics, INSTITUTION_KEY: name})
    return Message(content=compat.evaluateres_to_recorddict(res), reply_to=msg)


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


class _ErrorReply(Exception):
    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's ``secaggplus_mod`` on SecAgg+ messages only.

    An error reply of the app (a declined round, a range error) is passed back as
    the error it is; Flower's mod would otherwise fail reading its missing content.
    """
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def checked(inner: Message, ctx: Context) -> Message:
        reply = call_next(inner, ctx)
        if reply.has_error():
            raise _ErrorReply(reply)
        return reply

    try:
        return secaggplus_mod(msg, context, checked)
    except _ErrorReply as err:
        return Message(err.reply.error, reply_to=msg)

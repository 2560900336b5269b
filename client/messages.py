"""The one request and reply layout an institution answers, and its generic errors.

fedsilo's coordinator speaks the Message API (``arrays`` + ``config`` records) in every
round; a SecAgg+ round's training stage arrives in Flower's legacy layout and is
translated to this one by :mod:`fedsilo.client.secagg` before any handler reads it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
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


@dataclass(frozen=True)
class Request:
    """A train or evaluate request: the received tensors by name and the round config.

    ``secure_aggregation`` is set only inside a SecAgg+ round
    (:func:`fedsilo.client.secagg.secagg_mod`): the reply then carries the update
    (trained − received), which Flower's mod masks.
    """

    arrays: Mapping[str, np.ndarray]
    config: Mapping[str, Any]
    correction: Mapping[str, np.ndarray] = field(default_factory=dict)  # scaffold
    secure_aggregation: bool = False


#: True while :func:`secure_round` runs (the SecAgg+ adapter around a train handler).
_SECURE_ROUND: ContextVar[bool] = ContextVar("fedsilo_secure_round", default=False)


@contextmanager
def secure_round() -> Iterator[None]:
    """Mark the requests read inside this block as part of a SecAgg+ round."""
    token = _SECURE_ROUND.set(True)
    try:
        yield
    finally:
        _SECURE_ROUND.reset(token)


class MessageLayoutError(ValueError):
    """A message that is not in the one layout fedsilo answers."""


def read_request(msg: Message) -> Request:
    """Decode the received global tensors and round config.

    Raises
    ------
    MessageLayoutError
        If the message is not in the Message-API layout (an ``arrays`` record): Flower's
        legacy layout is answered only inside a SecAgg+ round, which translates it.
    """
    content = msg.content
    if "arrays" not in content.array_records:
        raise MessageLayoutError(
            f"a {msg.metadata.message_type} message without an 'arrays' record (records: "
            f"{sorted(content.keys())[:5]}); fedsilo answers the Message-API layout, and "
            "Flower's legacy layout only inside a SecAgg+ round")
    config = dict(content.config_records["config"]) if "config" in content else {}
    correction = (named_arrays(content.array_records[CORRECTION_KEY])
                  if CORRECTION_KEY in content.array_records else {})
    return Request(named_arrays(content["arrays"]), config, correction, _SECURE_ROUND.get())


def train_reply(msg: Message, name: str, metrics: dict[str, float],
                released: Mapping[str, np.ndarray]) -> Message:
    """Reply with what :func:`released_arrays` chose and the metrics that may leave."""
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v))
                                                 for k, v in released.items()}),
                          "metrics": MetricRecord(metrics),
                          INSTITUTION_KEY: ConfigRecord({"name": name})})
    return Message(content=content, reply_to=msg)


def released_arrays(request: Request, state: Mapping[str, np.ndarray],
                    received: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """What leaves: the trained tensors, or the update (trained − received).

    The update travels under SecAgg+ (float32, quantized by Flower's mod) and with
    ``update-dtype = float16`` (half precision; the coordinator adds it back in float32).
    """
    if not request.secure_aggregation and dtype == "float32":
        return dict(state)
    wire = np.float16 if dtype == "float16" and not request.secure_aggregation else np.float32
    return {k: np.asarray(v - received[k], dtype=wire) for k, v in state.items()}


def evaluate_reply(msg: Message, name: str, metrics: dict[str, float]) -> Message:
    """Reply with the local evaluation metrics that may leave."""
    content = RecordDict({"metrics": MetricRecord(metrics),
                          INSTITUTION_KEY: ConfigRecord({"name": name})})
    return Message(content=content, reply_to=msg)

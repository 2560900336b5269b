"""What every fedsilo strategy does with replies: report them, decode half-precision updates."""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedsilo.common import journal
from fedsilo.common.config import TrainConfig
from fedsilo.server.report import RunReport, institution_name
from fedsilo.server.validation import check_update, max_coordinate_change, planned_steps


def decode_update(reply: Message, sent: ArrayRecord) -> Message:
    """Turn a half-precision update (trained − received) back into float32 tensors.

    Institutions with ``update-dtype = float16`` send their update in half precision;
    the coordinator adds it to the float32 tensors it sent, so aggregation is float32.
    Other replies are returned unchanged.
    """
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return reply
    arrays = reply.content["arrays"]
    if not any(a.dtype == "float16" for a in arrays.values()) or set(arrays) != set(sent):
        return reply
    base = dict(zip(sent.keys(), sent.to_numpy_ndarrays(), strict=True))
    decoded = {k: Array(np.asarray(base[k] + v.astype(np.float32), dtype=base[k].dtype))
               for k, v in zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True)}
    reply.content["arrays"] = ArrayRecord(decoded)
    return reply


def _named(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))


def _journal_reply(report: RunReport, server_round: int, reply: Message) -> None:
    """Journal one reply as received: who, its size and hash, or its error."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        journal.append(report.journal, "error", round=server_round, node=node,
                       code=reply.error.code, reason=reply.error.reason)
        return
    arrays = reply.content.array_records.get("arrays")
    eps = float(reply.content["metrics"]["epsilon"])
    journal.append(report.journal, "received", round=server_round, node=node,
                   institution=institution_name(reply),
                   update=journal.digest(_named(arrays)) if arrays is not None else None,
                   epsilon=None if np.isinf(eps) else eps)


class ReportingMixin:
    """Mixin for a Message-API strategy: report replies, decode updates, then aggregate."""

    def __init__(self, *, report: RunReport, train: TrainConfig, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.report, self.train = report, train
        self._sent = ArrayRecord()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Remember the global tensors this round starts from, and journal them."""
        self._sent = arrays
        journal.append(self.report.journal, "sent", round=server_round,
                       global_model=journal.digest(_named(arrays)))
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[
        ArrayRecord | None, MetricRecord | None
    ]:
        """Report every reply (sizes as received), reject invalid ones, aggregate in float32."""
        replies = list(replies)
        self.report.record_train(server_round, replies)
        for reply in replies:
            _journal_reply(self.report, server_round, reply)
        started = time.perf_counter()
        sent = dict(zip(self._sent.keys(), self._sent.to_numpy_ndarrays(), strict=True))
        largest = max((float(np.abs(v).max()) for v in sent.values() if v.size), default=0.0)
        accepted = []
        for reply in (decode_update(r, self._sent) for r in replies):
            reason = None if reply.has_error() else self._invalid(reply, sent, largest)
            if reason is None:
                accepted.append(reply)
            else:
                self.report.reject(server_round, institution_name(reply), reason)
                journal.append(self.report.journal, "rejected", round=server_round,
                               institution=institution_name(reply), reason=reason)
        result = super().aggregate_train(server_round, accepted)  # type: ignore[misc]
        self.report.record_aggregation(server_round, time.perf_counter() - started)
        return result

    def _invalid(self, reply: Message, sent: dict[str, np.ndarray], largest: float
                 ) -> str | None:
        """Why this update cannot be aggregated (structure, values, size), or None."""
        if "arrays" not in reply.content.array_records:
            return "the reply carries no tensors"
        arrays = reply.content["arrays"]
        received = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))
        examples = int(reply.content["metrics"]["num-examples"])
        steps = planned_steps(examples, self.train.batch_size, self.train.local_epochs)
        bound = max_coordinate_change(self.train.learning_rate, steps, largest)
        return check_update(received, sent, bound)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Aggregate and report the institutions' local evaluations."""
        metrics = super().aggregate_evaluate(server_round, list(replies))  # type: ignore[misc]
        self.report.record_federated_eval(server_round, metrics)
        return metrics

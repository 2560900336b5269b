"""What every fedsilo strategy does with replies: report them, decode half-precision updates."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from fedsilo.common import journal
from fedsilo.common.bounds import (
    largest_learning_rate,
    max_coordinate_change,
    max_sgd_change,
    planned_steps,
)
from fedsilo.common.config import PrivacyConfig, TrainConfig
from fedsilo.common.wire import named_arrays
from fedsilo.server.report import RunReport, institution_name
from fedsilo.server.validation import check_update


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
    base = named_arrays(sent)
    decoded = {k: Array(np.asarray(base[k] + v.astype(np.float32), dtype=base[k].dtype))
               for k, v in zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True)}
    reply.content["arrays"] = ArrayRecord(decoded)
    return reply


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
                   update=journal.digest(named_arrays(arrays)) if arrays is not None else None,
                   epsilon=None if np.isinf(eps) else eps)


@dataclass
class _Round:
    """One training round at the coordinator: what was sent and the running weighted sum."""

    sent: dict[str, np.ndarray]
    largest: float
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # float64 Σ weight × tensor
    weight: float = 0.0
    loss: float = 0.0  # Σ weight × train-loss
    seen: set[str] = field(default_factory=set)  # message ids already absorbed
    accepted: list[Message] = field(default_factory=list)  # when updates are not folded
    seconds: float = 0.0

    def fold(self, reply: Message, weight_key: str) -> None:
        """Add ``reply``'s update to the weighted sum and drop its tensors."""
        metrics = reply.content["metrics"]
        weight = float(metrics[weight_key])
        for key, value in zip(reply.content["arrays"].keys(),
                              reply.content["arrays"].to_numpy_ndarrays(), strict=True):
            if key in self.sums:
                self.sums[key] += weight * value.astype(np.float64)
            else:
                self.sums[key] = weight * value.astype(np.float64)
        self.weight += weight
        self.loss += weight * float(metrics["train-loss"])
        reply.content["arrays"] = ArrayRecord()

    def mean(self, weight_key: str) -> Message:
        """The folded updates as one reply: their weighted mean, weighted by the total."""
        arrays = ArrayRecord({k: Array(v / self.weight) for k, v in self.sums.items()})
        metrics = MetricRecord({weight_key: self.weight, "train-loss": self.loss / self.weight})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), dst_node_id=0,
                       message_type=MessageType.TRAIN)


class ReportingMixin:
    """Mixin for a Message-API strategy: report replies, decode updates, then aggregate.

    With ``fold_updates`` (FedAvg, FedAdam) each accepted update is added to a running
    weighted sum as soon as it arrives (``absorb``, called by ``server.waiting`` per
    reply) and its tensors are dropped, so the coordinator holds one sum, not one
    update per institution. Without it (client-level DP clips each update first) the
    accepted replies are kept and handed to the wrapped strategy.
    """

    fold_updates = False

    def __init__(self, *, report: RunReport, train: TrainConfig, privacy: PrivacyConfig,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.report, self.train, self.privacy = report, train, privacy
        self._sent = ArrayRecord()
        self._round_number = 0
        self._state: _Round | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Remember the global tensors this round starts from, and journal them."""
        self._sent, self._round_number, self._state = arrays, server_round, None
        journal.append(self.report.journal, "sent", round=server_round,
                       global_model=journal.digest(named_arrays(arrays)))
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def _current(self) -> _Round:
        if self._state is None:
            sent = named_arrays(self._sent)
            largest = max((float(np.abs(v).max()) for v in sent.values() if v.size),
                          default=0.0)
            self._state = _Round(sent, largest)
        return self._state

    def absorb(self, reply: Message) -> Message:
        """Report, journal, decode and check one training reply of the current round.

        An accepted update is folded into the round's sum (``fold_updates``) or kept;
        a rejected one is reported with its reason. Returns the reply (without its
        tensors once folded).
        """
        state, server_round = self._current(), self._round_number
        started = time.perf_counter()
        state.seen.add(reply.metadata.message_id)
        self.report.record_train(server_round, [reply])
        _journal_reply(self.report, server_round, reply)
        if not reply.has_error():
            reply = decode_update(reply, self._sent)
            reason = self._invalid(reply, state.sent, state.largest)
            if reason is not None:
                self.report.reject(server_round, institution_name(reply), reason)
                journal.append(self.report.journal, "rejected", round=server_round,
                               institution=institution_name(reply), reason=reason)
            else:
                self.on_accepted(reply, state.sent)
                if self.fold_updates:
                    state.fold(reply, self.weighted_by_key)  # type: ignore[attr-defined]
                else:
                    state.accepted.append(reply)
        state.seconds += time.perf_counter() - started
        return reply

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[
        ArrayRecord | None, MetricRecord | None
    ]:
        """Absorb replies not seen yet, then aggregate the accepted updates in float32."""
        state = self._current()
        for reply in replies:
            if reply.metadata.message_id not in state.seen or not reply.metadata.message_id:
                self.absorb(reply)
        started = time.perf_counter()
        accepted = state.accepted
        if self.fold_updates and state.weight > 0:
            accepted = [state.mean(self.weighted_by_key)]  # type: ignore[attr-defined]
        arrays, metrics = super().aggregate_train(server_round, accepted)  # type: ignore[misc]
        if arrays is not None:  # keep the model's dtypes (FedAdam's step returns float64)
            arrays = ArrayRecord({k: Array(np.asarray(v, dtype=state.sent[k].dtype))
                                  for k, v in named_arrays(arrays).items()})
        self.report.record_aggregation(server_round,
                                       state.seconds + time.perf_counter() - started)
        self._state = None
        return arrays, metrics

    def on_accepted(self, reply: Message, sent: dict[str, np.ndarray]) -> None:
        """An accepted update (decoded, before it is folded); SCAFFOLD reads it here."""

    def correction_size(self, reply: Message) -> float:
        """Largest ``|c − c_i|`` sent to the reply's institution (0 without SCAFFOLD)."""
        return 0.0

    def _invalid(self, reply: Message, sent: dict[str, np.ndarray], largest: float
                 ) -> str | None:
        """Why this update cannot be aggregated (structure, values, size), or None."""
        if "arrays" not in reply.content.array_records:
            return "the reply carries no tensors"
        received = named_arrays(reply.content["arrays"])
        metrics, train = reply.content["metrics"], self.train
        examples = int(metrics["num-examples"])
        steps = planned_steps(examples, train.batch_size, train.local_epochs)
        bound: float | None = max_coordinate_change(
            largest_learning_rate(train.learning_rate, train.encoder_learning_rate), steps, largest)
        if train.optimizer == "sgd":
            bound = None  # plain SGD without DP-SGD: no bound on a step
            if self.privacy.dp and self.privacy.dp_level == "record":
                bound = max_sgd_change(train.learning_rate, steps, examples,
                                       train.batch_size, self.privacy.max_grad_norm,
                                       float(metrics["noise-multiplier"]),
                                       self.correction_size(reply))
        return check_update(received, sent, bound)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Aggregate and report the institutions' local evaluations (and their test size)."""
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        if metrics is not None:  # Flower's mean leaves out the weight; report the total
            metrics = MetricRecord({**metrics, "num-examples": sum(
                int(r.content["metrics"].get("num-examples", 0))
                for r in replies if not r.has_error())})
        self.report.record_federated_eval(server_round, metrics)
        return metrics

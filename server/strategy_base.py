"""The base of every fedsilo strategy: gate, report and fold replies; own the checkpointed state."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

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
from fedsilo.server.checkpoint import CheckpointError
from fedsilo.server.gate import Admission, Gate, load_roster
from fedsilo.server.report import RunReport


def _journal_received(report: RunReport, server_round: int, admitted: Admission,
                      masked: bool) -> None:
    """Journal one reply as received: who (authenticated), its update's hash, or its error."""
    reply = admitted.reply
    node = reply.metadata.src_node_id
    if reply.has_error():
        journal.append(report.journal, "error", round=server_round, node=node,
                       institution=admitted.name, code=reply.error.code,
                       reason=reply.error.reason)
        return
    arrays = reply.content.array_records.get("arrays")
    metrics = reply.content.metric_records.get("metrics") or {}
    eps = metrics.get("epsilon") if admitted.reason is None else None
    journal.append(report.journal, "received", round=server_round, node=node,
                   institution=admitted.name,
                   update="masked" if masked else (
                       journal.digest(named_arrays(arrays)) if arrays is not None else None),
                   epsilon=None if eps is None or math.isinf(float(eps)) else float(eps),
                   **({"weight": admitted.weight, "claimed_examples": admitted.clamped_from}
                      if admitted.clamped_from is not None else {}))


@dataclass
class _Round:
    """One training round at the coordinator: what was sent and the running weighted sum."""

    sent: dict[str, np.ndarray]
    largest: float
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # float64 Σ weight × tensor
    weight: float = 0.0
    loss: float = 0.0  # Σ weight × train-loss (of the replies that carry one)
    loss_weight: float = 0.0
    seen: set[str] = field(default_factory=set)  # message ids already absorbed
    #: Under SecAgg+: institutions whose masked contribution the gate rejected, with why.
    tainted: list[str] = field(default_factory=list)
    accepted: list[Message] = field(default_factory=list)  # when updates are not folded
    seconds: float = 0.0

    def fold(self, reply: Message, weight_key: str) -> None:
        """Add ``reply``'s update to the weighted sum and drop its tensors."""
        weight = float(reply.content["metrics"][weight_key])
        for key, value in zip(reply.content["arrays"].keys(),
                              reply.content["arrays"].to_numpy_ndarrays(), strict=True):
            if key in self.sums:
                self.sums[key] += weight * value.astype(np.float64)
            else:
                self.sums[key] = weight * value.astype(np.float64)
        self.weight += weight
        self.add_loss(reply, weight_key)
        reply.content["arrays"] = ArrayRecord()

    def add_loss(self, reply: Message, weight_key: str) -> None:
        """Add ``reply``'s training loss, if it released one, to the weighted mean."""
        metrics = reply.content["metrics"]
        if "train-loss" in metrics:  # optional: institutions may not release it
            weight = float(metrics[weight_key])
            self.loss += weight * float(metrics["train-loss"])
            self.loss_weight += weight

    def fold_sum(self, mean_update: dict[str, np.ndarray], weight: float) -> None:
        """Take SecAgg+'s unmasked mean update as the round's whole weighted sum."""
        self.sums = {k: weight * (self.sent[k].astype(np.float64) + v.astype(np.float64))
                     for k, v in mean_update.items()}
        self.weight = weight

    def mean(self, weight_key: str) -> Message:
        """The folded updates as one reply: their weighted mean, weighted by the total."""
        arrays = ArrayRecord({k: Array(v / self.weight) for k, v in self.sums.items()})
        metrics = MetricRecord({weight_key: self.weight, **(
            {"train-loss": self.loss / self.loss_weight} if self.loss_weight else {})})
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
    #: The strategy's attributes that carry state from round to round, which the
    #: checkpoint keeps: ``dict`` (by tensor name) or ``list`` (in tensor order).
    state_attributes: ClassVar[Mapping[str, type]] = MappingProxyType({})

    def __init__(self, *, report: RunReport, train: TrainConfig, privacy: PrivacyConfig,
                 gate: Gate | None = None, secure_aggregation: bool = False,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.report, self.train, self.privacy = report, train, privacy
        # Under SecAgg+ (server.secagg) replies carry metrics only; their updates
        # arrive as one unmasked sum (absorb_unmasked).
        self.secure_aggregation = secure_aggregation
        self.gate = gate if gate is not None else Gate(load_roster())
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
        """Gate, report and journal one training reply of the current round.

        Nothing reads the reply before :class:`~fedsilo.server.gate.Gate` has named its
        sender, typed its metrics, set its weight and checked its update. An accepted
        update is folded into the round's sum (``fold_updates``) or kept; a rejected one
        is reported and journalled with its reason. Returns the reply (without its
        tensors once folded; without its metrics when they were unusable).
        """
        state, server_round = self._current(), self._round_number
        started = time.perf_counter()
        state.seen.add(reply.metadata.message_id)
        admitted = self.gate.admit_train(
            reply, state.sent,
            lambda weight, metrics: self._bound(weight, metrics, state.largest, reply),
            masked=self.secure_aggregation)
        reply = admitted.reply
        _journal_received(self.report, server_round, admitted, self.secure_aggregation)
        if reply.has_error() and admitted.reason is None:
            self.report.record_train(server_round, [reply])
        elif admitted.reason is not None:
            self._reject(server_round, admitted)
            if self.secure_aggregation:  # its masked update is inside the round's sum
                state.tainted.append(f"{admitted.name} ({admitted.reason})")
        else:
            self.report.record_train(server_round, [reply])
            self.on_accepted(reply, state.sent)
            if self.secure_aggregation:
                state.add_loss(reply, self.weighted_by_key)  # type: ignore[attr-defined]
            elif self.fold_updates:
                state.fold(reply, self.weighted_by_key)  # type: ignore[attr-defined]
            else:
                state.accepted.append(reply)
        state.seconds += time.perf_counter() - started
        return reply

    def _reject(self, server_round: int, admitted: Admission) -> None:
        """Report and journal a rejected reply; drop what it carried."""
        # the gate named the sender from its node's registered key: later lines name it too
        self.report.names[admitted.reply.metadata.src_node_id] = admitted.name
        self.report.reject(server_round, admitted.name, str(admitted.reason))
        journal.append(self.report.journal, "rejected", round=server_round,
                       node=admitted.reply.metadata.src_node_id,
                       institution=admitted.name, reason=admitted.reason)
        if not admitted.reply.has_error():
            content = admitted.reply.content
            content["arrays"] = ArrayRecord()
            if admitted.weight == 0 and "metrics" in content.metric_records:
                content["metrics"] = MetricRecord()  # unusable: fused evaluation skips it

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[
        ArrayRecord | None, MetricRecord | None
    ]:
        """Absorb replies not seen yet, then aggregate the accepted updates in float32."""
        state = self._current()
        for reply in replies:
            if reply.metadata.message_id not in state.seen or not reply.metadata.message_id:
                self.absorb(reply)
        started = time.perf_counter()
        if state.tainted:  # SecAgg+: a sum cannot be split to leave a contribution out
            self._discard_sum(server_round, state)
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

    def absorb_unmasked(self, mean_update: dict[str, np.ndarray], weight: float) -> None:
        """Take the current round's SecAgg+ sum: its unmasked mean update and total weight."""
        state = self._current()
        state.fold_sum(mean_update, weight)
        journal.append(self.report.journal, "unmasked", round=self._round_number,
                       mean_update=journal.digest(mean_update))

    def _discard_sum(self, server_round: int, state: _Round) -> None:
        """Drop a SecAgg+ sum that holds a rejected contribution; the model stays as sent."""
        reason = ("discarded the round's SecAgg+ sum: it includes the masked update of "
                  f"{'; '.join(state.tainted)}, which cannot be taken out of a sum")
        self.report.record_error(server_round, 0, reason, None)
        journal.append(self.report.journal, "discarded", round=server_round,
                       institutions=state.tainted)
        state.sums, state.weight = {}, 0.0

    def checkpoint_state(self) -> dict[str, dict[str, np.ndarray]]:
        """The round-to-round state (:attr:`state_attributes`) to checkpoint; {} for FedAvg."""
        state = {}
        for attr, kind in self.state_attributes.items():
            if value := getattr(self, attr, None):
                items = enumerate(value) if kind is list else value.items()
                state[attr] = {str(k): v for k, v in items}
        return state

    def restore_checkpoint_state(self, saved: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Put back the state :meth:`checkpoint_state` gave.

        Raises
        ------
        CheckpointError
            When ``saved`` holds state this strategy does not keep.
        """
        for attr, tensors in saved.items():
            kind = self.state_attributes.get(attr)
            if kind is None:
                raise CheckpointError(f"--resume: the checkpoint holds {attr!r} state that "
                                      f"strategy {type(self).__name__} does not use")
            try:
                setattr(self, attr, [tensors[str(i)] for i in range(len(tensors))]
                        if kind is list else dict(tensors))
            except (KeyError, ValueError) as err:
                raise CheckpointError(f"--resume: the checkpoint's {attr!r} state cannot be "
                                      f"restored ({err})") from None

    def on_accepted(self, reply: Message, sent: dict[str, np.ndarray]) -> None:
        """An accepted update (decoded, before it is folded); SCAFFOLD reads it here."""

    def correction_size(self, reply: Message) -> float:
        """Largest ``|c − c_i|`` sent to the reply's institution (0 without SCAFFOLD)."""
        return 0.0

    def _bound(self, examples: int, metrics: Mapping[str, float | int], largest: float,
               reply: Message) -> float | None:
        """Largest coordinate change ``examples`` examples of local training can make."""
        train = self.train
        steps = planned_steps(examples, train.batch_size, train.local_epochs)
        if train.optimizer != "sgd":
            return max_coordinate_change(
                largest_learning_rate(train.learning_rate, train.encoder_learning_rate),
                steps, largest)
        if self.privacy.record_level:
            return max_sgd_change(train.learning_rate, steps, examples, train.batch_size,
                                  self.privacy.max_grad_norm,
                                  float(metrics["noise-multiplier"]), self.correction_size(reply))
        return None  # plain SGD without DP-SGD: no bound on a step

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Aggregate and report the institutions' local evaluations (and their test size)."""
        replies = [r for r in replies if self._evaluation_usable(server_round, r)]
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        if metrics is not None:  # Flower's mean leaves out the weight; report the total
            metrics = MetricRecord({**metrics, "num-examples": sum(
                int(r.content["metrics"].get("num-examples", 0))
                for r in replies if not r.has_error())})
        self.report.record_federated_eval(server_round, metrics)
        return metrics

    def _evaluation_usable(self, server_round: int, reply: Message) -> bool:
        """Gate one evaluation reply; report and journal it if it is rejected."""
        admitted = self.gate.admit_evaluate(reply)
        if admitted.reason is None:
            return True
        self.report.record_error(server_round, 0, f"{admitted.name}: evaluation rejected: "
                                 f"{admitted.reason}", None)
        journal.append(self.report.journal, "rejected", round=server_round, message="evaluate",
                       node=reply.metadata.src_node_id, institution=admitted.name,
                       reason=admitted.reason)
        return False

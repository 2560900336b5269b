"""SCAFFOLD (Karimireddy et al., ICML 2020) on top of FedAvgM, kept at the coordinator.

Under label skew each institution's local steps drift towards its own optimum.
SCAFFOLD corrects every local SGD step by ``c − c_i``: ``c_i`` estimates institution
i's average gradient, ``c`` the federation's. fedsilo keeps both at the coordinator
and derives them from what it already receives (the paper's option II):
``c_i ← c_i − c + (x − y_i) / (K_i · lr)`` for global tensors ``x``, institution i's
trained tensors ``y_i`` and its ``K_i`` local steps, and ``c`` is the mean of the
``c_i`` of every institution seen so far (the paper's ``c + Σ Δc_i / N``). Both are
post-processing of released, already-noised updates, so the correction costs no
privacy; each institution receives only its own ``c − c_i``. Server momentum
(``--server-momentum``) then applies to the averaged update as in FedAvgM. Unlike
the other strategies, the coordinator's memory grows with institutions × trainable
tensors (one ``c_i`` each), which saves the institutions a second upload per round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM

from fedsilo.common import journal
from fedsilo.common.wire import CORRECTION_KEY, named_arrays
from fedsilo.server.report import institution_name
from fedsilo.server.strategy_base import ReportingMixin

log = logging.getLogger(__name__)

#: Separates institution and tensor name in the checkpointed ``c_i`` keys.
_SEP = "/"


class ReportingScaffold(ReportingMixin, FedAvgM):
    """FedAvgM whose train messages carry each institution's SCAFFOLD correction.

    State (checkpointed with the round): ``server_control`` (``c`` by tensor name),
    ``client_controls`` (``c_i`` under ``"<institution>/<tensor>"``) and
    ``node_institutions`` (which Flower node each institution answered from).
    """

    fold_updates = True
    state_attributes = {"momentum_vector": list, "server_control": dict,
                        "client_controls": dict, "node_institutions": dict}

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.server_control: dict[str, np.ndarray] = {}
        self._controls: dict[str, dict[str, np.ndarray]] = {}  # institution → c_i
        self._nodes: dict[int, str] = {}  # node id → institution
        self._pending: dict[str, dict[str, np.ndarray]] = {}  # this round's new c_i
        self._sizes: dict[int, float] = {}  # node id → largest |c − c_i| sent

    @property
    def client_controls(self) -> dict[str, np.ndarray]:
        """Every ``c_i``, flat for the checkpoint: ``"<institution>/<tensor>"``."""
        return {name + _SEP + k: v for name, own in self._controls.items()
                for k, v in own.items()}

    @client_controls.setter
    def client_controls(self, flat: dict[str, np.ndarray]) -> None:
        self._controls = {}
        for key, value in flat.items():
            name, tensor = key.rsplit(_SEP, 1)  # tensor names hold no "/"
            self._controls.setdefault(name, {})[tensor] = value

    @property
    def node_institutions(self) -> dict[str, np.ndarray]:
        """The node → institution map, flat for the checkpoint (0-d string arrays)."""
        return {str(node): np.array(name) for node, name in self._nodes.items()}

    @node_institutions.setter
    def node_institutions(self, saved: dict[str, np.ndarray]) -> None:
        self._nodes = {int(node): str(name) for node, name in saved.items()}

    def _correction(self, node_id: int) -> dict[str, np.ndarray]:
        """``c − c_i`` for the institution last seen at ``node_id`` (``c`` for a new one)."""
        name = self._nodes.get(node_id)
        own = self._controls.get(name, {}) if name is not None else {}
        return {k: c - own[k] if k in own else c for k, c in self.server_control.items()}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvgM's messages, each with its institution's correction (none in round 1)."""
        self._pending, self._sizes = {}, {}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if not self.server_control:
            return messages
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            correction = self._correction(node)
            self._sizes[node] = max(
                (float(np.abs(v).max()) for v in correction.values() if v.size), default=0.0)
            journal.append(self.report.journal, "correction", round=server_round, node=node,
                           institution=self._nodes.get(node),
                           correction=journal.digest(correction))
            content = RecordDict({**msg.content.array_records, **msg.content.config_records,
                                  CORRECTION_KEY: ArrayRecord(
                                      {k: Array(v) for k, v in correction.items()})})
            out.append(Message(content, dst_node_id=node,
                               message_type=msg.metadata.message_type))
        return out

    def correction_size(self, reply: Message) -> float:
        """Largest ``|c − c_i|`` this round sent to the reply's node."""
        return self._sizes.get(reply.metadata.src_node_id, 0.0)

    def on_accepted(self, reply: Message, sent: dict[str, np.ndarray]) -> None:
        """Derive the institution's new ``c_i`` from its accepted update."""
        steps = int(reply.content["metrics"]["steps"])
        name = self._nodes[reply.metadata.src_node_id] = institution_name(reply)
        if steps < 1:
            return
        trained = named_arrays(reply.content["arrays"])
        own, scale = self._controls.get(name, {}), 1.0 / (steps * self.train.learning_rate)
        self._pending[name] = {
            k: (own.get(k, 0.0) - self.server_control.get(k, 0.0)
                + (sent[k].astype(np.float64) - trained[k]) * scale).astype(np.float32)
            for k in sent}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[
        ArrayRecord | None, MetricRecord | None
    ]:
        """Aggregate as FedAvgM, then take up the round's new ``c_i`` and update ``c``."""
        result = super().aggregate_train(server_round, replies)
        if self._pending:
            self._controls |= self._pending
            tensors = next(iter(self._controls.values()))  # every c_i has the same names
            self.server_control = {
                k: (sum(own[k].astype(np.float64) for own in self._controls.values())
                    / len(self._controls)).astype(np.float32) for k in tensors}
            log.info("round %d: SCAFFOLD controls of %d institutions (%d new); largest "
                     "|c| %.3g", server_round, len(self._controls), len(self._pending),
                     max(float(np.abs(v).max()) for v in self.server_control.values()))
        self._pending = {}
        return result


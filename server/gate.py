"""The update gate: every institution's reply is decoded and checked here, first.

Nothing else at the coordinator reads a reply before :class:`Gate` has

- named its sender from the *authenticated* Flower node id (the SuperLink sets
  ``src_node_id`` from the node key it verified) through the roster the coordinator
  wrote when it registered the allow-listed keys — never from the reply's content;
- typed every metric (finite, in range; a missing required one rejects the reply) and
  replaced the reply's metrics by the checked ones;
- set the aggregation weight: the reply's example count, never below zero, clamped to
  the count the coordinator expects for that institution (allow-list
  ``expected-examples``, else ``--max-examples``);
- decoded a half-precision update and checked it against the global model and the
  per-coordinate bound local training obeys (:mod:`fedsilo.server.validation`).

A reply that fails is rejected with a reason (the caller journals and reports it); the
round goes on. Without a roster (simulation, ``--insecure``) nodes are not
authenticated: a reply's claimed name is used only while no other node has claimed it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from fedsilo.common.atomic import write_atomic
from fedsilo.common.wire import INSTITUTION_KEY, RECEIVED_PREFIX, named_arrays
from fedsilo.server.validation import check_update

#: Environment variable naming the roster file (``flower-server`` sets it for the SuperLink,
#: whose ServerApp process inherits it).
ROSTER_ENV = "FEDSILO_ROSTER"


class GateError(ValueError):
    """Why a reply cannot be used."""


@dataclass(frozen=True)
class Roster:
    """Who may reply: authenticated node id → institution, and expected example counts.

    ``nodes`` None means nodes are not authenticated (simulation, ``--insecure``).
    """

    nodes: dict[int, str] | None = None
    expected: dict[str, int] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        """Store the roster (owner-only: it maps nodes to institutions)."""
        doc = {"nodes": {str(k): v for k, v in (self.nodes or {}).items()},
               "expected-examples": self.expected}
        write_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n", 0o600)


def load_roster(environ: Mapping[str, str] = os.environ) -> Roster:
    """The roster named by ``$FEDSILO_ROSTER``, or an unauthenticated one if unset.

    Raises
    ------
    GateError
        If the file is named but unreadable or malformed (the run must not go on
        trusting reply content instead).
    """
    path = environ.get(ROSTER_ENV)
    if not path:
        return Roster()
    try:
        doc = json.loads(Path(path).read_text("utf-8"))
        nodes = {int(k): str(v) for k, v in doc["nodes"].items()}
        expected = {str(k): int(v) for k, v in doc["expected-examples"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise GateError(f"roster {path} (${ROSTER_ENV}) is unreadable ({err}); restart "
                        "flower-server, which writes it when it registers the allow-list") from None
    return Roster(nodes, expected)


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GateError(f"metric {key!r} is not a number ({type(value).__name__})")
    if math.isnan(value):
        raise GateError(f"metric {key!r} is NaN")
    return value


def _count(key: str, value: object) -> int:
    number = _number(key, value)
    if math.isinf(number) or number != int(number):
        raise GateError(f"metric {key!r} = {number!r} is not a whole number")
    if number < 0:
        raise GateError(f"metric {key!r} = {int(number)} is negative")
    return int(number)


def _at_least_zero(key: str, value: object, *, infinite: bool = False) -> float:
    number = _number(key, value)
    if number < 0 or (math.isinf(number) and not infinite):
        raise GateError(f"metric {key!r} = {number!r} is not a finite number >= 0")
    return float(number)


def _share(key: str, value: object) -> float:
    number = _number(key, value)
    if not 0.0 <= number <= 1.0:
        raise GateError(f"metric {key!r} = {number!r} is outside [0, 1]")
    return float(number)


def _noised_share(key: str, value: object) -> float:
    """An evaluation rate, possibly DP-noised past [0, 1]: finite, clipped to [0, 1]."""
    number = _number(key, value)
    if math.isinf(number):
        raise GateError(f"metric {key!r} is infinite")
    return float(min(1.0, max(0.0, number)))


def _finite(key: str, value: object) -> float:
    number = _number(key, value)
    if math.isinf(number):
        raise GateError(f"metric {key!r} is infinite")
    return float(number)


Rule = Callable[[str, object], float | int]
#: Metrics every training reply must carry (epsilon is +inf when DP is off).
TRAIN_REQUIRED: dict[str, Rule] = {
    "num-examples": _count, "steps": _count,
    "epsilon": lambda k, v: _at_least_zero(k, v, infinite=True),
    "delta": _share, "noise-multiplier": _at_least_zero, "sample-rate": _share,
}
#: Metrics a reply may carry (training loss and evaluations may be noised or absent).
OPTIONAL: dict[str, Rule] = {
    "train-loss": _at_least_zero, "uniform-weight": _at_least_zero,
    "loss": _at_least_zero, "accuracy": _noised_share, "macro-f1": _noised_share,
}
#: Metrics every evaluation reply must carry.
EVALUATE_REQUIRED: dict[str, Rule] = {"num-examples": lambda k, v: int(_at_least_zero(k, v))}


def check_metrics(metrics: Mapping[str, object], required: Mapping[str, Rule]
                  ) -> dict[str, float | int]:
    """Typed copies of ``metrics``: required ones present, every one finite and in range.

    Raises
    ------
    GateError
        Naming the first metric missing, mistyped, non-finite or out of range.
    """
    out: dict[str, float | int] = {}
    for key, rule in required.items():
        if key not in metrics:
            raise GateError(f"metric {key!r} is missing")
        out[key] = rule(key, metrics[key])
    for key, value in metrics.items():
        if key in out:
            continue
        base = key[len(RECEIVED_PREFIX):] if key.startswith(RECEIVED_PREFIX) else key
        if base == "num-examples":
            out[key] = _count(key, value)
        elif base in OPTIONAL:
            out[key] = OPTIONAL[base](key, value)
        elif key.startswith("seconds-"):
            out[key] = _at_least_zero(key, value)
        else:  # an unknown metric: kept only if it is one finite number
            out[key] = _finite(key, value)
    return out


@dataclass
class Admission:
    """The gate's verdict on one reply: who sent it, its weight, or why it is rejected."""

    reply: Message
    name: str
    weight: int = 0
    reason: str | None = None
    clamped_from: int | None = None  # the claimed count when the weight was clamped


class Gate:
    """Check replies against the roster, the expected sizes and the update bound."""

    def __init__(self, roster: Roster, default_cap: int = 0) -> None:
        self.roster, self.default_cap = roster, default_cap
        self._claimed: dict[str, int] = {}  # unauthenticated: name → first node to use it

    def name_of(self, reply: Message) -> str | None:
        """The sender's institution; None for a node not on the roster."""
        node = reply.metadata.src_node_id
        if self.roster.nodes is not None:
            return self.roster.nodes.get(node)
        record = (None if reply.has_error()
                  else reply.content.config_records.get(INSTITUTION_KEY))
        claim = str(record.get("name", "")) if record else ""
        if not (0 < len(claim) <= 100 and claim.isprintable()) or claim.startswith("node-") \
                or self._claimed.setdefault(claim, node) != node:
            return f"node-{node}"
        return claim

    def _identify(self, reply: Message) -> Admission:
        name = self.name_of(reply)
        if name is None:
            return Admission(reply, f"node-{reply.metadata.src_node_id}",
                             reason="the node is not an allow-listed institution")
        if not reply.has_error():  # from here on the content names the real sender
            reply.content[INSTITUTION_KEY] = ConfigRecord({"name": name})
        return Admission(reply, name)

    def _cap(self, name: str) -> int:
        return self.roster.expected.get(name) or self.default_cap

    def admit_train(self, reply: Message, sent: dict[str, np.ndarray],
                    bound: Callable[[int, Mapping[str, float | int]], float | None],
                    *, masked: bool = False) -> Admission:
        """Identify, type, weigh, decode and check one training reply.

        ``bound(weight, metrics)`` is the largest coordinate change local training can
        make (None: no bound). An error reply is only identified. A ``masked`` reply
        (SecAgg+) carries no tensors — its update is inside the round's sum, weighted
        by the count it claims — so a claim above the expected count is rejected
        instead of clamped.
        """
        verdict = self._identify(reply)
        if verdict.reason is not None or reply.has_error():
            return verdict
        try:
            if "metrics" not in reply.content.metric_records:
                raise GateError("the reply carries no metrics")
            metrics = check_metrics(reply.content["metrics"], TRAIN_REQUIRED)
            claimed = int(metrics["num-examples"])
            cap = self._cap(verdict.name)
            verdict.weight = min(claimed, cap) if cap > 0 else claimed
            if verdict.weight < claimed:
                verdict.clamped_from = claimed
            metrics["num-examples"] = verdict.weight
            reply.content["metrics"] = MetricRecord(metrics)
            if verdict.weight == 0:
                raise GateError("the reply claims 0 training examples")
            if masked:
                if verdict.clamped_from is not None:
                    raise GateError(f"the reply claims {claimed} training examples, more "
                                    f"than the {cap} expected; under SecAgg+ its weight "
                                    "cannot be clamped")
                return verdict
            if "arrays" not in reply.content.array_records:
                raise GateError("the reply carries no tensors")
            received = decode(named_arrays(reply.content["arrays"]), sent)
            reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in received.items()})
            reason = check_update(received, sent, bound(verdict.weight, metrics))
            if reason is not None:
                raise GateError(reason)
        except GateError as err:
            verdict.reason = str(err)
        return verdict

    def admit_evaluate(self, reply: Message) -> Admission:
        """Identify and type one evaluation reply (or fused evaluation built from one)."""
        verdict = self._identify(reply)
        if verdict.reason is not None or reply.has_error():
            return verdict
        try:
            if "metrics" not in reply.content.metric_records:
                raise GateError("the reply carries no metrics")
            metrics = check_metrics(reply.content["metrics"], EVALUATE_REQUIRED)
            cap = self._cap(verdict.name)  # a test split is no larger than the data
            if cap > 0 and int(metrics["num-examples"]) > cap:
                verdict.clamped_from = int(metrics["num-examples"])
                metrics["num-examples"] = cap
            reply.content["metrics"] = MetricRecord(metrics)
        except GateError as err:
            verdict.reason = str(err)
        return verdict


def decode(received: dict[str, np.ndarray], sent: dict[str, np.ndarray]
           ) -> dict[str, np.ndarray]:
    """Turn a half-precision update (trained − received) back into the sent dtypes.

    Institutions with ``update-dtype = float16`` send their update in half precision;
    the coordinator adds it to the tensors it sent. Other tensors are returned as is.
    """
    if not any(v.dtype == np.float16 for v in received.values()) or set(received) != set(sent):
        return received
    return {k: np.asarray(sent[k] + v.astype(np.float32), dtype=sent[k].dtype)
            for k, v in received.items()}

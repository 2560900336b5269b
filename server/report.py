"""Per-round metrics of a run: progress lines and ``metrics.json``.

``metrics.json`` (rewritten atomically after every round) has this schema::

    {
      "schema": "fedsilo.metrics/1",
      "labels": [str, ...],                 # the federation's label map
      "config": {flat settings},            # the run config actually used
      "holdout_majority_rate": float|null,  # share of the largest class in the holdout
      "status": "running" | "completed",
      "outcome": "completed" | "completed with declines",  # once completed
      "declines": [{"round", "institution", "reason"}, ...],  # who declined and why
      "resumed_after": [int, ...],          # rounds after which --resume continued
      "rounds": [
        {
          "round": int,                     # 0 = the initial model
          "train_loss": float|null,         # example-weighted mean of local losses
          "federated_eval": {"loss", "accuracy", "macro_f1", "num_examples"}|null,
                                            # (fused evaluation: filled in one round later)
          "centralized_eval": {"loss", "accuracy", "macro_f1", "num_examples"}|null,
          "bytes_received": int,            # update payload bytes, all institutions
                                            # (0 under SecAgg+: only masked vectors travel)
          "institutions": {
            name: {"num_examples", "train_loss", "epsilon" (cumulative; null = DP
                   off), "delta", "noise_multiplier", "sample_rate", "steps",
                   "bytes_received", "seconds": {"setup", "data", "model", "train",
                   "process"}}              # setup = data (load + tokenise) + model
                                            # (load); process = the ClientApp
                                            # process's age when the round began
          },
          "client_level_dp": {"epsilon", "delta", "releases", "noise_multiplier",
                              "clipping_norm"}|null,  # dp-level client: Flower's
                                            # accountant, cumulative
          "failures": [str, ...],           # errors institutions replied with
          "declined": [str, ...],           # rounds institutions declined (budget,
                                            # policy, duplicate) with their reason
          "dropped": [str, ...],            # institutions the round went on without
                                            # (gone, or past --straggler-timeout)
          "late": [str, ...],               # replies to earlier rounds that arrived
                                            # during this one (counted, not aggregated)
          "aggregate_seconds": float|null,  # decoding + aggregating the updates
          "seconds": float                  # wall time of the round
        }, ...
      ]
    }
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message

from fedsilo.common import journal
from fedsilo.common.atomic import write_json_atomic
from fedsilo.common.live import describe_eval, eta
from fedsilo.common.task import EvalResult
from fedsilo.common.wire import DECLINED_CODE, INSTITUTION_KEY, array_record_bytes

log = logging.getLogger(__name__)

SCHEMA = "fedsilo.metrics/1"


def _eval_dict(metrics: Mapping[str, float] | EvalResult | None) -> dict[str, float] | None:
    if metrics is None:
        return None
    if isinstance(metrics, EvalResult):
        return {"loss": metrics.loss, "accuracy": metrics.accuracy,
                "macro_f1": metrics.macro_f1, "num_examples": metrics.num_examples}
    return {k.replace("-", "_"): float(v) for k, v in metrics.items()}


def _finite(value: float) -> float | None:
    return None if math.isinf(value) or math.isnan(value) else value


def institution_name(msg: Message) -> str:
    """Name the sending institution (its ConfigRecord, else its node id)."""
    record = msg.content.config_records.get(INSTITUTION_KEY)
    return str(record["name"]) if record else f"node-{msg.metadata.src_node_id}"


class RunReport:
    """Collects what each round produced and writes it to ``output_dir``."""

    def __init__(self, output_dir: Path, labels: list[str], config: dict[str, Any],
                 num_rounds: int) -> None:
        self.path = output_dir / "metrics.json"
        #: The coordinator's append-only journal (see :mod:`fedsilo.common.journal`).
        self.journal = output_dir / "journal.jsonl"
        self.num_rounds = num_rounds
        self.doc: dict[str, Any] = {
            "schema": SCHEMA, "labels": labels, "config": config,
            "holdout_majority_rate": None, "status": "running", "rounds": [],
        }
        self._started = time.monotonic()
        #: Institution names by Flower node id, learned from their replies.
        self.names: dict[int, str] = {}

    def who(self, node_id: int) -> str:
        """An institution's name (once it has replied) and node id."""
        name = self.names.get(node_id)
        return f"{name} (node {node_id})" if name else f"node {node_id}"

    def progress(self, server_round: int, phase: str, replied: int, expected: int) -> None:
        """Rewrite ``progress.json``: the round in progress and its replies so far."""
        write_json_atomic(self.path.with_name("progress.json"), {
            "round": server_round, "phase": phase, "replied": replied, "expected": expected})

    def record_dropped(self, server_round: int, node_id: int, what: str, reason: str) -> None:
        """Record an institution whose ``what`` reply the round went on without."""
        text = f"{self.who(node_id)}: {what} reply missing: {reason}"
        self._round(server_round)["dropped"].append(text)
        journal.append(self.journal, "dropped", round=server_round, node=node_id,
                       institution=self.names.get(node_id), message=what, reason=reason)
        log.warning("round %d: %s", server_round, text)

    def record_late(self, reply_round: int, node_id: int, what: str, arrived_in: int,
                    content: str) -> None:
        """Record a reply to round ``reply_round`` that arrived after that round closed."""
        text = (f"{self.who(node_id)}: {what} reply to round {reply_round} arrived late "
                f"({content}); not aggregated")
        self._round(max(arrived_in, reply_round))["late"].append(text)
        journal.append(self.journal, "late", round=reply_round, arrived_in=arrived_in,
                       node=node_id, institution=self.names.get(node_id), message=what,
                       content=content)
        log.warning("round %d: %s", arrived_in, text)

    def _round(self, server_round: int) -> dict[str, Any]:
        """The entry of ``server_round``: an earlier one if it has one, else a new last one."""
        rounds = self.doc["rounds"]
        earlier = next((e for e in reversed(rounds) if e["round"] == server_round), None)
        if earlier is not None:
            return earlier
        rounds.append({"round": server_round, "train_loss": None, "federated_eval": None,
                       "centralized_eval": None, "bytes_received": 0,
                       "institutions": {}, "failures": [], "declined": [],
                       "dropped": [], "late": [],
                       "client_level_dp": None, "aggregate_seconds": None,
                       "seconds": 0.0})
        return rounds[-1]

    def record_train(self, server_round: int, replies: list[Message]) -> None:
        """Record each institution's training reply (ε, δ, size) or its error."""
        for msg in replies:
            if msg.has_error():  # an error reply has no content, hence no name record
                self.record_error(server_round, msg.error.code, msg.error.reason,
                                  msg.metadata.src_node_id)
                continue
            size = sum(array_record_bytes(r) for r in msg.content.array_records.values())
            self.names[msg.metadata.src_node_id] = institution_name(msg)
            self.record_update(server_round, institution_name(msg),
                               dict(msg.content["metrics"]), size)

    def record_error(self, server_round: int, code: int, reason: str,
                     node_id: int | None) -> None:
        """Record a declined round (``DECLINED_CODE``) or a failed one."""
        entry = self._round(server_round)
        declined = code == DECLINED_CODE
        entry["declined" if declined else "failures"].append(
            reason if declined or node_id is None else f"node {node_id}: {reason}")
        if declined:
            who = self.who(node_id) if node_id is not None else "an institution"
            self.doc.setdefault("declines", []).append(
                {"round": server_round, "institution": who, "reason": reason})

    def record_update(self, server_round: int, name: str, m: Mapping[str, Any],
                      size: int) -> None:
        """Record one institution's update: its metrics and payload bytes."""
        entry = self._round(server_round)
        entry["bytes_received"] += size
        entry["institutions"][name] = {
            "num_examples": int(m["num-examples"]),
            "train_loss": float(m["train-loss"]) if "train-loss" in m else None,
            "epsilon": _finite(float(m["epsilon"])), "delta": float(m["delta"]),
            "noise_multiplier": float(m["noise-multiplier"]),
            "sample_rate": float(m["sample-rate"]), "steps": int(m["steps"]),
            "bytes_received": size,
            "seconds": {k[len("seconds-"):]: float(v) for k, v in m.items()
                        if k.startswith("seconds-")},
        }
        self._train_loss(entry)

    @staticmethod
    def _train_loss(entry: dict[str, Any]) -> None:
        stats = [s for s in entry["institutions"].values() if s["train_loss"] is not None]
        total = sum(s["num_examples"] for s in stats)
        entry["train_loss"] = (sum(s["train_loss"] * s["num_examples"] for s in stats) / total
                               if total else None)

    def reject(self, server_round: int, name: str, reason: str) -> None:
        """Move an institution's update from the round's contributions to its failures."""
        entry = self._round(server_round)
        stats = entry["institutions"].pop(name, None)
        if stats is not None:
            entry["bytes_received"] -= stats["bytes_received"]
        entry["failures"].append(f"{name}: rejected: {reason}")
        log.warning("round %d: %s's update rejected: %s", server_round, name, reason)
        self._train_loss(entry)

    def record_aggregation(self, server_round: int, seconds: float) -> None:
        """Record how long decoding and aggregating the round's updates took."""
        self._round(server_round)["aggregate_seconds"] = seconds

    def record_client_level(self, server_round: int, spent: dict[str, float]) -> None:
        """Record the coordinator's client-level (ε, δ, releases, σ, C) after a release."""
        self._round(server_round)["client_level_dp"] = dict(spent)

    def record_federated_eval(self, server_round: int,
                              metrics: Mapping[str, float] | None) -> None:
        """Record the example-weighted mean of the institutions' local evaluations.

        With fused evaluation they come with the next round's updates, after this
        round's line was logged: they get a line of their own and are written to
        ``metrics.json`` with the next round.
        """
        entry = self._round(server_round)
        entry["federated_eval"] = result = _eval_dict(metrics)
        if result and entry is not self.doc["rounds"][-1]:
            log.info("round %d/%d | fed-eval %s (the institutions' evaluation of its model, "
                     "sent with round %d's updates)", server_round, self.num_rounds,
                     describe_eval(result), server_round + 1)

    def record_centralized_eval(self, server_round: int, result: EvalResult | None) -> None:
        """Record the coordinator's evaluation on its held-out set."""
        self._round(server_round)["centralized_eval"] = _eval_dict(result)

    def finish_round(self, server_round: int) -> None:
        """Log the round's progress line and persist ``metrics.json``."""
        entry = self._round(server_round)
        entry["seconds"] = round(time.monotonic() - self._started, 2)
        self._started = time.monotonic()
        log.info("%s", self.progress_line(entry))
        for reason in entry["declined"]:
            log.warning("round %d: %s", server_round, reason)
        self.write()

    def progress_line(self, entry: dict[str, Any]) -> str:
        """One human-readable line for a finished round."""
        parts = [f"round {entry['round']}/{self.num_rounds}"]
        if entry["train_loss"] is not None:
            parts.append(f"train loss {entry['train_loss']:.4f}")
        for label, key in (("eval", "centralized_eval"), ("fed-eval", "federated_eval")):
            if entry[key]:
                parts.append(f"{label} {describe_eval(entry[key])}")
        eps = [f"{n} {s['epsilon']:.2f}" if s["epsilon"] is not None else f"{n} no-DP"
               for n, s in sorted(entry["institutions"].items())]
        if eps and self.doc["config"].get("dp-level") != "client":
            parts.append("ε " + ", ".join(eps))
        if entry["client_level_dp"]:
            parts.append(f"client-level ε {entry['client_level_dp']['epsilon']:.2f}")
        if entry["failures"]:
            parts.append(f"{len(entry['failures'])} failed")
        for key in ("declined", "dropped", "late"):
            if entry[key]:
                parts.append(f"{len(entry[key])} {key}")
        if entry["round"] > 0:
            # one per institution that trained or was asked to: an evaluate reply that
            # went missing too does not count it twice
            missing = sum(1 for text in entry["dropped"] if ": train reply missing" in text)
            heard = len(entry["institutions"]) + missing + sum(
                len(entry[k]) for k in ("failures", "declined"))
            parts.append(f"{len(entry['institutions'])}/{heard} institutions aggregated")
        parts.append(f"{entry['seconds']:.0f}s")
        done = [r["seconds"] for r in self.doc["rounds"] if r["round"] > 0]
        if estimate := eta(done, self.num_rounds - entry["round"]):
            parts.append(estimate)  # round 1's one-off work left out
        return " | ".join(parts)

    def resume(self, doc: dict[str, Any]) -> None:
        """Continue the metrics of an interrupted run (from its checkpoint)."""
        self.doc = {**doc, "config": self.doc["config"], "status": "running"}
        self.doc.setdefault("resumed_after", []).append(doc["rounds"][-1]["round"])
        self.write()

    def complete(self) -> None:
        """Mark the run as completed (with declines, naming who and why) and persist.

        Also logs each institution's ε spent in this run against the run's agreed ε
        (what is left of it; each institution logs its dataset's lifetime budget itself).
        """
        self.doc["status"] = "completed"
        declines = self.doc.get("declines", [])
        self.doc["outcome"] = "completed with declines" if declines else "completed"
        for d in declines:
            log.warning("run completed with declines: %s declined round %d: %s",
                        d["institution"], d["round"], d["reason"])
        target = self.doc["config"].get("target-epsilon")
        last = {n: s["epsilon"] for r in self.doc["rounds"]
                for n, s in r["institutions"].items() if s["epsilon"] is not None}
        for name, eps in sorted(last.items()):
            if isinstance(target, int | float):
                log.info("%s spent ε %.3f of the run's %g (%.3f left of it)", name, eps,
                         target, max(0.0, target - eps))
        self.write()

    def write(self) -> None:
        """Atomically replace ``metrics.json`` with the current state."""
        write_json_atomic(self.path, self.doc, indent=2)



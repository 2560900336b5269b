"""A hostile institution's reply can neither steer the global model nor stop the run.

Every reply passes :mod:`fedsilo.server.gate` before anything else reads it: identity
from the authenticated node id, weight clamped to the allow-list's expected examples,
metrics typed and finite, the update bounded. Rejected replies are journalled and the
round goes on.
"""

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsilo.common import journal
from fedsilo.common.bounds import largest_learning_rate, max_coordinate_change, planned_steps
from fedsilo.common.config import ConfigError, FedsiloConfig
from fedsilo.common.wire import named_arrays
from fedsilo.server.gate import ROSTER_ENV, TRAIN_REQUIRED, GateError, Roster, check_metrics
from fedsilo.server.report import RunReport
from fedsilo.server.strategy import build_strategy

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task

SENT = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        "b": np.zeros(4, dtype=np.float32)}
HONEST = {1: "hospital-a", 2: "hospital-b", 3: "hospital-c", 4: "hospital-d"}
EXPECTED = 1000


def _metrics(examples=EXPECTED, **changes):
    metrics = {"num-examples": examples, "train-loss": 0.5, "epsilon": 1.0, "delta": 1e-5,
               "noise-multiplier": 1.0, "sample-rate": 0.1, "steps": 4}
    metrics.update(changes)
    return {k: v for k, v in metrics.items() if v is not None}


def _reply(node, shift, metrics=None, claim=None):
    arrays = {k: (v + shift).astype(np.float32) for k, v in SENT.items()}
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics or _metrics()),
                          "institution": ConfigRecord({"name": claim or HONEST.get(node,
                                                                                  "rogue")})})
    reply = Message(content, reply_to=Message(RecordDict(), dst_node_id=node,
                                              message_type="train"))
    reply.metadata.__dict__["_message_id"] = f"reply-{node}"
    return reply


@pytest.fixture
def run(tmp_path, monkeypatch):
    """Build a strategy under a roster (nodes 1–4 and 5 = hospital-e), start round 1."""
    names = {**HONEST, 5: "hospital-e"}
    roster = tmp_path / "roster.json"
    Roster(names, dict.fromkeys(names.values(), EXPECTED)).write(roster)
    monkeypatch.setenv(ROSTER_ENV, str(roster))

    def start(**settings):
        cfg = FedsiloConfig.from_flat({"output-dir": str(tmp_path), **settings})
        report = RunReport(tmp_path, [], cfg.to_flat(), num_rounds=1)
        strategy = build_strategy(cfg, report)
        strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in SENT.items()}),
                                 ConfigRecord(), grid=_NoGrid())
        return strategy, report
    return start


class _NoGrid:
    def get_node_ids(self):
        return list(range(1, 6))


def _bound():
    train = FedsiloConfig.from_flat({}).train
    return max_coordinate_change(largest_learning_rate(train.learning_rate, 0.0),
                                 planned_steps(EXPECTED, train.batch_size, train.local_epochs),
                                 float(np.abs(SENT["w"]).max()))


def _aggregate(strategy, report, replies):
    kept = [strategy.absorb(r) for r in replies]
    arrays, _ = strategy.aggregate_train(1, kept)
    report.finish_round(1)  # metrics.json must be writable whatever came in
    return named_arrays(arrays)


def test_a_huge_example_claim_is_clamped_and_cannot_widen_the_bound(run):
    strategy, report = run()
    out = _aggregate(strategy, report, [_reply(1, 0.01), _reply(5, 1000.0,
                                                                _metrics(examples=10**12))])
    np.testing.assert_allclose(out["w"], SENT["w"] + 0.01, atol=1e-6)  # only the honest one
    (failure,) = report.doc["rounds"][-1]["failures"]
    assert failure.startswith("hospital-e: rejected:") and "moved a coordinate" in failure
    received = [e for e in journal.read(report.journal) if e["event"] == "received"]
    assert {"institution": "hospital-e", "weight": EXPECTED,
            "claimed_examples": 10**12}.items() <= received[-1].items()


def test_a_clamped_claim_weighs_no_more_than_expected(run):
    strategy, report = run()
    out = _aggregate(strategy, report, [_reply(1, 0.01), _reply(2, 0.03,
                                                                _metrics(examples=10**12))])
    np.testing.assert_allclose(out["w"], SENT["w"] + 0.02, atol=1e-6)  # equal weights


@pytest.mark.parametrize("examples", [-999, 2.5, float("nan"), 0])
def test_a_negative_or_odd_count_is_rejected(run, examples):
    strategy, report = run()
    out = _aggregate(strategy, report, [_reply(1, 0.01), _reply(2, 0.05,
                                                                _metrics(examples=examples))])
    np.testing.assert_allclose(out["w"], SENT["w"] + 0.01, atol=1e-6)
    assert report.doc["rounds"][-1]["failures"][0].startswith("hospital-b: rejected:")


def test_a_rejected_institution_is_named_when_it_later_drops_out(run):
    """Its node is on the roster: a later missing reply names it, not only its node id."""
    strategy, report = run()
    _aggregate(strategy, report, [_reply(1, 0.01), _reply(2, 0.05, _metrics(examples=-1))])
    report.record_dropped(2, 2, "train", "no reply")
    assert report.doc["rounds"][-1]["dropped"][0].startswith("hospital-b (node 2):")


@pytest.mark.parametrize("changes", [{"epsilon": float("nan")}, {"train-loss": float("nan")},
                                     {"steps": None}, {"delta": 2.0}, {"epsilon": -1.0},
                                     {"received-accuracy": float("inf")},
                                     {"steps": "many"}])
def test_nan_missing_or_out_of_range_metrics_are_rejected_and_the_round_completes(run,
                                                                                  changes):
    strategy, report = run()
    bad = _metrics()
    for key, value in changes.items():
        if value is None:
            bad.pop(key)
        elif not isinstance(value, str):
            bad[key] = value
    reply = _reply(2, 0.05, bad)
    if changes.get("steps") == "many":  # MetricRecord refuses strings: a list instead
        reply.content["metrics"] = MetricRecord({**_metrics(), "steps": [1.0, 2.0]})
    out = _aggregate(strategy, report, [_reply(1, 0.01), reply])
    np.testing.assert_allclose(out["w"], SENT["w"] + 0.01, atol=1e-6)
    rejected = [e for e in journal.read(report.journal) if e["event"] == "rejected"]
    assert [e["institution"] for e in rejected] == ["hospital-b"]
    assert report.path.is_file() and report.doc["rounds"][-1]["institutions"].keys() == {
        "hospital-a"}


def test_train_loss_is_optional(run):
    strategy, report = run()
    out = _aggregate(strategy, report, [_reply(1, 0.01, _metrics(**{"train-loss": None})),
                                        _reply(2, 0.03)])
    np.testing.assert_allclose(out["w"], SENT["w"] + 0.02, atol=1e-6)
    assert report.doc["rounds"][-1]["train_loss"] == pytest.approx(0.5)


def test_a_reply_naming_another_institution_is_recorded_under_its_real_one(run):
    strategy, report = run()
    _aggregate(strategy, report, [_reply(1, 0.01), _reply(5, 0.02, claim="hospital-a")])
    assert report.doc["rounds"][-1]["institutions"].keys() == {"hospital-a", "hospital-e"}
    received = [e["institution"] for e in journal.read(report.journal)
                if e["event"] == "received"]
    assert received == ["hospital-a", "hospital-e"]


def test_a_node_not_on_the_roster_is_rejected(run):
    strategy, report = run()
    out = _aggregate(strategy, report, [_reply(1, 0.01), _reply(9, 0.2, claim="hospital-b")])
    np.testing.assert_allclose(out["w"], SENT["w"] + 0.01, atol=1e-6)
    assert "node-9: rejected: the node is not an allow-listed institution" in \
        report.doc["rounds"][-1]["failures"]


def test_without_a_roster_a_name_already_used_by_another_node_is_not_taken(tmp_path):
    cfg = FedsiloConfig.from_flat({"output-dir": str(tmp_path)})
    report = RunReport(tmp_path, [], cfg.to_flat(), num_rounds=1)
    strategy = build_strategy(cfg, report)
    strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in SENT.items()}),
                             ConfigRecord(), grid=_NoGrid())
    _aggregate(strategy, report, [_reply(1, 0.01), _reply(5, 0.02, claim="hospital-a")])
    assert report.doc["rounds"][-1]["institutions"].keys() == {"hospital-a", "node-5"}


def test_a_nan_evaluation_is_rejected_and_the_others_are_averaged(run):
    strategy, report = run()
    good = {"num-examples": 10, "loss": 0.5, "accuracy": 0.8, "macro-f1": 0.7}
    replies = []
    for node, acc in ((1, 0.8), (2, float("nan"))):
        content = RecordDict({"metrics": MetricRecord({**good, "accuracy": acc})})
        replies.append(Message(content, reply_to=Message(RecordDict(), dst_node_id=node,
                                                         message_type="evaluate")))
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["accuracy"] == pytest.approx(0.8)
    report.finish_round(1)
    assert any("hospital-b: evaluation rejected" in f
               for f in report.doc["rounds"][-1]["failures"])


@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_robust_strategies_stay_within_the_honest_range(run, name):
    """4 honest shifts; the hostile one sits exactly at the bound, opposite: it passes."""
    strategy, report = run(strategy=name, **{"trim-fraction": 0.2})
    honest = [0.01, 0.02, 0.03, 0.04]
    replies = [_reply(n, s) for n, s in zip(HONEST, honest, strict=True)]
    at_bound = -np.float32(_bound()) * 0.999  # float32 rounding stays inside the bound
    out = _aggregate(strategy, report, [*replies, _reply(5, at_bound)])
    assert not report.doc["rounds"][-1]["failures"]  # the gate lets the hostile one in
    shift = out["w"] - SENT["w"]
    assert shift.min() >= min(honest) - 1e-6 and shift.max() <= max(honest) + 1e-6


def test_fedavg_is_pulled_outside_the_honest_range_by_the_same_update(run):
    strategy, report = run()
    replies = [_reply(n, s) for n, s in zip(HONEST, [0.01, 0.02, 0.03, 0.04], strict=True)]
    out = _aggregate(strategy, report, [*replies, _reply(5, -np.float32(_bound()) * 0.999)])
    assert (out["w"] - SENT["w"]).max() < 0.01  # the reason for median / trimmed mean


@pytest.mark.parametrize(("flags", "needle"), [
    ({"secure-aggregation": True}, "--secure-aggregation"),
    ({"dp-level": "client"}, "--dp-level client")])
@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_robust_strategies_refuse_secagg_and_client_level_dp(name, flags, needle):
    with pytest.raises((ConfigError, ValueError), match=needle):
        FedsiloConfig.from_flat({"strategy": name, **flags})


def test_metric_rules_name_the_metric():
    with pytest.raises(GateError, match="'sample-rate'"):
        check_metrics(_metrics(**{"sample-rate": math.inf}), TRAIN_REQUIRED)
    assert check_metrics(_metrics(epsilon=math.inf), TRAIN_REQUIRED)["epsilon"] == math.inf


def test_the_journal_never_raises_on_odd_values(tmp_path):
    journal.append(tmp_path / "j.jsonl", "odd", value=float("nan"), nested={"x": [math.inf]})
    (event,) = journal.read(tmp_path / "j.jsonl")
    assert event["value"] == "nan" and event["nested"] == {"x": ["inf"]}


def test_a_resumed_run_meets_the_same_nan_reply_and_completes(run, tmp_path):
    """--resume replays a round a NaN reply is in; the gate rejects it again, no crash."""
    strategy, report = run()
    nan = _metrics(epsilon=float("nan"), **{"train-loss": float("nan")})
    _aggregate(strategy, report, [_reply(1, 0.01), _reply(2, 0.05, nan)])
    doc = json.loads(report.path.read_text())  # strict JSON: no NaN reached metrics.json
    cfg = FedsiloConfig.from_flat({"output-dir": str(tmp_path), "resume": True})
    resumed = RunReport(tmp_path, [], cfg.to_flat(), num_rounds=2)
    resumed.resume(doc)
    strategy = build_strategy(cfg, resumed)
    strategy.configure_train(2, ArrayRecord({k: Array(v) for k, v in SENT.items()}),
                             ConfigRecord(), grid=_NoGrid())
    kept = [strategy.absorb(r) for r in (_reply(1, 0.01), _reply(2, 0.05, nan))]
    arrays, _ = strategy.aggregate_train(2, kept)
    resumed.finish_round(2)
    resumed.complete()
    np.testing.assert_allclose(named_arrays(arrays)["w"], SENT["w"] + 0.01, atol=1e-6)
    final = json.loads(resumed.path.read_text(), parse_constant=pytest.fail)
    assert [r["failures"][0].split(":")[0] for r in final["rounds"]] == ["hospital-b"] * 2
    rejected = [e["round"] for e in journal.read(resumed.journal) if e["event"] == "rejected"]
    assert rejected == [1, 2]


def test_a_huge_evaluation_count_cannot_dominate_the_federated_evaluation(run):
    strategy, _ = run()
    replies = []
    for node, (acc, count) in {1: (0.8, 100), 2: (0.0, 10**12)}.items():
        content = RecordDict({"metrics": MetricRecord({"num-examples": count, "loss": 0.5,
                                                       "accuracy": acc})})
        replies.append(Message(content, reply_to=Message(RecordDict(), dst_node_id=node,
                                                         message_type="evaluate")))
    metrics = strategy.aggregate_evaluate(1, replies)
    # hospital-b's weight is capped at its expected examples (1000), not 10^12
    assert metrics["accuracy"] == pytest.approx(0.8 * 100 / (100 + EXPECTED))

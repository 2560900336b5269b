"""The coordinator rejects malformed, non-finite or impossible updates, and keeps going."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsilo.common import journal
from fedsilo.common.bounds import max_coordinate_change, planned_steps
from fedsilo.common.config import FedsiloConfig
from fedsilo.server.report import RunReport
from fedsilo.server.strategy import build_strategy
from fedsilo.server.validation import check_update

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task


SENT = {"w": np.zeros((3, 4), dtype=np.float32), "b": np.zeros(4, dtype=np.float32)}


@pytest.mark.parametrize(("received", "reason"), [
    ({"w": SENT["w"]}, "missing ['b']"),
    ({**SENT, "x": SENT["b"]}, "extra ['x']"),
    ({**SENT, "w": np.zeros((4, 3), dtype=np.float32)}, "shape (4, 3)"),
    ({**SENT, "b": np.zeros(4, dtype=np.float64)}, "dtype float64"),
    ({**SENT, "b": np.array([0, np.nan, 0, 0], dtype=np.float32)}, "NaN or Inf"),
    ({**SENT, "b": np.array([0, np.inf, 0, 0], dtype=np.float32)}, "NaN or Inf"),
    ({**SENT, "w": np.full((3, 4), 5.0, dtype=np.float32)}, "moved a coordinate by 5"),
])
def test_invalid_updates_are_named(received, reason):
    assert reason in check_update(received, SENT, max_change=1.0)


def test_a_valid_update_passes():
    received = {k: v + 0.5 for k, v in SENT.items()}
    assert check_update(received, SENT, max_change=1.0) is None


def test_an_honest_dp_round_stays_within_the_bound(tiny_bert, tmp_path, train_round):
    """A real DP-SGD round at a high learning rate never trips the size check."""
    cfg = FedsiloConfig.from_flat({
        "output-dir": str(tmp_path), "model": str(tiny_bert), "trainable": "top-k",
        "top-k": 1, "max-examples": 120, "batch-size": 10, "holdout-fraction": 0.0,
        "partition": "iid", "max-length": 16, "learning-rate": 0.1, "local-epochs": 2})
    sent, reply = train_round(cfg)
    arrays = reply.content["arrays"]
    received = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))
    steps = planned_steps(120, 10, 2)
    largest = max(float(np.abs(v).max()) for v in sent.values())
    bound = max_coordinate_change(0.1, steps, largest)
    assert check_update(received, sent, bound) is None
    moved = max(float(np.abs(received[k] - sent[k]).max()) for k in sent)
    assert moved > bound / 100  # the bound is not absurdly loose for a real round


def _reply(name, arrays, examples=100):
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0,
                                                   "epsilon": 1.0, "delta": 1e-5,
                                                   "noise-multiplier": 1.0, "sample-rate": 0.1,
                                                   "steps": 10}),
                          "institution": ConfigRecord({"name": name})})
    request = Message(RecordDict(), dst_node_id=1, message_type="train")
    return Message(content, reply_to=request)


def test_the_round_continues_without_the_rejected_update(tmp_path):
    cfg = FedsiloConfig.from_flat({"output-dir": str(tmp_path)})
    report = RunReport(tmp_path, ["a"], cfg.to_flat(), num_rounds=1)
    strategy = build_strategy(cfg, report)
    strategy._sent = ArrayRecord({k: Array(v) for k, v in SENT.items()})
    good = {k: v + 0.01 for k, v in SENT.items()}
    poisoned = {**good, "w": np.full((3, 4), np.nan, dtype=np.float32)}
    huge = {k: v + 1e6 for k, v in SENT.items()}
    arrays, _ = strategy.aggregate_train(1, [_reply("hospital-a", good),
                                             _reply("hospital-b", poisoned),
                                             _reply("hospital-c", huge)])
    result = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))
    assert np.allclose(result["w"], good["w"]) and np.allclose(result["b"], good["b"])
    report.finish_round(1)
    entry = json.loads((tmp_path / "metrics.json").read_text())["rounds"][0]
    assert set(entry["institutions"]) == {"hospital-a"}
    assert any(f.startswith("hospital-b: rejected: tensor 'w' holds NaN")
               for f in entry["failures"])
    assert any(f.startswith("hospital-c: rejected:") and "moved a coordinate" in f
               for f in entry["failures"])
    events = journal.read(tmp_path / "journal.jsonl")
    assert [(e["event"], e.get("institution")) for e in events] == [
        ("received", "hospital-a"), ("received", "hospital-b"), ("rejected", "hospital-b"),
        ("received", "hospital-c"), ("rejected", "hospital-c")]
    assert events[0]["update"] == journal.digest(good)

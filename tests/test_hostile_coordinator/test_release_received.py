"""A received model is checked before any use: finite and within the agreed bounds.

The institution builds the agreed initial model itself (pinned checkpoint, labels and
seed) and refuses a received model further from it than the agreed recipe can move a
coordinate in the rounds so far (common/bounds.py), or one that is not finite. The
issue's crafted heads, ``W[y*] = 1000·u, b[y*] = −900`` (a membership test) and
entries near 10³⁷ (one record's logit overflows), are refused with a generic error
and a journal line, and nothing trains or evaluates on them.
"""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsilo.client import client_app, handlers
from fedsilo.client.messages import GENERIC_REASONS
from fedsilo.client.received import received_bound
from fedsilo.common import journal
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.model import get_trainable_state, load_model
from fedsilo.common.task import federation_labels
from fedsilo.common.wire import REFUSED_MODEL_CODE

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task


@pytest.fixture
def cfg(tiny_bert, tmp_path):
    return FedsiloConfig.from_flat({
        "output-dir": str(tmp_path / "out"), "model": str(tiny_bert), "max-examples": 60,
        "batch-size": 20, "num-rounds": 3, "target-epsilon": 5.0, "holdout-fraction": 0.0,
        "partition": "iid", "max-length": 16})


def _initial(cfg):
    model = load_model(cfg.model, federation_labels(cfg), cfg.train.seed)
    return {k: v.numpy().copy() for k, v in get_trainable_state(model).items()}


def _send(cfg, arrays, kind, server_round):
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "config": ConfigRecord({"server-round": server_round})}),
                  dst_node_id=7, message_type=kind)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=cfg.to_flat())
    return (client_app.train if kind == "train" else client_app.evaluate_local)(msg, context)


def _crafted(initial, scale, bias):
    head = dict(initial)
    weight = np.zeros_like(initial["classifier.weight"])
    u = np.random.default_rng(0).normal(size=weight.shape[1])
    weight[3] = scale * u / np.linalg.norm(u)  # aimed at one record's features
    head["classifier.weight"] = weight.astype(np.float32)
    b = np.zeros_like(initial["classifier.bias"])
    b[3] = bias
    head["classifier.bias"] = b.astype(np.float32)
    return head


def _refused(reply):
    return (reply.has_error() and reply.error.code == REFUSED_MODEL_CODE
            and reply.error.reason == GENERIC_REASONS[REFUSED_MODEL_CODE])


@pytest.mark.parametrize(("kind", "server_round", "scale", "bias"), [
    ("train", 2, 1000.0, -900.0),     # the membership head
    ("evaluate", 1, 1000.0, -900.0),
    ("train", 3, 1.5e37, 0.0),        # the overflow head: finite float32, far out
    ("evaluate", 3, 1.5e37, 0.0),
])
def test_a_crafted_head_is_refused_before_any_use(cfg, monkeypatch, kind, server_round,
                                                  scale, bias, logs):
    monkeypatch.setattr(handlers, "train_private", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(handlers, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    crafted = _crafted(_initial(cfg), scale, bias)
    assert all(np.isfinite(v).all() for v in crafted.values())
    reply = _send(cfg, crafted, kind, server_round)
    assert _refused(reply)
    events = journal.read(next(Path(cfg.federation.output_dir).rglob("journal.jsonl")))
    assert [e["event"] for e in events] == ["refused-model"]
    assert events[0]["received"] == journal.digest(crafted)
    assert "classifier" in logs.text  # which tensor, how far: in the institution's log


def test_a_coordinator_claiming_a_later_round_gets_no_more_than_the_agreed_rounds(cfg):
    initial = _initial(cfg)
    largest = max(float(np.abs(v).max()) for v in initial.values())
    limit = received_bound(cfg, cfg.federation.num_rounds, largest)
    far = {k: v + np.float32(limit * 1.01) for k, v in initial.items()}
    assert _refused(_send(cfg, far, "evaluate", 1000))


def test_a_non_finite_model_is_refused(cfg):
    initial = _initial(cfg)
    initial["classifier.bias"][0] = np.nan
    assert _refused(_send(cfg, initial, "train", 1))


def test_a_model_inside_the_bounds_trains(cfg):
    initial = _initial(cfg)
    moved = {k: v + np.float32(0.5) for k, v in initial.items()}
    reply = _send(cfg, moved, "train", 2)
    assert not reply.has_error()

import json
import logging
import math
from pathlib import Path

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant

from fedsilo.client import client_app, handlers
from fedsilo.common import journal
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.model import get_trainable_state, load_model, trainable_names
from fedsilo.common.task import federation_labels
from fedsilo.common.wire import DECLINED_CODE, named_arrays

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task


@pytest.fixture
def cfg(tiny_bert, tmp_path):
    return FedsiloConfig.from_flat({
        "output-dir": str(tmp_path / "out"),
        "model": str(tiny_bert), "trainable": "top-k", "top-k": 1, "max-examples": 120,
        "batch-size": 20, "num-rounds": 3, "target-epsilon": 5.0, "holdout-fraction": 0.0,
        "partition": "iid", "max-length": 16,
    })


def _context(cfg, state=None):
    return Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 3},
                   state=state or RecordDict(), run_config=cfg.to_flat())


def _message(cfg, kind, server_round=1):
    model = load_model(cfg.model, federation_labels(cfg), cfg.train.seed)
    content = RecordDict({"arrays": ArrayRecord(get_trainable_state(model)),
                          "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=7, message_type=kind), trainable_names(model)


def test_train_replies_only_trainable_tensors_and_cumulative_epsilon(cfg):
    context = _context(cfg)
    eps = []
    for server_round in (1, 2):
        msg, names = _message(cfg, "train", server_round)
        reply = client_app.train(msg, context)
        assert list(reply.content["arrays"].keys()) == names
        assert not any(k.startswith("_module.") for k in names)
        m = reply.content["metrics"]
        assert m["num-examples"] == 120 and m["steps"] == 6
        assert m["seconds-train"] > 0 and m["seconds-setup"] > 0 and m["seconds-process"] > 0
        assert reply.content["institution"]["name"] == "institution-1"
        eps.append(m["epsilon"])
        sigma, rate, delta = m["noise-multiplier"], m["sample-rate"], m["delta"]
    # The ε reported after k rounds is what Opacus's accountant gives for k rounds' steps.
    for k, value in enumerate(eps, start=1):
        acc = RDPAccountant()
        acc.history = [(sigma, rate, 6 * k)]
        assert value == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert eps[0] < eps[1] < 5.0
    assert delta < 1 / 120


def test_train_declines_when_the_budget_is_spent_before_any_step(cfg, monkeypatch):
    context = _context(cfg)
    for server_round in (1, 2, 3):
        assert not client_app.train(_message(cfg, "train", server_round)[0], context).has_error()
    monkeypatch.setattr(handlers, "train_private", lambda *a: pytest.fail("trained"))
    reply = client_app.train(_message(cfg, "train", 4)[0], context)
    assert reply.has_error() and reply.error.code == DECLINED_CODE
    assert "institution-1: declined" in reply.error.reason and "above the target 5.0" in \
        reply.error.reason


def test_a_repeated_round_resends_the_same_update_and_is_counted_once(cfg, monkeypatch):
    """A resumed coordinator asks again: same bytes out, no new spend, one ledger line."""
    context = _context(cfg)
    first = client_app.train(_message(cfg, "train", 1)[0], context)
    monkeypatch.setattr(handlers, "train_private", lambda *a: pytest.fail("trained twice"))
    again = client_app.train(_message(cfg, "train", 1)[0], context)
    assert not again.has_error()
    assert journal.digest(named_arrays(again.content["arrays"])) == \
        journal.digest(named_arrays(first.content["arrays"]))
    for key in ("epsilon", "num-examples", "steps", "train-loss"):
        assert again.content["metrics"][key] == first.content["metrics"][key]
    folder = Path(cfg.federation.output_dir) / "ledgers" / "run-1" / "institution-1"
    ledgers = list(folder.glob("*.json"))
    assert len(ledgers) == 1
    entries = json.loads(ledgers[0].read_text())["entries"]
    assert len(entries) == 1 and entries[0]["epsilon"] == first.content["metrics"]["epsilon"]
    events = journal.read(folder / "journal.jsonl")
    assert [e["event"] for e in events] == ["train", "train"]
    assert events[0]["sent"] == journal.digest(named_arrays(first.content["arrays"]))
    assert events[0]["sent"] == events[1]["sent"] and events[0]["round"] == 1


def test_a_repeated_round_with_another_global_model_is_declined(cfg, monkeypatch):
    context = _context(cfg)
    first = client_app.train(_message(cfg, "train", 1)[0], context)
    msg, _ = _message(cfg, "train", 1)
    arrays = named_arrays(msg.content["arrays"])
    name = next(iter(arrays))
    arrays[name] = arrays[name] + 0.5  # not the model round 1 was trained from
    msg.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    monkeypatch.setattr(handlers, "train_private", lambda *a: pytest.fail("trained twice"))
    again = client_app.train(msg, context)
    assert again.has_error() and again.error.code == DECLINED_CODE
    assert "already trained" in again.error.reason
    folder = Path(cfg.federation.output_dir) / "ledgers" / "run-1" / "institution-1"
    entries = json.loads(next(folder.glob("*.json")).read_text())["entries"]
    assert len(entries) == 1 and entries[0]["epsilon"] == first.content["metrics"]["epsilon"]
    events = journal.read(folder / "journal.jsonl")
    assert [e["event"] for e in events] == ["train", "declined"]
    assert events[0]["received"] != events[1]["received"]


def test_the_run_key_survives_a_new_flower_run(cfg, monkeypatch):
    """After --resume Flower's run id changes; the run key in the message does not."""
    first = client_app.train(_message(cfg, "train", 1)[0], _context(cfg))
    msg, _ = _message(cfg, "train", 1)
    msg.content["config"]["fedsilo-run"] = 1
    resumed = Context(run_id=99, node_id=7, state=RecordDict(), run_config=cfg.to_flat(),
                      node_config={"partition-id": 1, "num-partitions": 3})
    monkeypatch.setattr(handlers, "train_private", lambda *a: pytest.fail("trained twice"))
    again = client_app.train(msg, resumed)
    assert again.content["metrics"]["epsilon"] == first.content["metrics"]["epsilon"]


def test_dp_off_is_explicit_and_warned(cfg, caplog):
    plain = cfg.replace(dp=False)
    with caplog.at_level(logging.WARNING, logger="fedsilo"):
        logging.getLogger("fedsilo").propagate = True
        try:
            reply = client_app.train(_message(plain, "train")[0], _context(plain))
        finally:
            logging.getLogger("fedsilo").propagate = False
    assert math.isinf(reply.content["metrics"]["epsilon"])
    assert any("DP is OFF" in r.message for r in caplog.records)


def test_evaluate_reports_local_held_out_metrics(cfg):
    reply = client_app.evaluate_local(_message(cfg, "evaluate")[0], _context(cfg))
    m = reply.content["metrics"]
    assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro-f1"] <= 1
    assert m["num-examples"] > 0 and "arrays" not in reply.content


def test_fused_evaluation_scores_the_received_model_before_training(cfg):
    evaluated = client_app.evaluate_local(_message(cfg, "evaluate")[0], _context(cfg))
    msg, _ = _message(cfg, "train")
    msg.content["config"]["evaluate-received"] = True
    fused = client_app.train(msg, _context(cfg)).content["metrics"]
    expected = evaluated.content["metrics"]
    for key in ("num-examples", "loss", "accuracy", "macro-f1"):  # the same model, unchanged
        assert fused[f"received-{key}"] == pytest.approx(expected[key], rel=1e-6)
    assert fused["seconds-local-eval"] > 0 and fused["steps"] == 6
    plain = client_app.train(_message(cfg, "train", 2)[0], _context(cfg)).content["metrics"]
    assert not any(k.startswith("received-") or k == "seconds-local-eval" for k in plain)

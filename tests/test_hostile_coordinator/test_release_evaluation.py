"""Local evaluation gives a crafted model no exact membership answer.

A head inside the validation bounds can still be aimed at one record: local accuracy
then moves by exactly ``1/n`` (and the test count by 1) with the record in the test
split or out of it. A deployed institution therefore releases no local evaluation by
default (the coordinator evaluates on its own data), and with ``release-evaluation =
true`` only Gaussian-noised counts, recorded in the ledger before the reply, once per
round of the run. The training loss of a round, exact and as easy to aim, is not
released by a deployed institution either.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsilo.client import client_app, evaluation
from fedsilo.client.evaluation import noised_metrics
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.model import get_trainable_state, load_model
from fedsilo.common.task import EvalResult, federation_labels
from fedsilo.common.wire import DECLINED_CODE, EVALUATE_RECEIVED_KEY, RECEIVED_PREFIX

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task


@pytest.fixture
def cfg(tiny_bert, tmp_path):
    return FedsiloConfig.from_flat({
        "output-dir": str(tmp_path / "out"), "model": str(tiny_bert), "max-examples": 60,
        "batch-size": 20, "num-rounds": 2, "target-epsilon": 5.0, "holdout-fraction": 0.0,
        "partition": "iid", "max-length": 16})


def _send(cfg, kind, server_round, release=None, **config):
    model = load_model(cfg.model, federation_labels(cfg), cfg.train.seed)
    msg = Message(RecordDict({"arrays": ArrayRecord(get_trainable_state(model)),
                              "config": ConfigRecord({"server-round": server_round,
                                                      **config})}),
                  dst_node_id=7, message_type=kind)
    node = {"partition-id": 0, "num-partitions": 2}
    if release is not None:  # as flower-client passes client.toml's release-evaluation
        node["release-evaluation"] = release
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                      run_config=cfg.to_flat())
    return (client_app.train if kind == "train" else client_app.evaluate_local)(msg, context)


def _ledger(cfg):
    path = next((Path(cfg.federation.output_dir) / "ledgers").rglob("*.json"))
    return json.loads(path.read_text())["entries"]


def test_an_institution_releases_no_local_evaluation_by_default(cfg):
    reply = _send(cfg, "evaluate", 1, release=False)
    assert reply.has_error() and reply.error.code == DECLINED_CODE
    assert evaluation.NOT_RELEASED in reply.error.reason
    # Nor inside a train message (fused evaluation): the update leaves, the metrics do not.
    reply = _send(cfg, "train", 1, release=False, **{EVALUATE_RECEIVED_KEY: True})
    assert not reply.has_error()
    assert not [k for k in reply.content["metrics"] if k.startswith(RECEIVED_PREFIX)]
    assert "train-loss" not in reply.content["metrics"]  # the exact loss is not DP either


def test_a_released_evaluation_is_noised_charged_first_and_capped(cfg):
    first = _send(cfg, "evaluate", 1, release=True)
    assert not first.has_error()
    assert set(first.content["metrics"]) == {"num-examples", "accuracy"}  # no loss, no F1
    entries = _ledger(cfg)
    assert [(e["kind"], e["round"], e["steps"], e["sample_rate"]) for e in entries] == \
        [("evaluate", 1, 1, 1.0)]
    assert entries[0]["noise_multiplier"] == pytest.approx(evaluation.evaluation_sigma(20.0))
    assert entries[0]["epsilon"] > 0
    # The same round again, or a round outside the run: declined, nothing charged.
    for server_round in (1, 0, 3, 1000):
        again = _send(cfg, "evaluate", server_round, release=True)
        assert again.has_error() and again.error.code == DECLINED_CODE
        assert evaluation.ALREADY in again.error.reason
    assert len(_ledger(cfg)) == 1


def test_the_released_values_do_not_tell_the_target_in_from_out():
    """In: the crafted model gets the target right (correct + 1, count + 1); out: not."""
    out = EvalResult(loss=0.7, accuracy=30 / 60, macro_f1=0.5, num_examples=60)
    inside = EvalResult(loss=0.7, accuracy=31 / 61, macro_f1=0.5, num_examples=61)
    draws = {name: [noised_metrics(res, 20.0, np.random.default_rng(seed))
                    for seed in range(200)] for name, res in (("in", inside), ("out", out))}
    for key in ("accuracy", "num-examples"):
        values_in = [m[key] for m in draws["in"]]
        values_out = [m[key] for m in draws["out"]]
        # An exact release would separate them at 31/61 vs 30/60 (or 61 vs 60); noised,
        # the two ranges overlap and no threshold tells them apart.
        assert len(set(values_in)) > 1 and len(set(values_out)) > 1
        assert min(values_in) < max(values_out) and min(values_out) < max(values_in)
        assert abs(np.mean(values_in) - np.mean(values_out)) < np.std(values_out)


def test_opted_in_evaluations_never_make_a_training_round_decline(cfg):
    """Training's noise is calibrated for the run's training plus one evaluation per round.

    The coordinator's schedule with fused evaluation: round 2's train message evaluates
    round 1's model, a last evaluate message round 2's. Each model's evaluation is
    released once; the final one used to be declined as "already released" because the
    fused one was booked under the round of the message that carried it.
    """
    first = _send(cfg, "train", 1, release=True)
    fused = _send(cfg, "train", 2, release=True, **{EVALUATE_RECEIVED_KEY: True})
    final = _send(cfg, "evaluate", 2, release=True)
    assert not first.has_error() and not fused.has_error()
    assert {RECEIVED_PREFIX + "accuracy", RECEIVED_PREFIX + "num-examples"} <= \
        set(fused.content["metrics"])
    assert not final.has_error(), final.error
    assert set(final.content["metrics"]) == {"num-examples", "accuracy"}
    entries = _ledger(cfg)
    assert sorted((e["kind"], e["round"]) for e in entries) == [
        ("evaluate", 1), ("evaluate", 2), ("train", 1), ("train", 2)]
    assert 0 < entries[-1]["epsilon"] <= 5.0  # the whole run, evaluations included
    again = _send(cfg, "train", 2, release=True, **{EVALUATE_RECEIVED_KEY: True})
    assert not [k for k in again.content["metrics"] if k.startswith(RECEIVED_PREFIX)]
    assert len(_ledger(cfg)) == 4  # round 1's model was evaluated once; not again


def test_release_evaluation_must_be_true_or_false(cfg):
    reply = _send(cfg, "evaluate", 1, release="maybe")
    assert reply.has_error() and reply.error.code != DECLINED_CODE  # a failure, generic

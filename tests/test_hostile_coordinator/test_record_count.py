"""The record count leaves only as the institution declares it (issue 24, item 3).

``num-examples``, the sample rate, σ, the step count and the automatic δ of a train
reply all followed the exact size of the training split, so a coordinator could read
the institution's exact count, and an add/remove-one attacker could tell whether a
record was in it. With ``declared-examples`` in client.toml each of them follows the
declared count, and the update is scaled by the planned batch, not the local count.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from fedsilo.client import client_app, handlers, train
from fedsilo.client.policy import institution_config
from fedsilo.client.privacy import DPPlan
from fedsilo.client.train import make_private
from fedsilo.common import features
from fedsilo.common.config import ConfigError, FedsiloConfig
from fedsilo.common.deidentify import DeidSettings
from fedsilo.common.model import get_trainable_state, load_model
from fedsilo.common.task import federation_labels, freeze_labels
from fedsilo.common.wire import RUN_KEY

RELEASED = ("num-examples", "sample-rate", "noise-multiplier", "steps", "delta", "epsilon")


def _site(tmp_path: Path, rows: int, **policy: object) -> dict[str, object]:
    rng = random.Random(rows)
    lines = ["text,label"] + [f"note {i} {rng.random():.6f},{rng.choice(['cardio', 'resp'])}"
                              for i in range(rows)]
    folder = tmp_path / f"site-{rows}"
    folder.mkdir(parents=True)
    (folder / "notes.csv").write_text("\n".join(lines) + "\n", "utf-8")
    return {"institution": "hospital-a", "data": str(folder / "notes.csv"),
            "ledger-dir": str(folder / "ledger"), "lifetime-epsilon": 100.0,
            "deidentify": DeidSettings(kinds=()).to_node(), **policy}


@pytest.fixture
def run_cfg(tiny_bert: Path, tmp_path: Path) -> FedsiloConfig:
    return freeze_labels(FedsiloConfig.from_flat({
        "model": str(tiny_bert), "labels": '["cardio", "resp"]', "num-rounds": 1,
        "target-epsilon": 8.0, "batch-size": 16, "output-dir": str(tmp_path / "out"),
        "max-length": 16}))


def _released(cfg: FedsiloConfig, node: dict[str, object]) -> dict[str, float]:
    sent = {k: v.numpy() for k, v in get_trainable_state(
        load_model(cfg.model, federation_labels(cfg), cfg.train.seed)).items()}
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in sent.items()}),
                              "config": ConfigRecord({"server-round": 1, RUN_KEY: 1})}),
                  dst_node_id=7, message_type="train")
    reply = client_app.train(msg, Context(run_id=1, node_id=7, node_config=node,
                                          state=RecordDict(), run_config=cfg.to_flat()))
    assert not reply.has_error(), reply.error
    return {k: float(reply.content["metrics"][k]) for k in RELEASED}


@pytest.mark.usefixtures("task_identity")
def test_neighbouring_datasets_release_the_same_values_under_a_declared_count(
        run_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(handlers, "check_run", lambda *a: None)  # the agreement is not the subject
    # 91 and 92 records: the test split takes 10 of each, leaving 81 and 82 to train on.
    exact = [_released(run_cfg, _site(tmp_path / "exact", rows)) for rows in (91, 92)]
    assert exact[0]["num-examples"] != exact[1]["num-examples"]  # today: the exact count
    declared = [_released(run_cfg, _site(tmp_path / "declared", rows, **{
        "declared-examples": 100})) for rows in (91, 92)]
    assert declared[0] == declared[1]  # add/remove one record: nothing released moves
    assert declared[0]["num-examples"] == 100
    assert declared[0]["sample-rate"] == pytest.approx(1 / 7)  # ceil(100 / 16) steps
    assert declared[0]["steps"] == 7
    assert declared[0]["delta"] == pytest.approx(min(1e-5, 0.1 / 100))


def test_the_step_count_and_the_update_scale_follow_the_plan_not_the_data(
        tiny_bert, monkeypatch):
    cfg = FedsiloConfig.from_flat({"model": str(tiny_bert), "batch-size": 8})
    model = load_model(cfg.model, federation_labels(freeze_labels(cfg.replace(
        labels='["a", "b"]'))), seed=1)
    net, (train_in,) = features.prepare(model, [TensorDataset(
        torch.randint(1000, 2000, (10, 6)), torch.ones(10, 6, dtype=torch.long),
        torch.randint(0, 2, (10,)))], torch.device("cpu"), None)
    built = []
    monkeypatch.setattr(train, "make_private", lambda *a, **k: built.append(
        make_private(*a, **k)) or built[-1])
    plan = DPPlan(noise_multiplier=1.0, sample_rate=1 / 8, steps_per_round=8, planned_steps=8,
                  target_epsilon=8.0, delta=1e-5, num_examples=64)
    accountant = RDPAccountant()
    result = train.train_private(net, train_in, cfg, plan, accountant, torch.device("cpu"))
    assert result.steps == 8 and accountant.history == [(1.0, 1 / 8, 8)]  # 10 records
    # Each noised sum is divided by the planned batch (64 / 8), not by int(10 / 8) = 1.
    assert built[0].optimizer.expected_batch_size == plan.expected_batch_size == 8


@pytest.mark.parametrize("value", [-5, 2.5, True, "many"])
def test_a_bad_declared_count_names_the_setting(run_cfg, tmp_path, value):
    with pytest.raises(ConfigError, match="declared-examples"):
        institution_config(run_cfg, _site(tmp_path, 20, **{"declared-examples": value}))


@pytest.mark.usefixtures("task_identity")
def test_a_failed_secagg_range_check_is_charged_and_not_retrained(run_cfg, tmp_path, monkeypatch):
    """The range check answers one bit about the trained update: it must cost ε, once.

    It used to run before the ledger record, so a coordinator could resend the round and
    get a fresh training (and bit) each time with nothing charged. The check runs in the
    SecAgg+ adapter (client.secagg), after the handler has charged the round.
    """
    import json

    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from flwr.compat.common import recorddict_compat as compat

    from fedsilo.client import secagg
    from fedsilo.common.wire import SECAGG_RANGE_CODE, TENSOR_NAMES_KEY

    monkeypatch.setattr(handlers, "check_run", lambda *a: None)
    trainings, checks = [], []
    real_training = handlers.train_private
    monkeypatch.setattr(handlers, "train_private",
                        lambda *a, **k: trainings.append(1) or real_training(*a, **k))

    def out_of_range(*args):
        checks.append(1)
        raise secagg.SecAggRangeError("update outside --secagg-clipping-range")

    monkeypatch.setattr(secagg, "check_secagg_range", out_of_range)
    # Flower's mod around the training stage only (the key stages need real peers).
    monkeypatch.setattr(secagg, "secaggplus_mod", lambda msg, ctx, call_next: call_next(msg, ctx))
    node = _site(tmp_path, 40)
    sent = {k: v.numpy() for k, v in get_trainable_state(
        load_model(run_cfg.model, federation_labels(run_cfg), run_cfg.train.seed)).items()}
    replies = []
    for _ in range(2):
        content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(list(sent.values())), {
            "server-round": 1, RUN_KEY: 1, TENSOR_NAMES_KEY: list(sent)}), True)
        content[RECORD_KEY_CONFIGS] = ConfigRecord({"stage": "collect_masked_vectors"})
        msg = Message(content, dst_node_id=7, message_type="train")
        replies.append(secagg.secagg_mod(msg, Context(
            run_id=1, node_id=7, node_config=node, state=RecordDict(),
            run_config=run_cfg.to_flat()), client_app.train))
    assert all(r.has_error() and r.error.code == SECAGG_RANGE_CODE for r in replies)
    assert len(trainings) == 1  # the resent round was not trained again
    assert len(checks) == 2  # ... and answered from the replay: the same update, the same bit
    [ledger] = Path(str(node["ledger-dir"])).glob("dataset-*.json")
    entries = json.loads(ledger.read_text())["entries"]
    assert [(e["kind"], e["round"]) for e in entries] == [("train", 1)]


@pytest.mark.usefixtures("task_identity")
def test_a_round_released_under_secagg_is_not_resent_in_the_clear(run_cfg, tmp_path, monkeypatch):
    """A coordinator that asks for a SecAgg+ round again as a plain message gets no update.

    The kept release used to be keyed by run, round and received model only, so the
    plain resend returned the very update SecAgg+ had masked, in the clear.
    """
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from flwr.compat.common import recorddict_compat as compat

    from fedsilo.client import secagg
    from fedsilo.common.wire import DECLINED_CODE, TENSOR_NAMES_KEY

    monkeypatch.setattr(handlers, "check_run", lambda *a: None)
    monkeypatch.setattr(secagg, "check_secagg_range", lambda *a: None)
    monkeypatch.setattr(secagg, "secaggplus_mod", lambda msg, ctx, call_next: call_next(msg, ctx))
    node = _site(tmp_path, 40)
    sent = {k: v.numpy() for k, v in get_trainable_state(
        load_model(run_cfg.model, federation_labels(run_cfg), run_cfg.train.seed)).items()}

    def context():
        return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                       run_config=run_cfg.to_flat())

    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(list(sent.values())), {
        "server-round": 1, RUN_KEY: 1, TENSOR_NAMES_KEY: list(sent)}), True)
    content[RECORD_KEY_CONFIGS] = ConfigRecord({"stage": "collect_masked_vectors"})
    masked = secagg.secagg_mod(Message(content, dst_node_id=7, message_type="train"),
                               context(), client_app.train)
    assert not masked.has_error()
    plain = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in sent.items()}),
                                "config": ConfigRecord({"server-round": 1, RUN_KEY: 1})}),
                    dst_node_id=7, message_type="train")
    resent = client_app.train(plain, context())
    assert resent.has_error() and resent.error.code == DECLINED_CODE

"""SCAFFOLD: the coordinator's control variates, each institution's correction, the bound."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant
from support import strategy_for
from torch.utils.data import TensorDataset

from fedsilo.client import privacy
from fedsilo.client.messages import read_request
from fedsilo.client.train import train_plain, train_private
from fedsilo.common.config import ConfigError, FedsiloConfig
from fedsilo.common.model import load_model
from fedsilo.common.records import LabelMap
from fedsilo.common.wire import CORRECTION_KEY, named_arrays
from fedsilo.server import checkpoint

LR, STEPS = 0.5, 4
RNG = np.random.default_rng(3)


pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def _cfg(tmp_path, **extra):
    return FedsiloConfig.from_flat({"output-dir": str(tmp_path), "strategy": "scaffold",
                                    "optimizer": "sgd", "learning-rate": LR,
                                    "server-momentum": 0.0, "min-train": 2,
                                    "min-available": 2, **extra})


def _arrays(values):
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()})


def _reply(node, name, trained, steps=STEPS, noise=1.0):
    content = RecordDict({"arrays": _arrays(trained),
                          "metrics": MetricRecord({"num-examples": 100, "train-loss": 1.0,
                                                   "epsilon": 1.0, "delta": 1e-5,
                                                   "noise-multiplier": noise,
                                                   "sample-rate": 0.1, "steps": steps}),
                          "institution": ConfigRecord({"name": name})})
    reply = Message(content, reply_to=Message(RecordDict(), dst_node_id=node,
                                              message_type="train"))
    reply.metadata.__dict__["_message_id"] = f"reply-{node}-{RNG.integers(1 << 30)}"
    return reply


def _round(strategy, server_round, x, nodes, trained):
    """Configure a round from ``x``; reply from each node with ``trained[node]``."""
    messages = strategy.configure_train(server_round, _arrays(x), ConfigRecord(), _Grid(nodes))
    sent = {m.metadata.dst_node_id: m for m in messages}
    replies = [strategy.absorb(_reply(n, f"site/{n}", t)) for n, t in trained.items()]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return sent, None if arrays is None else named_arrays(arrays)


def _correction(message):
    if CORRECTION_KEY not in message.content.array_records:
        return None
    return named_arrays(message.content[CORRECTION_KEY])


def test_controls_follow_option_two_and_each_institution_gets_its_own_correction(tmp_path):
    strategy = strategy_for(_cfg(tmp_path), tmp_path)
    x1 = {"w": RNG.normal(size=(3, 2)), "b": RNG.normal(size=2)}
    y = {n: {k: v - RNG.normal(scale=0.1, size=v.shape) for k, v in x1.items()} for n in (1, 2)}
    sent, x2 = _round(strategy, 1, x1, [1, 2], y)
    assert all(_correction(m) is None for m in sent.values())  # c = 0 in round 1
    c_i = {n: {k: (x1[k] - y[n][k]) / (STEPS * LR) for k in x1} for n in (1, 2)}
    c = {k: (c_i[1][k] + c_i[2][k]) / 2 for k in x1}

    # Round 2: each known node gets c − c_i, a node not seen yet gets c.
    y2 = {n: {k: v - RNG.normal(scale=0.1, size=v.shape) for k, v in x2.items()}
          for n in (1, 2)}
    sent, _ = _round(strategy, 2, x2, [1, 2, 3], y2)
    for n in (1, 2):
        for k in x1:
            np.testing.assert_allclose(_correction(sent[n])[k], c[k] - c_i[n][k], rtol=1e-5,
                                       atol=1e-6)
    for k in x1:
        np.testing.assert_allclose(_correction(sent[3])[k], c[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(named_arrays(sent[1].content["arrays"])["w"],
                                  np.asarray(x2["w"], np.float32))  # the model is the same

    # Option II again: c_i ← c_i − c + (x − y_i) / (K · lr); c is the mean of the c_i.
    new = {n: {k: c_i[n][k] - c[k] + (x2[k] - y2[n][k]) / (STEPS * LR) for k in x1}
           for n in (1, 2)}
    for k in x1:
        np.testing.assert_allclose(strategy.server_control[k], (new[1][k] + new[2][k]) / 2,
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(strategy.client_controls[f"site/1/{k}"], new[1][k],
                                   rtol=1e-4, atol=1e-5)
    events = (tmp_path / "journal.jsonl").read_text()
    assert events.count('"event": "correction"') == 3  # round 2 only, one per node


def test_a_rejected_update_leaves_the_controls_unchanged_and_resume_keeps_them(tmp_path):
    cfg = _cfg(tmp_path)
    strategy = strategy_for(cfg, tmp_path)
    x = {"w": RNG.normal(size=(3, 2))}
    _round(strategy, 1, x, [1, 2], {n: {"w": x["w"] - 0.1 * n} for n in (1, 2)})
    before = {k: v.copy() for k, v in strategy.client_controls.items()}
    bad = {"w": np.full((3, 2), np.nan)}
    _round(strategy, 2, x, [1, 2], {1: bad, 2: bad})
    assert strategy.client_controls.keys() == before.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(strategy.client_controls[key], value)

    checkpoint.save(tmp_path, checkpoint.Checkpoint(2, 7, x, strategy.checkpoint_state(),
                                                     cfg.to_flat(), {}))
    resumed = strategy_for(cfg, tmp_path)
    resumed.restore_checkpoint_state(checkpoint.load(tmp_path).strategy_state)
    sent = [{m.metadata.dst_node_id: _correction(m)["w"] for m in s.configure_train(
        3, _arrays(x), ConfigRecord(), _Grid([1, 2]))} for s in (strategy, resumed)]
    assert sent[0].keys() == sent[1].keys() == {1, 2}
    for node in (1, 2):
        np.testing.assert_array_equal(sent[0][node], sent[1][node])
        assert np.abs(sent[0][node]).max() > 0


def test_dp_sgd_updates_are_bounded_by_the_noise_and_the_correction(tmp_path):
    strategy = strategy_for(_cfg(tmp_path, **{"batch-size": 50, "local-epochs": 1}), tmp_path)
    x = {"w": np.zeros((2, 2))}
    # Bound: 2 · steps · lr · (C · (n + 10 σ) / batch + |c − c_i|) = 2·2·0.5·(110/50) = 4.4
    _round(strategy, 1, x, [1, 2], {1: {"w": x["w"] + 4.3}, 2: {"w": x["w"] + 4.5}})
    rejected = strategy.report.doc["rounds"][-1]["failures"]
    assert len(rejected) == 1 and "site/2: rejected" in rejected[0]
    assert "moved a coordinate by 4.5, more than local training can (4.4)" in rejected[0]


def test_sgd_without_dp_has_no_coordinate_bound_but_still_rejects_nan(tmp_path):
    strategy = strategy_for(_cfg(tmp_path, dp=False), tmp_path)
    x = {"w": np.zeros((2, 2))}
    _round(strategy, 1, x, [1, 2], {1: {"w": x["w"] + 1e4}, 2: {"w": np.full((2, 2), np.inf)}})
    rejected = strategy.report.doc["rounds"][-1]["failures"]
    assert len(rejected) == 1 and "site/2: rejected" in rejected[0] and "NaN or Inf" in rejected[0]


def test_scaffold_needs_plain_sgd():
    with pytest.raises(ConfigError, match="--optimizer sgd"):
        FedsiloConfig.from_flat({"strategy": "scaffold"})
    with pytest.raises(ConfigError, match="--strategy fedavg only"):
        FedsiloConfig.from_flat({"strategy": "scaffold", "optimizer": "sgd",
                                 "secure-aggregation": True})


@pytest.mark.parametrize("private", [True, False])
def test_each_local_step_applies_the_correction_once(tiny_bert, private):
    """A large correction dominates the step: each tensor moves by steps × lr × correction.

    DP-SGD with small physical batches takes one step per logical (noised) batch; a
    correction applied per physical batch would move three times as far.
    """
    torch.manual_seed(0)
    data = TensorDataset(torch.randint(1000, 5000, (40, 8)), torch.ones(40, 8, dtype=torch.long),
                         torch.randint(0, 2, (40,)))
    cfg = FedsiloConfig.from_flat({"model": str(tiny_bert), "trainable": "top-k", "top-k": 1,
                                   "batch-size": 10, "local-epochs": 2, "optimizer": "sgd",
                                   "learning-rate": 1e-3,
                                   "physical-batch-size": 4 if private else 0})
    model = load_model(cfg.model, LabelMap.from_names(["a", "b"]), seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    correction = {p: torch.full_like(p, 1e4) for p in params}
    if private:
        plan = privacy.plan(num_examples=40, batch_size=10, local_epochs=2, num_rounds=1,
                            target_epsilon=8.0, delta=1e-3, accountant="rdp")
        result = train_private(model, data, cfg, plan, RDPAccountant(), torch.device("cpu"),
                               correction)
    else:
        result = train_plain(model, data, cfg, torch.device("cpu"), correction)
    assert result.steps == 8
    for old, new in zip(before, params, strict=True):
        torch.testing.assert_close(old - new.detach(), torch.full_like(old, 8 * 1e-3 * 1e4),
                                   rtol=1e-3, atol=0)


def test_the_correction_travels_beside_the_global_tensors():
    arrays = {"w": np.ones((2, 2), np.float32)}
    msg = Message(RecordDict({"arrays": _arrays(arrays), "config": ConfigRecord({"a": 1}),
                              CORRECTION_KEY: _arrays({"w": -arrays["w"]})}),
                  dst_node_id=1, message_type="train")
    request = read_request(msg)
    np.testing.assert_array_equal(request.arrays["w"], arrays["w"])
    np.testing.assert_array_equal(request.correction["w"], -arrays["w"])
    del msg.content[CORRECTION_KEY]
    assert read_request(msg).correction == {}

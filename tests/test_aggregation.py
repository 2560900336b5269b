"""Streaming aggregation: updates folded on arrival equal Flower's FedAvg / FedAvgM / FedAdam."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from support import strategy_for

from fedsilo.common.config import FedsiloConfig

RNG = np.random.default_rng(0)
SENT = {"w": RNG.normal(size=(8, 5)).astype(np.float32),
        "b": RNG.normal(size=5).astype(np.float32)}


pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task


def _reply(i: int, examples: int) -> Message:
    arrays = {k: (v + RNG.normal(scale=1e-3, size=v.shape)).astype(np.float32)
              for k, v in SENT.items()}
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": examples,
                                                   "train-loss": 1.0 + i, "epsilon": 1.0,
                                                   "delta": 1e-5, "noise-multiplier": 1.0,
                                                   "sample-rate": 0.1, "steps": 10}),
                          "institution": ConfigRecord({"name": f"site-{i}"})})
    reply = Message(content, reply_to=Message(RecordDict(), dst_node_id=i, message_type="train"))
    reply.metadata.__dict__["_message_id"] = f"reply-{i}"
    return reply


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))


@pytest.mark.parametrize("strategy_name", ["fedavg", "fedadam"])
def test_updates_folded_on_arrival_equal_flowers_aggregate(strategy_name, tmp_path):
    cfg = FedsiloConfig.from_flat({"output-dir": str(tmp_path), "strategy": strategy_name})
    strategy = strategy_for(cfg, tmp_path)
    sent = ArrayRecord({k: Array(v) for k, v in SENT.items()})
    strategy.configure_train(1, sent, ConfigRecord(), grid=_NoGrid())
    replies = [_reply(i, n) for i, n in enumerate((100, 300, 50))]
    originals = [RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in
                                                    _numpy(r.content["arrays"]).items()}),
                             "metrics": r.content["metrics"]}) for r in replies]
    kept = [strategy.absorb(r) for r in replies]  # as server.waiting does on arrival
    assert all(len(r.content["arrays"]) == 0 for r in kept)  # no update is held
    arrays, metrics = strategy.aggregate_train(1, kept)
    if strategy_name == "fedavg":
        expected = _numpy(aggregate_arrayrecords(originals, "num-examples"))
    else:  # Flower's own FedAdam on the same replies
        flower = FedAdam(eta=cfg.federation.server_learning_rate)
        flower.current_arrays = {k: v.copy() for k, v in SENT.items()}
        expected = _numpy(flower.aggregate_train(1, [Message(c, reply_to=Message(
            RecordDict(), dst_node_id=1, message_type="train")) for c in originals])[0])
    got = _numpy(arrays)
    assert got.keys() == expected.keys()
    for key in got:
        assert got[key].dtype == np.float32
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert metrics["train-loss"] == pytest.approx((100 * 1 + 300 * 2 + 50 * 3) / 450)


def test_replies_not_seen_on_arrival_are_folded_at_aggregation(tmp_path):
    cfg = FedsiloConfig.from_flat({"output-dir": str(tmp_path)})
    strategy = strategy_for(cfg, tmp_path)
    strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in SENT.items()}),
                             ConfigRecord(), grid=_NoGrid())
    replies = [_reply(i, 10 * (i + 1)) for i in range(3)]
    expected = _numpy(aggregate_arrayrecords([r.content for r in replies], "num-examples"))
    strategy.absorb(replies[0])  # one on arrival, the rest only at aggregation
    got = _numpy(strategy.aggregate_train(1, replies)[0])
    for key in got:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert isinstance(strategy, FedAvg)


class _NoGrid:
    """A grid with two nodes that is never sent to (``configure_train`` samples it)."""

    def get_node_ids(self):
        return [1, 2]


def test_fedavgm_folded_on_arrival_equals_flowers_and_its_momentum_survives_a_resume(tmp_path):
    cfg = FedsiloConfig.from_flat({"output-dir": str(tmp_path), "strategy": "fedavgm",
                                   "server-momentum": 0.5})

    def ours():
        return strategy_for(cfg, tmp_path)

    flower = FedAvgM(server_momentum=0.5)
    rounds = [[_reply(i, n) for i, n in enumerate((100, 300, 50))] for _ in range(2)]
    contents = [[RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in
                                                     _numpy(r.content["arrays"]).items()}),
                             "metrics": r.content["metrics"]}) for r in replies]
                for replies in rounds]
    expected = ArrayRecord({k: Array(v) for k, v in SENT.items()})
    first = ours()
    got = expected
    for server_round, (replies, originals) in enumerate(zip(rounds, contents, strict=True), 1):
        flower.configure_train(server_round, expected, ConfigRecord(), grid=_NoGrid())
        expected = flower.aggregate_train(server_round, [Message(c, reply_to=Message(
            RecordDict(), dst_node_id=1, message_type="train")) for c in originals])[0]
        if server_round == 2:  # the coordinator restarts: a new strategy from the checkpoint
            state = first.checkpoint_state()
            assert list(state) == ["momentum_vector"]
            first = ours()
            first.restore_checkpoint_state(state)
        first.configure_train(server_round, got, ConfigRecord(), grid=_NoGrid())
        got = first.aggregate_train(server_round, [first.absorb(r) for r in replies])[0]
        for key, value in _numpy(got).items():
            np.testing.assert_allclose(value, _numpy(expected)[key], rtol=1e-5, atol=1e-6)
    # Round 2's replies sit where round 1's did: the step that remains is momentum's.
    mean_2 = _numpy(aggregate_arrayrecords(contents[1], "num-examples"))
    assert any(not np.allclose(_numpy(got)[k], mean_2[k], atol=1e-6) for k in mean_2)

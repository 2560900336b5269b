"""Stragglers, dropouts and late replies; the checkpoint the coordinator resumes from."""

import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from support import strategy_for

from fedsilo.common import atomic
from fedsilo.common.config import FedsiloConfig
from fedsilo.server import checkpoint
from fedsilo.server.rounds import run_rounds
from fedsilo.server.waiting import SUPERLINK_NODE_ID, Missing, PatientGrid

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task


class ScriptedGrid:
    """A grid whose nodes reply after given delays (None = never; 'gone' = SuperLink error)."""

    def __init__(self, delays):
        self.delays = delays
        self.sent: dict[str, tuple[Message, float]] = {}

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            mid = f"m{len(self.sent) + i}"
            ids.append(mid)
            self.sent[mid] = (msg, time.monotonic())
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            msg, at = self.sent[mid]
            delay = self.delays[msg.metadata.dst_node_id]
            if delay is None or time.monotonic() - at < (0 if delay == "gone" else delay):
                continue
            if delay == "gone":
                reply = Message(Error(code=2, reason="Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            else:
                reply = Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            out.append(reply)
        return out


def _messages(nodes, server_round):
    return [Message(RecordDict({"config": ConfigRecord({"server-round": server_round})}),
                    dst_node_id=n, message_type="train")
            for n in nodes]


def _grid(delays, **kwargs):
    missing, late = [], []
    grid = PatientGrid(ScriptedGrid(delays), 0, 0, poll_seconds=0.02,
                       on_missing=missing.append, on_late=lambda m, r: late.append((m, r)),
                       **kwargs)
    return grid, missing, late


def test_a_straggler_does_not_hold_the_round_and_its_late_reply_is_counted():
    grid, missing, late = _grid({11: 0, 12: 0, 13: 0.6}, min_replies=2,
                                straggler_timeout=0.2)
    started = time.monotonic()
    replies = list(grid.send_and_receive(_messages([11, 12, 13], 1), timeout=30))
    assert time.monotonic() - started < 5  # not the 30 s round timeout
    assert sorted(r.metadata.src_node_id for r in replies) == [11, 12]
    assert missing == [Missing(13, 1, "train", missing[0].reason)]
    assert "--straggler-timeout" in missing[0].reason
    time.sleep(0.6)
    replies = list(grid.send_and_receive(_messages([11, 12], 2), timeout=30))
    assert len(replies) == 2
    assert [(m.node_id, m.server_round, r) for m, r in late] == [(13, 1, 2)]


def test_a_node_the_superlink_reports_gone_is_dropped_by_name_not_aggregated():
    grid, missing, _ = _grid({11: 0, 12: 0, 13: "gone"}, min_replies=2, straggler_timeout=5)
    replies = list(grid.send_and_receive(_messages([11, 12, 13], 1), timeout=30))
    assert sorted(r.metadata.src_node_id for r in replies) == [11, 12]
    assert [(m.node_id, m.reason) for m in missing] == [(13, "Node Unavailable")]


def test_the_round_timeout_bounds_the_wait_below_the_minimum():
    grid, missing, _ = _grid({11: 0, 12: None}, min_replies=2, straggler_timeout=0)
    started = time.monotonic()
    replies = list(grid.send_and_receive(_messages([11, 12], 1), timeout=0.3))
    assert 0.3 <= time.monotonic() - started < 3 and len(replies) == 1
    assert missing[0].node_id == 12 and "--round-timeout" in missing[0].reason


def test_progress_is_reported_when_a_reply_arrives_not_on_every_poll():
    progress = []
    grid, _, _ = _grid({11: 0, 12: 0.3}, min_replies=2,
                       on_progress=lambda *args: progress.append(args))
    replies = list(grid.send_and_receive(_messages([11, 12], 1), timeout=30))
    assert len(replies) == 2  # ~15 polls of 0.02 s went by while node 12 was away
    assert progress == [(1, "train", 0, 2), (1, "train", 1, 2)]


def _ckpt(server_round=2):
    return checkpoint.Checkpoint(
        server_round, 7, {"w": np.arange(4, dtype=np.float32)},
        {"m_t": {"w": np.ones(4)}, "v_t": {"w": np.full(4, 2.0)}},
        {"num-rounds": 3, "resume": False}, {"rounds": [{"round": 0}]})


def test_checkpoint_round_trip_and_strategy_state(tmp_path: Path):
    checkpoint.save(tmp_path, _ckpt())
    back = checkpoint.load(tmp_path)
    assert (back.server_round, back.run_key, back.metrics) == (2, 7, {"rounds": [{"round": 0}]})
    np.testing.assert_array_equal(back.arrays["w"], np.arange(4, dtype=np.float32))

    def strategy(name: str):  # each strategy owns the state its checkpoint keeps
        cfg = FedsiloConfig.from_flat({"output-dir": str(tmp_path), "strategy": name})
        return strategy_for(cfg, tmp_path)

    adam = strategy("fedadam")
    adam.restore_checkpoint_state(back.strategy_state)
    assert adam.checkpoint_state()["v_t"]["w"].tolist() == [2.0] * 4
    with pytest.raises(checkpoint.CheckpointError, match="does not use"):
        strategy("fedavg").restore_checkpoint_state(back.strategy_state)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    checkpoint.save(tmp_path, _ckpt(1))
    before = (tmp_path / checkpoint.FILE).read_bytes()
    monkeypatch.setattr(atomic.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, _ckpt(2))
    assert (tmp_path / checkpoint.FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILE]


def test_resume_errors_name_the_flag_and_the_differing_settings(tmp_path: Path):
    with pytest.raises(checkpoint.CheckpointError, match="--resume: no checkpoint"):
        checkpoint.load(tmp_path)
    (tmp_path / checkpoint.FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.load(tmp_path)
    ckpt = _ckpt()
    checkpoint.check_settings(ckpt, {"num-rounds": 3, "resume": True}, tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=r"num-rounds \(checkpoint 3, now 5\)"):
        checkpoint.check_settings(ckpt, {"num-rounds": 5, "resume": True}, tmp_path)


def test_a_checkpoint_older_than_the_pooling_setting_resumes_with_the_cls_head(tmp_path: Path):
    old = _ckpt()  # its settings predate --pooling: the CLS head was the only one
    assert "pooling" not in old.config
    checkpoint.check_settings(old, {"num-rounds": 3, "pooling": "cls"}, tmp_path)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"pooling \(checkpoint 'cls', now 'auto'\)"):
        checkpoint.check_settings(old, {"num-rounds": 3, "pooling": "auto"}, tmp_path)


def test_each_train_reply_is_handed_on_as_it_arrives_late_and_evaluate_ones_are_not():
    seen = []
    grid, _, late = _grid({11: 0, 12: 0, 13: 0.6}, min_replies=2, straggler_timeout=0.2,
                          on_train_reply=lambda m: seen.append(m.metadata.src_node_id) or m)
    grid.send_and_receive(_messages([11, 12, 13], 1), timeout=30)
    assert sorted(seen) == [11, 12]  # 13 was too late for round 1
    time.sleep(0.6)
    evaluate = [Message(RecordDict({"config": ConfigRecord({"server-round": 2})}),
                        dst_node_id=n, message_type="evaluate") for n in (11, 12)]
    assert len(list(grid.send_and_receive(evaluate, timeout=30))) == 2
    assert sorted(seen) == [11, 12] and [m.node_id for m, _ in late] == [13]


class RecordingStrategy:
    """Strategy hooks that record which rounds asked institutions to evaluate."""

    def __init__(self):
        self.evaluated: list[int] = []

    def configure_train(self, server_round, arrays, config, grid):
        return [f"train-{server_round}"]

    def aggregate_train(self, server_round, replies):
        return None, None

    def configure_evaluate(self, server_round, arrays, config, grid):
        return [f"evaluate-{server_round}"]

    def aggregate_evaluate(self, server_round, replies):
        self.evaluated.append(server_round)


class EchoGrid:
    def __init__(self):
        self.sent: list[str] = []

    def send_and_receive(self, messages, timeout):
        self.sent += messages
        return []


@pytest.mark.parametrize(("first", "every", "expected"), [
    (1, 1, [1, 2, 3, 4, 5]), (1, 2, [2, 4, 5]), (1, 5, [5]), (1, 0, []), (3, 2, [4, 5])])
def test_federated_evaluation_runs_every_nth_round_and_after_the_last(first, every, expected):
    strategy, grid, ended = RecordingStrategy(), EchoGrid(), []
    run_rounds(strategy, grid, ArrayRecord(), first=first, last=5, run_key=7, timeout=1,
               evaluate_every=every, end_of_round=lambda r, _: ended.append(r))
    assert strategy.evaluated == expected
    assert grid.sent == [m for r in range(first, 6)
                         for m in [f"train-{r}", *([f"evaluate-{r}"] if r in expected else [])]]
    assert ended == list(range(first, 6))  # centralized evaluation and report every round


class FusedStrategy(RecordingStrategy):
    """Records which train rounds asked for the received model's evaluation, and what came."""

    def __init__(self):
        super().__init__()
        self.asked: list[int] = []
        self.metrics: dict[int, list[dict]] = {}

    def configure_train(self, server_round, arrays, config, grid):
        if config.get("evaluate-received"):
            self.asked.append(server_round)
        return [f"train-{server_round}"]

    def aggregate_evaluate(self, server_round, replies):
        super().aggregate_evaluate(server_round, replies)
        self.metrics[server_round] = [dict(r.content["metrics"]) for r in replies]


class TrainReplyGrid(EchoGrid):
    """Answers each train message with two updates carrying fused-evaluation metrics."""

    def send_and_receive(self, messages, timeout):
        messages = list(messages)
        super().send_and_receive(messages, timeout)
        if not messages[0].startswith("train"):
            return []
        server_round = int(messages[0].split("-")[1])
        replies = [Message(RecordDict({"metrics": MetricRecord({
            "num-examples": 100, "train-loss": 0.5, "received-num-examples": 10 * node,
            "received-accuracy": server_round / 10 + node / 100})}),
            dst_node_id=node, message_type="train") for node in (1, 2)]
        return [*replies, Message(Error(code=0, reason="crashed"), reply_to=replies[0])]


@pytest.mark.parametrize(("first", "every", "asked", "expected"), [
    (1, 1, [2, 3, 4, 5], [1, 2, 3, 4, 5]), (1, 2, [3, 5], [2, 4, 5]),
    (1, 5, [], [5]), (1, 0, [], []), (3, 1, [3, 4, 5], [2, 3, 4, 5])])
def test_fused_evaluation_asks_the_next_train_message_and_sends_one_evaluate_at_the_end(
        first, every, asked, expected):
    strategy, grid = FusedStrategy(), TrainReplyGrid()
    run_rounds(strategy, grid, ArrayRecord(), first=first, last=5, run_key=7, timeout=1,
               evaluate_every=every, end_of_round=lambda r, _: None, fused_evaluation=True)
    assert strategy.asked == asked  # round r's train message evaluates round r − 1's model
    assert sorted(strategy.evaluated) == expected
    # one message per round; only the last round's model needs an evaluate message
    assert grid.sent == [*(f"train-{r}" for r in range(first, 6)),
                         *(["evaluate-5"] if 5 in expected else [])]
    for server_round in set(expected) - {5}:  # prefix stripped, failed reply left out
        assert strategy.metrics[server_round] == [
            {"num-examples": 10 * node, "accuracy": (server_round + 1) / 10 + node / 100}
            for node in (1, 2)]

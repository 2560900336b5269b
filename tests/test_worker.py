"""The warm worker runs ClientApp messages in one long-lived process, or falls back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsilo.client import client_app, tasks, worker
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.deidentify import DeidSettings
from fedsilo.common.model import get_trainable_state, load_model
from fedsilo.common.processes import child_env
from fedsilo.common.task import federation_labels
from fedsilo.common.wire import FAILED_CODE

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task


@pytest.fixture(scope="module")
def running():
    """One real worker process for the module's tests."""
    proc, sock = worker.start(child_env())
    assert sock.exists() and proc.poll() is None
    assert sock.stat().st_mode & 0o777 == 0o600 and sock.parent.stat().st_mode & 0o777 == 0o700
    yield proc, sock
    worker.stop(proc, sock)
    assert proc.poll() is not None and not sock.parent.exists()


def _cfg(tiny_bert: Path, out: Path, **extra: object) -> FedsiloConfig:
    return FedsiloConfig.from_flat({
        "output-dir": str(out), "model": str(tiny_bert), "max-examples": 60,
        "batch-size": 20, "num-rounds": 2, "holdout-fraction": 0.0, "partition": "iid",
        "max-length": 16, **extra})


def _call(cfg: FedsiloConfig, kind: str, sock: Path | None,
          model: str | None = None) -> tuple[Message, list[str]]:
    state = get_trainable_state(load_model(cfg.model, federation_labels(cfg), cfg.train.seed))
    msg = Message(RecordDict({"arrays": ArrayRecord(state),
                              "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type=kind)
    node: dict[str, str | int] = {"partition-id": 0, "num-partitions": 2}
    if sock is not None:
        node[worker.SOCKET_KEY] = str(sock)
    run_config = cfg.to_flat() | ({"model": model} if model else {})
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                      run_config=run_config)
    handler = client_app.train if kind == "train" else client_app.evaluate_local
    return handler(msg, context), list(state)


def test_messages_run_in_the_worker_not_in_the_clientapp(running, tiny_bert, tmp_path,
                                                         monkeypatch):
    monkeypatch.setattr(tasks, "train", lambda *a: pytest.fail("ran in the ClientApp"))
    monkeypatch.setattr(tasks, "evaluate_local", lambda *a: pytest.fail("ran in the ClientApp"))
    cfg = _cfg(tiny_bert, tmp_path)
    reply, names = _call(cfg, "train", running[1])
    assert not reply.has_error()
    assert list(reply.content["arrays"].keys()) == names
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 60 and 0 < metrics["epsilon"] <= 8.0
    assert metrics["seconds-process"] >= 0  # this process's age, not the worker's
    reply, _ = _call(cfg, "evaluate", running[1])
    assert reply.content["metrics"]["num-examples"] > 0
    # The worker wrote the institution's ledger, as the ClientApp would have.
    assert list((tmp_path / "ledgers" / "run-1").rglob("*.json"))


def test_a_failure_in_the_worker_fails_the_message_with_a_generic_reason(running, tiny_bert,
                                                                         tmp_path):
    cfg = _cfg(tiny_bert, tmp_path)
    failed, _ = _call(cfg, "train", running[1], model=str(tmp_path / "no-such-model"))
    assert failed.has_error() and failed.error.code == FAILED_CODE
    assert "ModelError" not in failed.error.reason and "no-such-model" not in failed.error.reason
    assert running[0].poll() is None  # still serving
    reply, _ = _call(cfg, "evaluate", running[1])
    assert not reply.has_error()


def test_without_a_worker_the_message_runs_in_the_clientapp(tiny_bert, tmp_path, logs):
    cfg = _cfg(tiny_bert, tmp_path)
    reply, names = _call(cfg, "train", tmp_path / "nobody.sock")
    assert not reply.has_error() and list(reply.content["arrays"].keys()) == names
    assert "no warm worker" in logs.text and "running the train message in this process" \
        in logs.text


def test_a_changed_data_file_is_reloaded_by_a_long_lived_process(tmp_path):
    data = tmp_path / "notes.csv"
    data.write_text("text,label\n" + "".join(f"note {i},{'ab'[i % 2]}\n" for i in range(20)))
    cfg = FedsiloConfig.from_flat({"data": str(data), "labels": '["a", "b"]',
                                   "output-dir": str(tmp_path / "out")})
    first = tasks._prepared(cfg, None, "a", tmp_path / "cache", tasks._stamp(str(data)),
                            DeidSettings())
    data.write_text("text,label\n" + "".join(f"memo {i},{'ab'[i % 2]}\n" for i in range(20)))
    os.utime(data, ns=(1, 1))  # a different stamp even within the clock's resolution
    second = tasks._prepared(cfg, None, "a", tmp_path / "cache", tasks._stamp(str(data)),
                            DeidSettings())
    assert first[3] != second[3]  # the dataset fingerprint follows the file


def test_flower_processes_poll_for_tasks_every_tenth_of_a_second_unless_told(monkeypatch):
    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    assert child_env()["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.1"
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "2")
    assert child_env()["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "2"  # the user's value wins

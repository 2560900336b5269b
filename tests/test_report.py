import json
import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedsilo.common.wire import DECLINED_CODE
from fedsilo.server.report import RunReport

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task


def _reply(content=None, error=None):
    request = Message(content=RecordDict(), dst_node_id=5, message_type="train")
    return Message(error, reply_to=request) if error else Message(content, reply_to=request)


def test_round_records_updates_declines_and_failures(tmp_path):
    report = RunReport(tmp_path, ["a", "b"], {"dp": True}, num_rounds=2)
    arrays = ArrayRecord({"w": torch.zeros(4, 8)})
    ok = _reply(RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.5, "epsilon": 2.0,
                                 "delta": 1e-5, "noise-multiplier": 1.1, "sample-rate": 0.1,
                                 "steps": 10, "seconds-setup": 0.5, "seconds-train": 4.0}),
        "institution": ConfigRecord({"name": "hospital-a"}),
    }))
    declined = _reply(error=Error(code=DECLINED_CODE, reason="hospital-b: declined: budget"))
    failed = _reply(error=Error(code=1, reason="boom"))
    report.record_train(1, [ok, declined, failed])
    report.finish_round(1)
    doc = json.loads((tmp_path / "metrics.json").read_text())
    entry = doc["rounds"][0]
    assert entry["institutions"]["hospital-a"]["epsilon"] == 2.0
    assert entry["bytes_received"] == len(arrays["w"].data) >= 4 * 8 * 4
    assert entry["declined"] == ["hospital-b: declined: budget"]
    assert len(entry["failures"]) == 1 and entry["failures"][0].endswith(": boom")
    assert entry["train_loss"] == 1.5
    assert entry["institutions"]["hospital-a"]["seconds"] == {"setup": 0.5, "train": 4.0}
    line = report.progress_line(entry)
    assert "1 declined" in line and "1 failed" in line and "hospital-a 2.00" in line


def test_dropped_and_late_replies_are_named_counted_and_estimated(tmp_path):
    report = RunReport(tmp_path, ["a"], {"dp": True}, num_rounds=3)
    report.names[12] = "hospital-b"
    report.finish_round(0)
    report.record_dropped(1, 12, "train", "no reply within 20 s (--straggler-timeout)")
    report.record_dropped(1, 13, "train", "Node Unavailable")
    report.doc["rounds"][-1]["institutions"]["hospital-a"] = {"num_examples": 5,
                                                              "train_loss": 1.0,
                                                              "epsilon": 1.0}
    line = report.progress_line(report.doc["rounds"][-1])
    report.finish_round(1)
    report.record_late(1, 12, "train", 2, "an update")
    entry = report.doc["rounds"][-1]
    assert entry["round"] == 2
    assert entry["late"] == ["hospital-b (node 12): train reply to round 1 arrived late "
                             "(an update); not aggregated"]
    first = json.loads((tmp_path / "metrics.json").read_text())["rounds"][1]
    assert first["dropped"][0].startswith("hospital-b (node 12): train reply missing")
    assert first["dropped"][1].startswith("node 13:")
    assert "2 dropped" in line and "1/3 institutions aggregated" in line
    assert "ETA" in report.progress_line(report.doc["rounds"][1])
    events = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert [(e["event"], e["institution"]) for e in events] == [
        ("dropped", "hospital-b"), ("dropped", None), ("late", "hospital-b")]


def test_fused_evaluation_lands_on_the_round_it_evaluated(tmp_path, caplog):
    report = RunReport(tmp_path, ["a"], {"dp": True}, num_rounds=3)
    for server_round in (1, 2):
        report.record_train(server_round, [])
        report.finish_round(server_round)
    report.record_federated_eval(3, None)  # round 3 begins; its entry is the latest
    logger = logging.getLogger("fedsilo")
    propagate, logger.propagate = logger.propagate, True  # let caplog see fedsilo's lines
    try:
        with caplog.at_level(logging.INFO, logger="fedsilo.server.report"):
            report.record_federated_eval(2, {"num-examples": 30, "loss": 0.4,
                                             "accuracy": 0.8, "macro-f1": 0.7})
    finally:
        logger.propagate = propagate
    rounds = {e["round"]: e for e in report.doc["rounds"]}
    assert [e["round"] for e in report.doc["rounds"]] == [1, 2, 3]  # no second round 2
    assert rounds[2]["federated_eval"]["accuracy"] == 0.8
    assert rounds[3]["federated_eval"] is None
    assert "round 2/3 | fed-eval acc 0.800 macro-F1 0.700" in caplog.text
    report.finish_round(3)  # written with the next round
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["rounds"][1]["federated_eval"]["macro_f1"] == 0.7


def test_a_noised_evaluation_release_with_accuracy_only_is_reported(tmp_path):
    """Institutions that release a noised evaluation send accuracy and a count only.

    The coordinator used to index ``macro_f1`` and ``loss`` and fail the run after
    round 1 (KeyError in the ServerApp) as soon as one institution opted in.
    """
    from fedsilo.server.dashboard import render
    from fedsilo.server.plots import write_artefacts
    from fedsilo.server.tracking import round_scalars

    report = RunReport(tmp_path, ["a"], {"dp": True}, num_rounds=2)
    report.record_train(1, [])
    report.finish_round(1)
    report.record_train(2, [])
    report.record_federated_eval(1, {"num-examples": 40, "accuracy": 0.625})
    line = report.progress_line(report.doc["rounds"][0])
    report.finish_round(2)
    assert "fed-eval acc 0.625" in line and "macro-F1" not in line
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["rounds"][0]["federated_eval"] == {"num_examples": 40.0, "accuracy": 0.625}
    paths = write_artefacts(doc, tmp_path / "plots")
    assert all(p.stat().st_size > 0 for p in paths)
    assert ("federated_eval/accuracy", 0.625) in list(round_scalars(doc["rounds"][0]))
    (tmp_path / "progress.json").write_text(json.dumps(
        {"round": 2, "phase": "train", "replied": 0, "expected": 1}))
    from rich.console import Console
    console = Console(width=140, record=True, file=__import__("io").StringIO())
    console.print(render(tmp_path))
    assert "after round 1: acc 0.625" in console.export_text()


def test_an_institution_dropped_from_train_and_evaluate_counts_once(tmp_path):
    report = RunReport(tmp_path, ["a"], {"dp": True}, num_rounds=1)
    report.names[9] = "hospital-d"
    for name in ("hospital-a", "hospital-b"):
        report.record_update(1, name, {"num-examples": 10, "epsilon": 1.0, "delta": 1e-5,
                                       "noise-multiplier": 1.0, "sample-rate": 0.1,
                                       "steps": 3}, 100)
    report.reject(1, "hospital-c", "holds NaN")
    report.record_dropped(1, 9, "train", "no reply")
    report.record_dropped(1, 9, "evaluate", "Node Unavailable")
    entry = report.doc["rounds"][-1]
    assert entry["dropped"][0].startswith("hospital-d (node 9): train reply missing")
    assert "2/4 institutions aggregated" in report.progress_line(entry)

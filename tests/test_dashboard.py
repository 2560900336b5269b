"""The live views: what they show, and that off a terminal they stay out of the way."""

import io
import json

from rich.console import Console

from fedsilo.common import live
from fedsilo.server.dashboard import render


def _text(renderable) -> str:
    console = Console(width=140, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_coordinator_view_shows_round_replies_eta_and_each_institution(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"config": {"num-rounds": 3}, "rounds": [
        {"round": 0, "institutions": {}, "seconds": 5},
        {"round": 1, "seconds": 120, "failures": ["hospital-c: rejected: NaN"],
         "declined": [], "dropped": ["hospital-d (node 9): train reply missing: gone"],
         "centralized_eval": {"accuracy": 0.5, "macro_f1": 0.25, "loss": 1.5},
         "institutions": {n: {"num_examples": 100, "train_loss": 2.0, "epsilon": 3.25}
                          for n in ("hospital-a", "hospital-b")}}]}))
    (tmp_path / "progress.json").write_text(json.dumps(
        {"round": 2, "phase": "train", "replied": 1, "expected": 4}))
    text = _text(render(tmp_path))
    assert "round 2/3 · train · 1/4 institutions replied" in text
    # round 1 carried the one-off encoder pass: no estimate from it alone
    assert "ETA after round 2 (round 1 included one-off work)" in text
    assert "acc 0.500" in text and "3.250" in text
    assert "hospital-a" in text and "aggregated" in text


def test_coordinator_view_shows_the_latest_evaluated_round(tmp_path):
    fed = {"accuracy": 0.75, "macro_f1": 0.5, "loss": 0.9}
    (tmp_path / "metrics.json").write_text(json.dumps({"config": {"num-rounds": 3}, "rounds": [
        {"round": 1, "seconds": 10, "federated_eval": fed, "institutions": {}},
        {"round": 2, "seconds": 10, "federated_eval": None, "institutions": {}}]}))
    # round 2's federated evaluation comes with round 3's train replies
    assert "after round 1: acc 0.750 macro-F1 0.500 loss 0.9000" in _text(render(tmp_path))


def test_live_view_is_off_without_a_terminal(capsys, monkeypatch):
    monkeypatch.setenv("CI", "true")
    calls = []
    with live.live_view(lambda: calls.append(1) or "x"):
        print("plain line")
    assert capsys.readouterr().out == "plain line\n" and calls == []
    assert live.duration(3725) == "1h02m" and live.duration(65) == "1m05s"


def test_institution_view_shows_rounds_spend_and_refusals(tmp_path):
    from fedsilo.client.dashboard import render as institution_view
    from fedsilo.common import journal

    assert "waiting for the coordinator" in _text(institution_view(tmp_path, "h-a", 8.0))
    journal.append(tmp_path / "journal.jsonl", "train", run=7, round=1, epsilon=2.5,
                   num_examples=300, sent={"sha256": "x", "bytes": 625752})
    journal.append(tmp_path / "journal.jsonl", "declined", run=9, round=1,
                   reason="declined: the run differs from approved agreement")
    text = _text(institution_view(tmp_path, "h-a", 8.0))
    assert "h-a: 1 round(s) trained, ε spent 2.500 of 8.0" in text
    assert "625,752 B" in text and "declined: declined: the run differs" in text


def test_eta_leaves_out_round_one_and_one_off_work_is_named(tmp_path, logs):
    import logging
    import time

    from fedsilo.server.dashboard import heartbeat

    assert live.eta([300.0, 10.0, 12.0, 10.0], 18) == "ETA 3m00s"  # not 18 x 83 s
    assert live.eta([300.0], 19).startswith("ETA after round 2")
    assert live.eta([300.0, 10.0], 0) == ""
    (tmp_path / "metrics.json").write_text(json.dumps({"config": {"num-rounds": 20}, "rounds": [
        {"round": 0, "institutions": {}, "seconds": 1}]}))
    (tmp_path / "progress.json").write_text(json.dumps(
        {"round": 1, "phase": "train", "replied": 0, "expected": 2}))
    line = heartbeat(tmp_path)
    assert "round 1/20 · train · 0/2 institutions replied" in line
    assert "into the round" in line and "one-off work" in line and "encoder" in line
    with logs.at_level(logging.INFO, logger="fedsilo"):  # off a terminal: logged now and then
        with live.live_view(lambda: "x", heartbeat=lambda: heartbeat(tmp_path), every=0.05):
            deadline = time.monotonic() + 30
            while "one-off work" not in logs.text and time.monotonic() < deadline:
                time.sleep(0.05)
    assert "one-off work" in logs.text

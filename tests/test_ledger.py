import json
import shutil
import subprocess
import sys

import pytest
from opacus.accountants import RDPAccountant

from fedsilo.client.ledger import Ledger, LedgerError, LedgerRefused, dataset_fingerprint


def test_fingerprint_follows_the_data_not_its_order():
    a = dataset_fingerprint(["x", "y"], ["1", "2"])
    assert a == dataset_fingerprint(["y", "x"], ["2", "1"])
    assert a != dataset_fingerprint(["x", "y"], ["1", "1"])


def test_recorded_epsilon_equals_opacus_recomputed_from_the_logged_events(tmp_path):
    ledger = Ledger.open(tmp_path, "f" * 64, "rdp")
    eps = [ledger.record(7, r, 20, 0.05, 1.1, 1e-5) for r in (1, 2)]
    eps.append(ledger.record(8, 1, 10, 0.1, 1.3, 1e-5))
    reopened = Ledger.open(tmp_path, "f" * 64, "rdp")
    events = [(e.noise_multiplier, e.sample_rate, e.steps) for e in reopened.entries]
    for k, entry in enumerate(reopened.entries, start=1):
        acc = RDPAccountant()
        acc.history = events[:k]
        assert entry.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert [e.epsilon for e in reopened.entries] == eps
    assert reopened.has(7, 2) and not reopened.has(7, 3)
    assert reopened.history(exclude_run=8) == [(1.1, 0.05, 40)]


def test_spend_survives_a_killed_process(tmp_path):
    code = (
        "import os, signal, sys\n"
        "from fedsilo.client.ledger import Ledger\n"
        f"ledger = Ledger.open(__import__('pathlib').Path({str(tmp_path)!r}), 'a' * 64, 'rdp')\n"
        "ledger.record(1, 1, 30, 0.02, 0.9, 1e-5)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False)
    assert done.returncode == -9
    ledger = Ledger.open(tmp_path, "a" * 64, "rdp")
    assert ledger.has(1, 1) and ledger.spent(1e-5) > 0
    assert not list(tmp_path.glob(".ledger-*"))  # no half-written leftovers


def test_a_corrupt_or_foreign_ledger_is_an_error_not_a_reset(tmp_path):
    ledger = Ledger.open(tmp_path, "b" * 64, "rdp")
    ledger.record(1, 1, 5, 0.1, 1.0, 1e-5)
    with pytest.raises(LedgerError, match="accountant"):
        Ledger.open(tmp_path, "b" * 64, "prv")
    ledger.path.write_text("{not json", "utf-8")
    with pytest.raises(LedgerError, match="unreadable"):
        Ledger.open(tmp_path, "b" * 64, "rdp")
    assert ledger.path.read_text("utf-8") == "{not json"  # left for the operator to restore
    other = tmp_path / ("dataset-" + "c" * 32 + ".json")
    other.write_text(json.dumps({"fingerprint": "d" * 64, "accountant": "rdp", "entries": []}))
    with pytest.raises(LedgerError, match="another dataset"):
        Ledger.open(tmp_path, "c" * 64, "rdp")


def _ledger(folder, **kw):
    return Ledger.open(folder, "a" * 64, "rdp", **kw)


def test_two_interleaved_records_both_count(tmp_path):
    first, second = _ledger(tmp_path), _ledger(tmp_path)  # two ClientApps, opened together
    first.record(1, 1, 10, 0.1, 1.0, 1e-5)
    second.record(2, 1, 10, 0.1, 1.0, 1e-5)
    both = _ledger(tmp_path)
    assert both.has(1, 1) and both.has(2, 1) and not both.problem
    assert both.history() == [(1.0, 0.1, 20)]


def test_kinds_are_separate_and_each_release_is_recorded_once(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.record(1, 1, 10, 0.1, 1.0, 1e-5)
    ledger.record(1, 1, 1, 1.0, 5.0, 1e-5, kind="evaluate")
    assert ledger.has(1, 1) and ledger.has(1, 1, "evaluate") and not ledger.has(1, 2)
    with pytest.raises(LedgerError, match="never counted twice"):
        _ledger(tmp_path).record(1, 1, 10, 0.1, 1.0, 1e-5)
    with pytest.raises(ValueError, match="kind"):
        ledger.record(1, 2, 10, 0.1, 1.0, 1e-5, kind="other")
    # the run's agreed ε covers its training and its noised evaluations
    assert ledger.run_history(1) == [(1.0, 0.1, 10), (5.0, 1.0, 1)]
    ledger.record(2, 1, 10, 0.1, 1.0, 1e-5)
    assert ledger.spent(1e-5) > ledger.run_spent(1, 1e-5)  # the lifetime counts every run


def test_three_numbers(tmp_path):
    ledger = _ledger(tmp_path, lifetime=10.0)
    assert ledger.left(1e-5) == 10.0
    ledger.record(1, 1, 40, 0.05, 1.0, 1e-5)
    assert ledger.left(1e-5) == pytest.approx(10.0 - ledger.spent(1e-5))


def _refused(folder):
    ledger = _ledger(folder)
    with pytest.raises(LedgerRefused):
        ledger.require_trusted()
    return ledger


def test_a_deleted_ledger_refuses_training_until_the_operator_confirms(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.record(1, 1, 10, 0.1, 1.0, 1e-5)
    ledger.path.unlink()
    reopened = _refused(tmp_path)
    assert "missing" in reopened.problem and reopened.spent(1e-5) == 0
    assert "missing" in reopened.confirm()  # the operator accepts the loss, knowingly
    _ledger(tmp_path).require_trusted()


def test_a_truncated_ledger_refuses_training(tmp_path):
    ledger = _ledger(tmp_path)
    for r in (1, 2):
        ledger.record(1, r, 10, 0.1, 1.0, 1e-5)
    doc = json.loads(ledger.path.read_text("utf-8"))
    doc["entries"] = doc["entries"][:1]
    ledger.path.write_text(json.dumps(doc), "utf-8")
    assert "truncated" in _refused(tmp_path).problem


def test_a_ledger_rolled_back_to_an_older_copy_refuses_training(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.record(1, 1, 10, 0.1, 1.0, 1e-5)
    shutil.copy(ledger.path, tmp_path / "backup.json")
    ledger.record(2, 1, 10, 0.1, 1.0, 1e-5)
    shutil.copy(tmp_path / "backup.json", ledger.path)
    refused = _refused(tmp_path)
    # Spend recorded meanwhile is kept, and the ledger stays refused.
    refused.record(3, 1, 10, 0.1, 1.0, 1e-5)
    assert _refused(tmp_path).has(3, 1)


def test_an_edited_entry_breaks_the_chain(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.record(1, 1, 10, 0.1, 1.0, 1e-5)
    doc = json.loads(ledger.path.read_text("utf-8"))
    doc["entries"][0]["noise_multiplier"] = 50.0  # a cheaper past
    ledger.path.write_text(json.dumps(doc), "utf-8")
    assert "chain" in _refused(tmp_path).problem


def test_a_missing_marker_refuses_but_a_crash_before_the_marker_is_fine(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.record(1, 1, 10, 0.1, 1.0, 1e-5)
    marker = next((tmp_path.parent / f"{tmp_path.name}.state").glob("*.marker"))
    saved = marker.read_bytes()
    ledger.record(1, 2, 10, 0.1, 1.0, 1e-5)
    marker.write_bytes(saved)  # as if the process died between the two writes
    assert not _ledger(tmp_path).problem  # the ledger is ahead: more spend, never less
    marker.unlink()
    assert "marker" in _refused(tmp_path).problem


def test_an_old_format_ledger_is_folded_in_and_waits_for_confirmation(tmp_path):
    old = {"schema": "fedsilo.ledger/1", "fingerprint": "9" * 64, "accountant": "rdp",
           "entries": [{"run": 5, "round": r, "steps": 40, "sample_rate": 0.05,
                        "noise_multiplier": 0.8, "delta": 1e-5, "epsilon": 0.0,
                        "at": "2026-01-01T00:00:00+00:00"} for r in (1, 2)]}
    (tmp_path / ("9" * 32 + ".json")).write_text(json.dumps(old), "utf-8")
    ledger = _refused(tmp_path)
    assert "old-format" in ledger.problem and "ledger confirm" in ledger.problem
    assert ledger.history() == [(0.8, 0.05, 80)]  # all of its spend counts
    assert ledger.has(5, 2)  # its rounds are never trained again
    ledger.confirm()
    again = _ledger(tmp_path)
    again.require_trusted()
    assert again.history() == [(0.8, 0.05, 80)]  # folded once
    assert (tmp_path / ("9" * 32 + ".json")).exists()  # the old file is left in place


def _site(tmp_path):
    (tmp_path / "notes.csv").write_text("text,label\na,x\nb,y\nc,x\n", "utf-8")
    toml = tmp_path / "client.toml"
    toml.write_text('institution = "h"\nsuperlink = "127.0.0.1:9092"\ndata = "notes.csv"\n'
                    "lifetime-epsilon = 6\n", "utf-8")
    return toml


def test_operator_sees_the_three_numbers_and_confirms_a_migrated_ledger(tmp_path, logs):
    from fedsilo.client import cli
    from fedsilo.client.ledger_cli import current_key

    toml = _site(tmp_path)
    old = {"schema": "fedsilo.ledger/1", "fingerprint": "9" * 64, "accountant": "rdp",
           "entries": [{"run": 5, "round": 1, "steps": 40, "sample_rate": 0.05,
                        "noise_multiplier": 1.0, "delta": 1e-5, "epsilon": 0.0, "at": ""}]}
    (tmp_path / "ledger").mkdir()
    (tmp_path / "ledger" / "old.json").write_text(json.dumps(old), "utf-8")
    key = current_key({"data": str(tmp_path / "notes.csv")})
    with pytest.raises(LedgerRefused):  # the first use folds it in and waits
        Ledger.open(tmp_path / "ledger", key, "rdp").require_trusted()
    assert cli.main(["ledger", "show", "--config", str(toml)]) == 0
    assert "lifetime 6 / left" in logs.text and "REFUSED: old-format" in logs.text
    assert cli.main(["ledger", "confirm", "--config", str(toml)]) == 2  # no tty, no --yes
    assert cli.main(["ledger", "confirm", "--config", str(toml), "--yes"]) == 0
    ledger = Ledger.open(tmp_path / "ledger", key, "rdp", lifetime=6.0)
    ledger.require_trusted()
    assert ledger.history() == [(1.0, 0.05, 40)] and 0 < ledger.left(1e-5) < 6


def test_a_named_dataset_keeps_its_ledger_as_its_file_grows():
    from fedsilo.client.ledger import dataset_key

    assert dataset_key("notes", ["a"], ["x"]) == dataset_key("notes", ["a", "b"], ["x", "y"])
    assert dataset_key("", ["a"], ["x"]) == dataset_fingerprint(["a"], ["x"])
    assert dataset_key("notes", [], []) != dataset_key("other", [], [])


def test_show_only_reads(tmp_path, logs):
    from fedsilo.client import cli

    toml = _site(tmp_path)
    (tmp_path / "ledger").mkdir()
    old = {"schema": "fedsilo.ledger/1", "fingerprint": "9" * 64, "accountant": "rdp",
           "entries": []}
    (tmp_path / "ledger" / "old.json").write_text(json.dumps(old), "utf-8")
    assert cli.main(["ledger", "show", "--config", str(toml)]) == 0
    assert "old.json: not folded in yet" in logs.text
    assert sorted(p.name for p in (tmp_path / "ledger").iterdir()) == ["old.json"]


def test_two_processes_recording_at_once_lose_nothing(tmp_path):
    code = (
        "import sys, pathlib\n"
        "from fedsilo.client.ledger import Ledger\n"
        f"folder = pathlib.Path({str(tmp_path)!r})\n"
        "run = int(sys.argv[1])\n"
        "for r in range(1, 16):\n"
        "    Ledger.open(folder, 'a' * 64, 'rdp').record(run, r, 10, 0.1, 1.0, 1e-5)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(run)]) for run in (1, 2)]
    assert [p.wait(120) for p in procs] == [0, 0]
    ledger = _ledger(tmp_path)
    assert len(ledger.entries) == 30 and not ledger.problem
    assert ledger.history() == [(1.0, 0.1, 300)]

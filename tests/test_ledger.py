import json
import subprocess
import sys

import pytest
from opacus.accountants import RDPAccountant

from fedsilo.client.ledger import Ledger, LedgerError, dataset_fingerprint


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
    other = tmp_path / ("c" * 32 + ".json")
    other.write_text(json.dumps({"fingerprint": "d" * 64, "accountant": "rdp", "entries": []}))
    with pytest.raises(LedgerError, match="another dataset"):
        Ledger.open(tmp_path, "c" * 64, "rdp")

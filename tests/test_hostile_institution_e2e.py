"""One hostile institution of five, real processes on loopback (TLS, DP, flower-server).

hospital-e, instrumented through a ``sitecustomize`` on its ``PYTHONPATH``, sends

- round 1: an update exactly at the gate's per-coordinate bound pointing opposite to
  its own honest update, claiming 10¹² examples — let through, weight clamped to the
  allow-list's ``expected-examples``;
- round 2: its update ×10⁴ — rejected;
- round 3: NaN ε and training loss — rejected.

The run completes; with ``--strategy median`` the global model after round 1 stays
within the honest institutions' range, coordinate by coordinate; the journal names the
rejected replies and the clamped claim.
"""

from __future__ import annotations

import csv
import json
import signal

import numpy as np
import pytest
from test_faults import _agree, _client, _kill, _kits, _server

from fedsilo.common.processes import free_port
from fedsilo.common.records import load_records
from fedsilo.server.provision import provision

pytestmark = pytest.mark.slow
NAMES = ("hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e")
FLAGS = ["--num-rounds", "3", "--strategy", "median", "--target-epsilon", "8"]
HOSTILE = '''
import os
if os.environ.get("FEDSILO_TEST_DUMP"):
    from pathlib import Path
    import numpy as np
    from fedsilo.client import messages
    from fedsilo.common.bounds import largest_learning_rate, max_coordinate_change, planned_steps
    from fedsilo.common.config import FedsiloConfig
    dump, name = Path(os.environ["FEDSILO_TEST_DUMP"]), os.environ["FEDSILO_TEST_NAME"]
    honest_arrays, honest_reply = messages.released_arrays, messages.train_reply

    def _round():
        return len(list(dump.glob(name + "-*.npz"))) + 1

    def arrays(request, state, received, dtype):
        out = honest_arrays(request, state, received, dtype)
        k = _round()
        np.savez(dump / f"{name}-{k}.npz", **{"received/" + n: v for n, v in received.items()},
                 **{"released/" + n: v for n, v in out.items()})
        if name != "hospital-e":
            return out
        if k == 1:  # at the bound, opposite to its own (honest) direction
            train = FedsiloConfig.from_flat({"batch-size": 32}).train
            largest = max(float(np.abs(v).max()) for v in received.values())
            bound = max_coordinate_change(
                largest_learning_rate(train.learning_rate, train.encoder_learning_rate),
                planned_steps(int(os.environ["FEDSILO_TEST_EXPECTED"]), train.batch_size,
                              train.local_epochs), largest)
            return {n: (received[n] - np.float32(0.99 * bound) * np.sign(v - received[n])
                        ).astype(v.dtype) for n, v in out.items()}
        if k == 2:
            return {n: v * 1e4 for n, v in out.items()}
        return out

    def reply(msg, who, metrics, released):
        if name == "hospital-e":
            k = _round() - 1
            if k == 1:
                metrics = {**metrics, "num-examples": 10**12}
            elif k == 3:
                metrics = {**metrics, "epsilon": float("nan"), "train-loss": float("nan")}
        return honest_reply(msg, who, metrics, released)

    messages.released_arrays, messages.train_reply = arrays, reply
'''


@pytest.fixture
def site(tmp_path, tiny_bert):
    port = free_port()
    icd = load_records("icd10")
    data, rows = {}, {}
    for j, name in enumerate(NAMES):
        data[name] = tmp_path / f"{name}.csv"
        with data[name].open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            picked = range(j, len(icd), 150)
            for i in picked:
                writer.writerow([icd.texts[i], icd.labels[i]])
        rows[name] = len(picked)
    expected = max(rows.values())  # no institution trains on more than its whole file
    pki = provision(tmp_path / "pki", ["localhost"], list(NAMES), port=port,
                    generate_keys=True, expected_examples=dict.fromkeys(NAMES, expected))
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(HOSTILE)
    (tmp_path / "dump").mkdir()
    return {"root": tmp_path, "port": port, "pki": pki, "data": data, "model": str(tiny_bert),
            "expected": expected}


def test_one_hostile_institution_of_five_cannot_steer_or_stop_a_median_run(site, tmp_path):
    kits, out = _kits(site, tmp_path, NAMES), tmp_path / "out"
    agreement = _agree(site, kits, tmp_path / "agreement.json", *FLAGS)
    server = _server(site, out, tmp_path / "server.log", *FLAGS, "--min-available", "5",
                     "--min-train", "5", "--agreement", str(agreement))
    clients = {n: _client(site, kits[n], n, tmp_path / f"{n}.log",
                          PYTHONPATH=str(tmp_path / "inject"),
                          FEDSILO_TEST_DUMP=str(tmp_path / "dump"), FEDSILO_TEST_NAME=n,
                          FEDSILO_TEST_EXPECTED=str(site["expected"]))
               for n in NAMES}
    try:
        code = server.wait(600)
    finally:
        for proc in clients.values():
            if proc.poll() is None:
                _kill(proc, signal.SIGTERM)
    assert code == 0, (tmp_path / "server.log").read_text()[-3000:]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["status"] == "completed"
    rounds = {r["round"]: r for r in doc["rounds"]}
    assert set(rounds[1]["institutions"]) == set(NAMES)  # the at-bound update passed
    for k in (2, 3):
        assert set(rounds[k]["institutions"]) == set(NAMES[:4])
        assert any(f.startswith("hospital-e: rejected") for f in rounds[k]["failures"])
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    rejected = {e["round"]: e["reason"] for e in journal if e["event"] == "rejected"}
    assert set(rejected) == {2, 3} and "NaN" in rejected[3]
    assert {e["institution"] for e in journal if e["event"] == "rejected"} == {"hospital-e"}
    clamped = [e for e in journal if e.get("claimed_examples") == 10**12]
    assert [(e["round"], e["institution"], e["weight"]) for e in clamped] == [
        (1, "hospital-e", site["expected"])]
    # the global model after round 1 is what every institution received in round 2
    dump = tmp_path / "dump"
    honest = [np.load(dump / f"{n}-1.npz") for n in NAMES[:4]]
    received = np.load(dump / "hospital-a-2.npz")
    for key in (k for k in received.files if k.startswith("received/")):
        released = "released/" + key.split("/", 1)[1]
        stack = np.stack([h[released] for h in honest])
        glob = received[key]
        assert np.all(glob >= stack.min(0) - 1e-6) and np.all(glob <= stack.max(0) + 1e-6)

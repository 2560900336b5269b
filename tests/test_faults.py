"""Fault injection on loopback: real flower-server and flower-client processes, TLS, DP.

- one of four institutions is killed mid-round, two reply NaN / oversized updates:
  the run completes with the honest two, naming the rest;
- the coordinator is killed after round 1 of 3: ``--resume`` finishes rounds 2–3 and
  every institution's ledger holds each round once;
- a run that claims an approved agreement but differs from it is declined by the
  institutions, naming the term.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedsilo.common.processes import BIN, child_env, free_port
from fedsilo.common.records import load_records
from fedsilo.server.provision import provision

pytestmark = pytest.mark.slow
NAMES = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")
HOSTILE = '''
import os
if os.environ.get("FEDSILO_TEST_HOSTILE"):
    import numpy as np
    from fedsilo.client import messages
    import time
    from pathlib import Path
    honest = messages.released_arrays
    def hostile(*args, **kwargs):
        out = honest(*args, **kwargs)
        mark = os.environ.get("FEDSILO_TEST_HANG_MARK")
        if mark and Path(mark + ".1").exists():  # second update: hang until killed
            Path(mark + ".2").touch()
            time.sleep(3600)
        if mark:
            Path(mark + ".1").touch()
        if os.environ["FEDSILO_TEST_HOSTILE"] == "nan":
            return {k: np.full_like(v, np.nan) for k, v in out.items()}
        return {k: v * 1e4 for k, v in out.items()}
    messages.released_arrays = hostile
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("faults")
    port = free_port()
    # The old flow (keys made here) keeps these kits self-contained; test_deployment
    # covers institution-held keys.
    pki = provision(root / "pki", ["localhost"], list(NAMES), port=port, generate_keys=True)
    icd = load_records("icd10")
    data = {}
    for j, name in enumerate(NAMES):
        data[name] = root / f"{name}.csv"
        with data[name].open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for i in range(j, len(icd), 120):
                writer.writerow([icd.texts[i], icd.labels[i]])
    (root / "hostile").mkdir()
    (root / "hostile" / "sitecustomize.py").write_text(HOSTILE)
    return {"root": root, "port": port, "pki": pki, "data": data, "model": str(tiny_bert)}


def _env(**extra: str) -> dict[str, str]:
    return child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)


def _server(site, out: Path, log: Path, *flags: str) -> subprocess.Popen:
    cmd = [str(BIN / "flower-server"), "--pki", str(site["root"] / "pki"), "--state-dir",
           str(out.parent / "state"), "--host", "127.0.0.1", "--port", str(site["port"]),
           "--model", site["model"], "--min-train", "2", "--batch-size", "32",
           "--output-dir", str(out), *flags]
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    _wait_for(log, "waiting for", proc, 120)  # keys registered: institutions may connect
    return proc


def _client(site, kit: Path, name: str, log: Path, **env: str) -> subprocess.Popen:
    cmd = [str(BIN / "flower-client"), "--config", str(kit / "client.toml"),
           "--data", str(site["data"][name])]
    with log.open("ab") as f:
        return subprocess.Popen(cmd, env=_env(**env), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _kits(site, tmp: Path, names) -> dict[str, Path]:
    kits = {}
    for name in names:
        kits[name] = tmp / "kits" / name
        shutil.copytree(site["pki"].kits[name], kits[name])
    return kits


def _agree(site, kits: dict[str, Path], out: Path, *flags: str) -> Path:
    """Issue the agreement for the run ``flags`` describe; every kit approves it."""
    issue = subprocess.run([str(BIN / "flower-server"), "agreement", "--name", "icd",
                            "--out", str(out), "--pki", str(site["root"] / "pki"),
                            "--model", site["model"], "--batch-size", "32", *flags],
                           env=_env(), capture_output=True, text=True)
    assert issue.returncode == 0, issue.stderr
    for kit in kits.values():
        done = subprocess.run([str(BIN / "flower-client"), "approve", str(out),
                               "--config", str(kit / "client.toml"), "--yes"], env=_env(),
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
    return out


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    for pid in _tree(proc.pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    proc.wait(30)


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}"
        assert time.monotonic() < deadline, f"no {text!r} in {path}"
        time.sleep(0.5)


def _tails(folder: Path, *names: str, chars: int = 4000) -> str:
    """The last ``chars`` of each process log ``folder/NAME.log``, for a failure message."""
    return "\n".join(f"--- {name}.log ---\n" + (folder / f"{name}.log").read_text(
        errors="replace")[-chars:] for name in names if (folder / f"{name}.log").exists())


def _entries(kit: Path) -> list[dict]:
    ledgers = list((kit / "ledger").glob("*.json"))
    assert len(ledgers) == 1
    return json.loads(ledgers[0].read_text())["entries"]


def test_dropped_and_hostile_institutions_do_not_stop_the_run(site, tmp_path):
    kits, out = _kits(site, tmp_path, NAMES), tmp_path / "out"
    agreement = _agree(site, kits, tmp_path / "agreement.json", "--num-rounds", "2")
    server = _server(site, out, tmp_path / "server.log", "--num-rounds", "2",
                     "--min-available", "4", "--straggler-timeout", "20",
                     "--agreement", str(agreement))
    hostile = {"hospital-c": "nan", "hospital-d": "huge"}
    mark = tmp_path / "hospital-d-round"
    clients = {n: _client(site, kits[n], n, tmp_path / f"{n}.log",
                          PYTHONPATH=str(site["root"] / "hostile"),
                          FEDSILO_TEST_HOSTILE=hostile.get(n, ""),
                          **({"FEDSILO_TEST_HANG_MARK": str(mark)} if n == "hospital-d" else {}))
               for n in NAMES}
    try:
        deadline = time.monotonic() + 600
        while not Path(f"{mark}.2").exists():  # hospital-d has trained round 2, not replied
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        _kill(clients["hospital-d"])  # dies mid-round 2
        code = server.wait(600)
    finally:  # a coordinator left running would hold the kits' port for the next test
        for proc in (server, *clients.values()):
            if proc.poll() is None:
                _kill(proc, signal.SIGTERM)
    assert code == 0, (tmp_path / "server.log").read_text()[-3000:]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["status"] == "completed"
    first, second = doc["rounds"][1], doc["rounds"][2]
    for entry in (first, second):
        assert set(entry["institutions"]) == {"hospital-a", "hospital-b"}
        assert any("hospital-c: rejected" in f and "NaN" in f for f in entry["failures"])
    assert any("hospital-d: rejected" in f for f in first["failures"])
    assert any("hospital-d" in d for d in second["dropped"]), second
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert {e["institution"] for e in journal if e["event"] == "rejected"} == \
        {"hospital-c", "hospital-d"}


def test_coordinator_killed_after_round_one_resumes_and_counts_each_round_once(site, tmp_path):
    kits, out = _kits(site, tmp_path, NAMES[:2]), tmp_path / "out"
    # SCAFFOLD: its controls and node map must survive the coordinator's death too.
    flags = ["--num-rounds", "3", "--min-available", "2", "--target-epsilon", "6",
             "--strategy", "scaffold", "--optimizer", "sgd", "--learning-rate", "0.5"]
    agreement = _agree(site, kits, tmp_path / "agreement.json", *flags)
    server = _server(site, out, tmp_path / "server.log", *flags, "--agreement", str(agreement))
    clients = [_client(site, kits[n], n, tmp_path / f"{n}.log") for n in kits]
    try:
        _wait_for(out / "run.log", "round 2/3: training", server, 600)
        _kill(server)  # the coordinator host dies
        assert json.loads((out / "metrics.json").read_text())["rounds"][-1]["round"] == 1
        resumed = _server(site, out, tmp_path / "resumed.log", "--resume")
        code = resumed.wait(600)
    except subprocess.TimeoutExpired:
        pytest.fail("the resumed run did not end:\n" + _tails(tmp_path, "resumed", *kits))
    finally:
        for proc in (*clients, *([resumed] if "resumed" in locals() else [])):
            if proc.poll() is None:
                _kill(proc, signal.SIGTERM)
    assert code == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["status"] == "completed" and doc["resumed_after"] == [1]
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2, 3]
    assert all(set(r["institutions"]) == set(kits) for r in doc["rounds"][1:])
    events = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    events = [e for e in events if e["event"] == "correction"]
    # The resumed coordinator's round-2 corrections (the last ones) still name each
    # institution: its node map came back from the checkpoint with the controls.
    resumed = [e for e in events if e["round"] == 2][-len(kits):]
    assert {e["institution"] for e in resumed} == set(kits)
    corrections = {(e["round"], e["institution"]): e["correction"]["sha256"] for e in events}
    for name, kit in kits.items():
        entries = _entries(kit)
        assert [e["round"] for e in entries] == [1, 2, 3]
        assert len({e["run"] for e in entries}) == 1  # one run across the resumption
        assert entries[-1]["epsilon"] <= 6.0
        journal = [json.loads(line) for line in (kit / "ledger" / "journal.jsonl").read_text(
            ).splitlines()]
        trained = {e["round"]: e["correction"] for e in journal if e["event"] == "train"}
        assert trained[1] is None  # c = 0 before any update
        for server_round in (2, 3):  # each institution applied the correction sent to it
            assert trained[server_round]["sha256"] == corrections[(server_round, name)]


def test_a_run_that_breaks_the_approved_agreement_is_declined_naming_the_term(site, tmp_path):
    kits, out = _kits(site, tmp_path, NAMES[:2]), tmp_path / "out"
    _agree(site, kits, tmp_path / "agreement.json", "--num-rounds", "1")
    ident = next((kits["hospital-a"] / "ledger" / "agreements").glob("*.json")).stem
    # A coordinator that names the agreement but asks for more ε than approved.
    server = _server(site, out, tmp_path / "server.log", "--num-rounds", "1",
                     "--min-available", "2", "--agreement-id", ident, "--target-epsilon", "20")
    clients = [_client(site, kits[n], n, tmp_path / f"{n}.log") for n in kits]
    try:
        code = server.wait(600)
    finally:
        for proc in (server, *clients):
            if proc.poll() is None:
                _kill(proc, signal.SIGTERM)
    assert code != 0
    doc = json.loads((out / "metrics.json").read_text())
    declined = doc["rounds"][1]["declined"]
    assert len(declined) == 2
    assert all("target-epsilon (approved 8.0, this run 20.0)" in d for d in declined)
    assert not list((kits["hospital-a"] / "ledger").glob("*.json"))  # nothing spent

"""A real deployment on loopback: provisioning, flower-server, two flower-clients.

TLS and institution authentication are on, DP is on, the model is a tiny BERT. The
negative cases run against the same coordinator while it waits for its institutions.
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

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from transformers import pipeline

from fedsilo.common.data import load_records
from fedsilo.common.processes import BIN, child_env, free_port
from fedsilo.server.provision import provision

pytestmark = pytest.mark.slow
# Several Flower processes share this machine's cores: keep each one single-threaded.
ENV = child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _client(kit: Path, data: Path, *extra: str) -> list[str]:
    return [str(BIN / "flower-client"), "--config", str(kit / "client.toml"), "--data", str(data),
            "--text-column", "description", "--label-column", "chapter", *extra]


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_bert):
    """Provision, then start the coordinator; yield its paths and process."""
    root = tmp_path_factory.mktemp("deployment")
    port = free_port()
    pki = provision(root / "pki", ["localhost"], ["hospital-a", "hospital-b"], port=port)
    icd = load_records("icd10")
    data = {}
    for j, name in enumerate(("hospital-a", "hospital-b")):
        data[name] = root / f"{name}.csv"
        with data[name].open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["description", "chapter"])
            for i in range(j, len(icd), 90):
                writer.writerow([icd.texts[i], icd.labels[i]])
    out = root / "out"
    server = _start([str(BIN / "flower-server"), "--pki", str(root / "pki"), "--state-dir",
                     str(root / "state"), "--host", "127.0.0.1", "--port", str(port),
                     "--model", str(tiny_bert), "--num-rounds", "2", "--min-available", "2",
                     "--min-train", "2", "--batch-size", "32", "--learning-rate", "0.01",
                     "--output-dir", str(out)], root / "server.log")
    deadline = time.monotonic() + 120
    while b"waiting for 2 institution" not in (root / "server.log").read_bytes():
        assert server.poll() is None, (root / "server.log").read_text()
        assert time.monotonic() < deadline, "coordinator did not start"
        time.sleep(1)
    yield {"root": root, "port": port, "pki": pki, "data": data, "out": out, "server": server}
    _stop(server)


def test_control_api_is_refused_from_non_loopback_while_fleet_answers(federation):
    url = f"https://127.0.0.1:{federation['port']}"
    transport = httpx.HTTPTransport(local_address="127.0.0.2",
                                    verify=str(federation["pki"].ca_cert))
    with httpx.Client(base_url=url, transport=transport, timeout=10) as client:
        control = client.post("/v1/control/list-runs", content=b"")
        runtime = client.post("/v1/runtime/get-run", content=b"")
        fleet = client.post("/v1/fleet/get-run", content=b"")
        health = client.get("/health")
    assert control.status_code == 403 and "Fleet API" in control.json()["detail"]
    assert runtime.status_code == 403
    assert fleet.status_code != 403 and fleet.status_code < 500  # Flower itself answered
    assert health.status_code == 200


def test_client_trusting_another_ca_cannot_connect(federation, tmp_path):
    other = provision(tmp_path / "other-pki", ["localhost"], ["hospital-a"])
    kit = tmp_path / "kit"
    shutil.copytree(federation["pki"].kits["hospital-a"], kit)
    shutil.copy(other.ca_cert, kit / "ca.pem")
    done = subprocess.run(_client(kit, federation["data"]["hospital-a"]), env=ENV, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 2
    assert "TLS check of localhost" in done.stderr
    assert "not signed by root-certificates" in done.stderr


def test_institution_not_on_the_allow_list_is_refused(federation, tmp_path):
    kit = tmp_path / "kit"
    shutil.copytree(federation["pki"].kits["hospital-a"], kit)
    key = ec.generate_private_key(ec.SECP384R1())
    (kit / "node.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    os.chmod(kit / "node.key", 0o600)
    done = subprocess.run(
        _client(kit, federation["data"]["hospital-a"], "--institution", "mallory",
                "--admission-wait", "5"), env=ENV, text=True, capture_output=True, timeout=180)
    assert "mallory: local checks passed" in done.stderr  # TLS and the key file are fine...
    assert done.returncode != 0, done.returncode  # ...but the coordinator does not admit it
    # It was refused, retried once (the coordinator may have been registering keys), and
    # gave up when --admission-wait had passed.
    assert done.stderr.count("is not admitted yet") == 1
    assert "not on the coordinator's allow-list" in done.stderr
    assert "SHA256:" in done.stderr


def test_client_with_broken_data_exits_before_joining(federation, tmp_path):
    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"description,chapter\n\xff\xfe not utf-8\n")
    done = subprocess.run(_client(federation["pki"].kits["hospital-b"], broken), env=ENV,
                          text=True, capture_output=True, timeout=120)
    assert done.returncode == 2
    assert "broken.csv" in done.stderr and "joining" not in done.stderr


def test_two_institutions_complete_a_private_federation(federation):
    root, server = federation["root"], federation["server"]
    clients = [_start(_client(federation["pki"].kits[name], federation["data"][name]),
                      root / f"{name}.log") for name in ("hospital-a", "hospital-b")]
    try:
        code = server.wait(600)
    finally:
        for proc in clients:
            _stop(proc)
    log = (root / "server.log").read_text()
    assert code == 0, log[-4000:]
    metrics = json.loads((federation["out"] / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    last = metrics["rounds"][-1]
    assert set(last["institutions"]) == {"hospital-a", "hospital-b"}
    for inst in last["institutions"].values():
        assert 0 < inst["epsilon"] <= 8.0
    classify = pipeline("text-classification", model=str(federation["out"] / "model"),
                        device="cpu")
    assert classify("Acute appendicitis")[0]["label"] in metrics["labels"]
    assert "round 2/2" in log
    # Fused evaluation: round 1's model was evaluated inside round 2's train message,
    # the last model by an evaluate message; both are in the report.
    assert all(r["federated_eval"]["num_examples"] > 0 for r in metrics["rounds"][1:])
    assert "round 1/2 | fed-eval acc" in log
    for name in ("hospital-a", "hospital-b"):  # every message ran in the warm worker
        client_log = (root / f"{name}.log").read_text()
        assert "warm worker ready" in client_log and "in this process" not in client_log
        events = [json.loads(line) for line in (federation["pki"].kits[name] / "ledger" /
                                                "journal.jsonl").read_text().splitlines()]
        assert [(e["event"], e["round"]) for e in events if "evaluate" in e["event"]] == [
            ("evaluate-received", 2), ("evaluate", 2)]

"""A real deployment on loopback: keys, provisioning, agreement, flower-server, two clients.

Each institution makes its own node key (``flower-client keygen``) and sends only
``node.pub``; the coordinator provisions with ``--public-key`` and sends back
``ca.pem`` and ``client.toml`` (pinning the CA's fingerprint); it issues an agreement
that both institutions approve, and runs under it. TLS and institution
authentication are on, DP is on, the model is a tiny BERT. The negative cases run
against the same coordinator while it waits for its institutions.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from transformers import pipeline

from fedsilo.client import cli as client_cli
from fedsilo.common.agreement import agreement_id
from fedsilo.common.processes import BIN, child_env, free_port
from fedsilo.common.records import load_records
from fedsilo.server import cli as server_cli
from fedsilo.server.provision import provision

pytestmark = pytest.mark.slow
# Several Flower processes share this machine's cores: keep each one single-threaded.
ENV = child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
NAMES = ("hospital-a", "hospital-b")


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


def _client(site: Path, data: Path, *extra: str) -> list[str]:
    return [str(BIN / "flower-client"), "--config", str(site / "client.toml"), "--data",
            str(data), "--text-column", "description", "--label-column", "chapter", *extra]


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_bert):
    """Keys, provisioning and an approved agreement; then the coordinator, started."""
    root = tmp_path_factory.mktemp("deployment")
    port, pki = free_port(), root / "pki"
    sites = {name: root / name for name in NAMES}
    for name, site in sites.items():  # each institution, in its own folder
        assert client_cli.main(["keygen", "--dir", str(site), "--institution", name]) == 0
    keys = [arg for name in NAMES for arg in ("--institution", name, "--public-key",
                                              str(sites[name] / "node.pub"))]
    assert server_cli.main(["provision", "--out", str(pki), "--host", "localhost", "--port",
                            str(port), *keys]) == 0
    for name, site in sites.items():  # the kit travels back: the CA and client.toml only
        for file in (pki / "kits" / name).iterdir():
            shutil.copy(file, site / file.name)
        toml = site / "client.toml"  # opts in to noised local evaluation (docs/privacy.md)
        toml.write_text(toml.read_text().replace("[deidentify]",
                                                 "release-evaluation = true\n\n[deidentify]", 1))
    run_flags = ["--model", str(tiny_bert), "--num-rounds", "2", "--batch-size", "32",
                 "--learning-rate", "0.01"]
    agreement = root / "agreement.json"
    assert server_cli.main(["agreement", "--pki", str(pki), "--name", "icd-chapters",
                            "--out", str(agreement), *run_flags]) == 0
    for site in sites.values():  # each privacy officer approves it (no terminal: --yes)
        assert client_cli.main(["approve", str(agreement), "--config",
                                str(site / "client.toml"), "--yes"]) == 0
    icd = load_records("icd10")
    data = {}
    for j, name in enumerate(NAMES):
        data[name] = root / f"{name}.csv"
        with data[name].open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["description", "chapter"])
            for i in range(j, len(icd), 90):
                writer.writerow([icd.texts[i], icd.labels[i]])
    out = root / "out"
    server = _start([str(BIN / "flower-server"), "--pki", str(pki), "--state-dir",
                     str(root / "state"), "--host", "127.0.0.1", "--port", str(port),
                     "--agreement", str(agreement), *run_flags, "--min-available", "2",
                     "--min-train", "2", "--output-dir", str(out)], root / "server.log")
    deadline = time.monotonic() + 120
    while b"waiting for 2 institution" not in (root / "server.log").read_bytes():
        assert server.poll() is None, (root / "server.log").read_text()
        assert time.monotonic() < deadline, "coordinator did not start"
        time.sleep(1)
    yield {"root": root, "port": port, "pki": pki, "sites": sites, "data": data, "out": out,
           "server": server, "agreement": agreement}
    _stop(server)


def test_control_api_is_refused_from_non_loopback_while_fleet_answers(federation):
    url = f"https://127.0.0.1:{federation['port']}"
    transport = httpx.HTTPTransport(local_address="127.0.0.2",
                                    verify=str(federation["pki"] / "ca" / "ca.pem"))
    with httpx.Client(base_url=url, transport=transport, timeout=10) as client:
        control = client.post("/v1/control/list-runs", content=b"")
        runtime = client.post("/v1/runtime/get-run", content=b"")
        fleet = client.post("/v1/fleet/get-run", content=b"")
        health = client.get("/health")
    assert control.status_code == 403 and "Fleet API" in control.json()["detail"]
    assert runtime.status_code == 403
    assert fleet.status_code != 403 and fleet.status_code < 500  # Flower itself answered
    assert health.status_code == 200


def _site_copy(federation, name: str, tmp_path: Path) -> Path:
    site = tmp_path / name
    shutil.copytree(federation["sites"][name], site, ignore=shutil.ignore_patterns("ledger"))
    return site


def test_client_trusting_another_ca_cannot_connect(federation, tmp_path):
    other = provision(tmp_path / "other-pki", ["localhost"], [])
    site = _site_copy(federation, "hospital-a", tmp_path)
    shutil.copy(other.ca_cert, site / "ca.pem")
    # Without the kit's CA pin (an older kit), the TLS check against the coordinator is
    # what refuses; with it, the pin refuses first (tests/test_hostile_coordinator).
    toml = site / "client.toml"
    toml.write_text("".join(line for line in toml.read_text().splitlines(keepends=True)
                            if not line.startswith("ca-sha256")))
    done = subprocess.run(_client(site, federation["data"]["hospital-a"]), env=ENV, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 2
    assert "TLS check of localhost" in done.stderr
    assert "not signed by root-certificates" in done.stderr


def test_institution_not_on_the_allow_list_is_refused(federation, tmp_path):
    site = _site_copy(federation, "hospital-a", tmp_path)
    for key in ("node.key", "node.pub"):  # a key the coordinator never registered
        (site / key).unlink()
    assert client_cli.main(["keygen", "--dir", str(site), "--institution", "mallory"]) == 0
    done = subprocess.run(
        _client(site, federation["data"]["hospital-a"], "--institution", "mallory",
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
    done = subprocess.run(_client(federation["sites"]["hospital-b"], broken), env=ENV,
                          text=True, capture_output=True, timeout=120)
    assert done.returncode == 2
    assert "broken.csv" in done.stderr and "joining" not in done.stderr


def test_two_institutions_complete_a_private_federation(federation):
    root, server = federation["root"], federation["server"]
    clients = [_start(_client(federation["sites"][name], federation["data"][name]),
                      root / f"{name}.log") for name in NAMES]
    try:
        code = server.wait(600)
    finally:
        for proc in clients:
            _stop(proc)
    log = (root / "server.log").read_text()
    assert code == 0, log[-4000:]
    metrics = json.loads((federation["out"] / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    agreed = json.loads(federation["agreement"].read_text())
    assert metrics["config"]["agreement-id"] == agreement_id(agreed)  # ran under it
    assert "running under agreement" in log
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
    for name in NAMES:  # every message ran in the one fedsilo runtime, none was refused
        client_log = (root / f"{name}.log").read_text()
        assert client_log.count("fedsilo runtime serving") == 1
        assert "refused the app bundle" not in client_log
        events = [json.loads(line) for line in (federation["sites"][name] / "ledger" /
                                                "journal.jsonl").read_text().splitlines()]
        assert [(e["event"], e["round"]) for e in events if "evaluate" in e["event"]] == [
            ("evaluate-received", 2), ("evaluate", 2)]

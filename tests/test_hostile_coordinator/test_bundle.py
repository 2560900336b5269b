"""A hostile coordinator ships its own app bundle: nothing of it runs at the institution.

A real SuperLink, and hospital-a's node started by ``flower-client`` (its SuperNode and
fedsilo's runtime) with an approved agreement in force. The coordinator submits a
bundle built with ``flwr build`` whose ClientApp writes a marker file when it is
imported (and would read the node config, with the data path, when run): once naming a
module of its own, once shipping its own ``fedsilo/`` package under the real component
name. The institution runs neither: no marker appears, the coordinator gets a declined
error reply with a generic reason, and the institution's journal records the refusal.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from fedsilo.client import cli as client_cli
from fedsilo.common.processes import BIN, child_env, free_port
from fedsilo.common.wire import DECLINED_CODE
from fedsilo.server import cli as server_cli
from fedsilo.server.launch import SuperLink

pytestmark = pytest.mark.slow

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "fedsilo-run"
version = "0.1.0"
description = "Thin Flower app: the code is the installed fedsilo package"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedsilo"

[tool.flwr.app.components]
serverapp = "hostile_server:app"
clientapp = "{clientapp}"
"""

# Asks every node to train once and writes what came back (error code and reason).
_SERVER = """\
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 120
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict({{"config": ConfigRecord({{"server-round": 1}})}}),
                        dst_node_id=node, message_type="train") for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=300))
    Path({result!r}).write_text(json.dumps([
        {{"code": r.error.code, "reason": r.error.reason}} if r.has_error() else
        {{"code": None, "reason": None}} for r in replies]))
"""

# Runs on import: what a bundle's own code would do first.
_CLIENT = """\
from pathlib import Path
Path({marker!r}).write_text("the coordinator's code ran at the institution")
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.train()
def train(msg: Message, context: Context) -> Message:
    Path({marker!r}).write_text(repr(dict(context.node_config)))  # the data path
    return Message(RecordDict(), reply_to=msg)
"""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def node(tmp_path_factory, tiny_bert):
    """hospital-a approved an agreement and runs its node against the coordinator's SuperLink."""
    root = tmp_path_factory.mktemp("hostile-bundle")
    site, pki = root / "hospital-a", root / "pki"
    assert client_cli.main(["keygen", "--dir", str(site), "--institution", "hospital-a"]) == 0
    assert server_cli.main(["provision", "--out", str(pki), "--host", "localhost",
                            "--institution", "hospital-a", "--public-key",
                            str(site / "node.pub")]) == 0
    for file in (pki / "kits" / "hospital-a").iterdir():
        shutil.copy(file, site / file.name)
    agreement = root / "agreement.json"
    assert server_cli.main(["agreement", "--pki", str(pki), "--name", "icd", "--out",
                            str(agreement), "--model", str(tiny_bert), "--labels",
                            '["a", "b"]']) == 0
    assert client_cli.main(["approve", str(agreement), "--config", str(site / "client.toml"),
                            "--yes"]) == 0
    data = root / "notes.csv"
    with data.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["text", "label"], *([f"note {i}", "ab"[i % 2]]
                                                      for i in range(40))])
    link = SuperLink(root / "link", ["--insecure"])
    link.start()
    env = child_env(FLWR_HOME=str(root / "flwr-home"), OMP_NUM_THREADS="1")
    log, runtime_port = root / "client.log", free_port()
    with log.open("wb") as out:
        client = subprocess.Popen(
            [str(BIN / "flower-client"), "--config", str(site / "client.toml"), "--insecure",
             "--superlink", f"127.0.0.1:{link.port}", "--data", str(data), "--model",
             str(tiny_bert), "--runtime-port", str(runtime_port)], env=env, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield {"root": root, "site": site, "link": link, "client": client, "log": log,
               "runtime_port": runtime_port}
    finally:
        _stop(client)
        link.stop()


def _hostile_run(node, tmp_path: Path, clientapp: str, files: dict[str, str]) -> tuple[
    list[dict], Path, str
]:
    """Build the bundle with ``flwr build``, submit it; return the replies, marker, FAB hash."""
    app, marker, result = tmp_path / "app", tmp_path / "marker", tmp_path / "replies.json"
    app.mkdir()
    (app / "pyproject.toml").write_text(_PYPROJECT.format(clientapp=clientapp))
    (app / "hostile_server.py").write_text(_SERVER.format(result=str(result)))
    for name, text in files.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text.format(marker=str(marker)))
    built = subprocess.run([str(BIN / "flwr"), "build", "--app", str(app)], cwd=tmp_path,
                           capture_output=True, text=True, env=node["link"].env)
    assert built.returncode == 0, built.stdout + built.stderr
    (fab,) = tmp_path.glob("*.fab")
    node["link"].submit(app)  # `flwr run` bundles the folder the same way
    deadline = time.monotonic() + 400
    while not result.exists():
        assert node["client"].poll() is None, node["log"].read_text()[-4000:]
        assert time.monotonic() < deadline, node["log"].read_text()[-4000:]
        time.sleep(1)
    return json.loads(result.read_text()), marker, hashlib.sha256(fab.read_bytes()).hexdigest()


def _refusals(site: Path) -> list[dict]:
    path = site / "ledger" / "journal.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [e for e in events if e["event"] == "bundle-refused"]


def _check_refused(node, replies: list[dict], marker: Path, fab_sha256: str) -> None:
    assert not marker.exists(), marker.read_text()  # nothing of the bundle ran
    assert replies == [{"code": DECLINED_CODE, "reason": replies[0]["reason"]}]
    reason = replies[0]["reason"]
    assert reason.startswith("declined:") and "note" not in reason and "/" not in reason
    refused = _refusals(node["site"])
    assert refused and refused[-1]["fab_sha256"] == fab_sha256  # the very bundle built


def test_a_bundle_with_its_own_clientapp_module_is_refused_and_never_imported(node, tmp_path):
    replies, marker, fab = _hostile_run(node, tmp_path, "hostile_client:app",
                                        {"hostile_client.py": _CLIENT})
    _check_refused(node, replies, marker, fab)
    assert "refused the app bundle" in node["log"].read_text()


def test_a_bundle_shipping_its_own_fedsilo_package_is_refused(node, tmp_path):
    replies, marker, fab = _hostile_run(node, tmp_path, "fedsilo.client.client_app:app", {
        "fedsilo/__init__.py": "", "fedsilo/client/__init__.py": "",
        "fedsilo/client/client_app.py": _CLIENT,
        "opacus/__init__.py": _CLIENT})
    _check_refused(node, replies, marker, fab)


def test_no_other_local_process_can_take_the_nodes_tasks(node):
    """The SuperNode hands tasks only to the holder of flower-client's private secret."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=f"127.0.0.1:{node['runtime_port']}", insecure=True,
        root_certificates=None, interceptors=[])
    try:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
    finally:
        client.close()
    assert refused.value.response.status_code in (401, 403)

"""The runtime's bundle check and what a long-lived process needs (warm caches, polling)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support import closed_port

from fedsilo.client import prepared
from fedsilo.client.runtime_bundle import (
    BundleError,
    Origin,
    approved,
    bundle_sha256,
    current_origin,
    serving,
)
from fedsilo.client.runtime_launch import make_secret, remove_secret, run_supernode
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.deidentify import DeidSettings
from fedsilo.common.integrity import app_sha256
from fedsilo.common.processes import BIN, child_env, free_port
from fedsilo.server.launch import write_thin_app


def _app(folder: Path, **files: str) -> Path:
    cfg = FedsiloConfig.from_flat({"labels": '["a", "b"]'})
    write_thin_app(folder, cfg)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def _fab(folder: Path, out: Path) -> bytes:
    out.mkdir()
    done = subprocess.run([str(BIN / "flwr"), "build", "--app", str(folder)], cwd=out,
                          capture_output=True, text=True, env=child_env())
    assert done.returncode == 0, done.stdout + done.stderr
    (fab,) = out.glob("*.fab")
    return fab.read_bytes()


def test_the_runtime_hashes_a_built_bundle_as_the_agreement_does(tmp_path):
    folder = _app(tmp_path / "app")
    assert bundle_sha256(_fab(folder, tmp_path / "out")) == app_sha256(folder)
    other = _app(tmp_path / "other", **{"hostile_client.py": "print('hi')\n"})
    assert bundle_sha256(_fab(other, tmp_path / "out2")) != app_sha256(folder)


def test_an_unreadable_or_escaping_bundle_is_refused_without_extracting(tmp_path):
    with pytest.raises(BundleError, match="not a readable app bundle"):
        bundle_sha256(b"not a zip")
    escaping = io.BytesIO()
    with zipfile.ZipFile(escaping, "w") as archive:
        archive.writestr("pyproject.toml", "[project]\n")
        archive.writestr("../../escaped.py", "x = 1\n")
    with pytest.raises(BundleError, match="leaves its folder"):
        bundle_sha256(escaping.getvalue())
    assert approved(escaping.getvalue(), tmp_path / "ledger")[0] is False


def test_outside_the_runtime_a_deployed_institution_sees_no_checked_bundle():
    origin = current_origin()
    assert origin.app_sha256 is None  # check_run then declines: "not from an app bundle"
    with serving(Origin(0.5, "f" * 64)):
        assert current_origin() == Origin(0.5, "f" * 64)
    assert current_origin().app_sha256 is None


def test_the_node_stops_with_a_clear_error_when_the_runtime_dies(tmp_path, logs):
    settings = {"institution": "h", "superlink": f"127.0.0.1:{closed_port()}", "data": "d.csv",
                "insecure": True, "ledger-dir": str(tmp_path / "ledger")}
    secret = make_secret()
    assert secret.stat().st_mode & 0o777 == 0o600 and secret.parent.stat().st_mode & 0o777 == 0o700
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    try:
        code, refused = run_supernode(settings, free_port(), secret, dead)
    finally:
        remove_secret(secret)
    assert (code, refused) == (3, False) and not secret.parent.exists()
    assert "fedsilo's runtime stopped (exit 1)" in logs.text


def test_a_changed_data_file_is_reloaded_by_a_long_lived_process(tmp_path):
    data = tmp_path / "notes.csv"
    data.write_text("text,label\n" + "".join(f"note {i},{'ab'[i % 2]}\n" for i in range(20)))
    cfg = FedsiloConfig.from_flat({"data": str(data), "labels": '["a", "b"]',
                                   "output-dir": str(tmp_path / "out")})
    first = prepared.prepared_data(cfg, None, "a", tmp_path / "cache", prepared.stamp(str(data)),
                            DeidSettings())
    data.write_text("text,label\n" + "".join(f"memo {i},{'ab'[i % 2]}\n" for i in range(20)))
    os.utime(data, ns=(1, 1))  # a different stamp even within the clock's resolution
    second = prepared.prepared_data(cfg, None, "a", tmp_path / "cache", prepared.stamp(str(data)),
                            DeidSettings())
    assert first[3] != second[3]  # the dataset fingerprint follows the file


def test_flower_processes_poll_for_tasks_every_tenth_of_a_second_unless_told(monkeypatch):
    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    assert child_env()["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.1"
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "2")
    assert child_env()["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "2"  # the user's value wins

"""The federation agreement: issued signed, approved once, enforced term by term.

The attacks on it (a CA-signed, expired or superseded agreement, a run that differs in
a pinned setting, a deleted approval) are in tests/test_hostile_coordinator/.
"""

import base64
import datetime as dt
import json
import os
import shutil

import pytest

from fedsilo.client import agreements
from fedsilo.client import cli as client_cli
from fedsilo.client.keys import keygen
from fedsilo.client.policy import PolicyError
from fedsilo.common.agreement import (
    COORDINATOR_ONLY_KEYS,
    SCHEMA,
    agreement_id,
    differences,
    run_terms,
)
from fedsilo.common.config import KEYS, FedsiloConfig
from fedsilo.common.integrity import app_sha256
from fedsilo.common.task import freeze_labels
from fedsilo.server import cli as server_cli
from fedsilo.server.agreements import write_agreement
from fedsilo.server.launch import write_thin_app
from fedsilo.server.provision import provision


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    key = keygen(root / "site", "hospital-a")
    return provision(root / "pki", ["localhost"], ["hospital-a"],
                     public_keys={"hospital-a": key.public})


@pytest.fixture
def cfg(tiny_bert, tmp_path):
    return freeze_labels(FedsiloConfig.from_flat({
        "model": str(tiny_bert), "num-rounds": 2, "target-epsilon": 4.0,
        "output-dir": str(tmp_path / "out")}))


def _files(pki):
    return {"ca": pki.ca_cert, "cert": pki.server_cert, "key": pki.server_key}


@pytest.fixture
def issued(cfg, pki, tmp_path):
    path = tmp_path / "agreement.json"
    ident = write_agreement(cfg, "icd-chapters", _files(pki), path)
    return path, ident


@pytest.fixture
def kit(pki, tmp_path):
    folder = tmp_path / "kit"
    shutil.copytree(pki.kits["hospital-a"], folder)
    return folder


def _approve(path, kit, *extra):
    return client_cli.main(["approve", str(path), "--config", str(kit / "client.toml"), *extra])


def test_approve_stores_a_verified_agreement_and_asks_without_yes(issued, kit, monkeypatch):
    path, ident = issued
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert _approve(path, kit) == 2  # no terminal, no --yes: nothing stored
    assert not (kit / "ledger" / "agreements").exists()
    assert _approve(path, kit, "--yes") == 0
    assert set(agreements.load_approvals(kit / "ledger").current) == {ident}
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda q: "n")
    other = path.with_name("again.json")
    other.write_text(path.read_text())
    assert _approve(other, kit) == 2  # declined at the prompt: still only the first


def test_altered_or_foreign_agreements_are_refused(issued, kit, tmp_path, cfg, caplog):
    path, _ = issued
    doc = json.loads(path.read_text())
    doc["terms"]["target-epsilon"] = 50.0
    altered = tmp_path / "altered.json"
    altered.write_text(json.dumps(doc))
    assert _approve(altered, kit, "--yes") == 2
    foreign = provision(tmp_path / "other-pki", ["localhost"], [])
    forged = tmp_path / "forged.json"
    write_agreement(cfg, "icd-chapters", _files(foreign), forged)
    assert _approve(forged, kit, "--yes") == 2
    assert not (kit / "ledger" / "agreements").exists()
    text = caplog.text
    assert "changed after the coordinator signed it" in text
    assert "not issued by the federation CA" in text


def test_stricter_privacy_is_allowed_anything_else_is_named():
    approved = {"target-epsilon": 4.0, "target-delta": 0.0, "num-rounds": 2, "labels": ["a"]}
    assert differences(approved, {**approved, "target-epsilon": 2.0}) == []
    diffs = differences(approved, {**approved, "target-epsilon": 8.0, "num-rounds": 3,
                                   "target-delta": 1e-3})
    assert [d.split(" ")[0] for d in diffs] == ["num-rounds", "target-delta", "target-epsilon"]
    assert "target-epsilon (approved 4.0, this run 8.0)" in diffs


def test_institution_runs_only_what_it_approved(issued, kit, cfg, tmp_path):
    path, ident = issued
    ledger = kit / "ledger"
    # Nothing approved yet: a deployed institution runs nothing (it used to run anything).
    with pytest.raises(PolicyError, match="approved no federation agreement"):
        agreements.check_run(cfg, ledger, None)
    assert _approve(path, kit, "--yes") == 0
    bundle = write_thin_app(tmp_path / "bundle", cfg)  # the bundle Flower would install
    with pytest.raises(PolicyError, match="app-sha256.*not from an app bundle"):
        agreements.check_run(cfg.replace(agreement_id=ident), ledger, None)
    agreements.check_run(cfg.replace(agreement_id=ident), ledger, app_sha256(bundle))
    agreements.check_run(cfg.replace(agreement_id=ident, target_epsilon=1.0), ledger,
                         app_sha256(bundle))
    # Institution-owned and coordinator-only settings are not terms.
    agreements.check_run(cfg.replace(agreement_id=ident, test_fraction=0.3, max_examples=9,
                                     min_available=7, min_train=7, device="cpu",
                                     output_dir="elsewhere"), ledger, app_sha256(bundle))
    with pytest.raises(PolicyError, match="has not approved"):
        agreements.check_run(cfg, ledger, app_sha256(bundle))
    with pytest.raises(PolicyError, match=r"num-rounds \(approved 2, this run 5\)"):
        agreements.check_run(cfg.replace(agreement_id=ident, num_rounds=5), ledger,
                             app_sha256(bundle))
    (bundle / "evil.py").write_text("print('exfiltrate')\n")  # a modified app bundle
    with pytest.raises(PolicyError, match="app-sha256"):
        agreements.check_run(cfg.replace(agreement_id=ident), ledger, app_sha256(bundle))
    (bundle / "evil.py").unlink()
    toml = bundle / "pyproject.toml"
    toml.write_text(toml.read_text().replace("fedsilo.client.client_app:app", "evil:app"))
    with pytest.raises(PolicyError, match="app-sha256"):
        agreements.check_run(cfg.replace(agreement_id=ident), ledger, app_sha256(bundle))


def test_coordinator_refuses_to_start_a_run_that_breaks_its_agreement(issued, pki, cfg, caplog):
    path, ident = issued
    code = server_cli.main(["--pki", str(pki.ca_cert.parents[1]), "--agreement", str(path),
                            "--model", cfg.model.model, "--num-rounds", "3",
                            "--target-epsilon", "4"])
    assert code == 2
    assert "--agreement" in caplog.text and "num-rounds (approved 2, this run 3)" in caplog.text
    assert agreement_id(json.loads(path.read_text())) == ident


def test_a_model_file_changed_between_rounds_is_noticed(tiny_bert, pki, kit, tmp_path):
    """The worker reuses file digests only while a file is untouched (size, mtime, ctime)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    cfg = freeze_labels(FedsiloConfig.from_flat({
        "model": str(model), "num-rounds": 2, "output-dir": str(tmp_path / "out")}))
    path = tmp_path / "agreement.json"
    run = cfg.replace(agreement_id=write_agreement(cfg, "icd-chapters", _files(pki), path))
    assert _approve(path, kit, "--yes") == 0
    bundle = app_sha256(write_thin_app(tmp_path / "bundle", cfg))
    agreements.check_run(run, kit / "ledger", bundle)
    agreements.check_run(run, kit / "ledger", bundle)  # unchanged files: accepted again
    config = model / "config.json"
    before, text = config.stat(), config.read_bytes()
    assert b'"gelu"' in text
    config.write_bytes(text.replace(b'"gelu"', b'"relu"'))  # same size, other bytes
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime
    assert config.stat().st_size == before.st_size
    with pytest.raises(PolicyError, match="model-sha256"):
        agreements.check_run(run, kit / "ledger", bundle)


def test_terms_are_the_run_config_minus_the_coordinator_only_keys(cfg):
    assert set(COORDINATOR_ONLY_KEYS) <= set(KEYS)  # no stale name in the tuple
    terms = run_terms(cfg, ["a", "b"], model_sha256="m", app_sha256="a", code_sha256="c")
    added = {"labels", "model-sha256", "app-sha256", "code-sha256", "fedsilo-version"}
    assert set(terms) == set(KEYS) - set(COORDINATOR_ONLY_KEYS) | added
    # The settings issue 25 found unpinned are terms now.
    assert {"seed", "local-epochs", "batch-size", "learning-rate", "evaluate-every",
            "keep-updates", "max-length"} <= set(terms)
    assert terms["labels"] == ["a", "b"]


def test_the_id_covers_exactly_the_signed_content(issued):
    path, ident = issued
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA and ident == agreement_id(doc)
    # The same signed content with another encoding of the signature: the same id...
    again = {**doc, "signature": base64.b64encode(b"x" + base64.b64decode(doc["signature"])
                                                  ).decode()}
    assert agreement_id(again) == ident
    # ...and any change to a signed field, even an unpinned-looking one, another id.
    for field, value in (("issued", "2020-01-01T00:00:00+00:00"), ("federation", "other"),
                         ("expires", "2099-01-01T00:00:00+00:00")):
        assert agreement_id({**doc, field: value}) != ident


def test_check_shows_what_is_approved(issued, kit, logs):
    path, ident = issued
    assert agreements.summary(kit / "ledger")[0].startswith("no federation agreement approved")
    assert _approve(path, kit, "--yes") == 0
    (line,) = agreements.summary(kit / "ledger")
    assert line.startswith(f"agreement {ident} for federation 'icd-chapters'")
    assert line.endswith("in force")


def test_old_schema_agreements_are_refused_with_a_request_to_re_approve(issued, kit, cfg,
                                                                        tmp_path, logs):
    path, _ = issued
    old = {k: v for k, v in json.loads(path.read_text()).items() if k != "expires"}
    old["schema"] = "fedsilo.agreement/1"
    (tmp_path / "v1.json").write_text(json.dumps(old))
    assert _approve(tmp_path / "v1.json", kit, "--yes") == 2
    assert "old schema 'fedsilo.agreement/1'" in logs.text
    # One an earlier fedsilo stored (the document itself, named by its v1 id).
    folder = kit / "ledger" / "agreements"
    folder.mkdir(parents=True)
    (folder / "0123456789abcdef.json").write_text(json.dumps(old))
    with pytest.raises(PolicyError, match="old schema.*flower-client approve"):
        agreements.check_run(cfg.replace(agreement_id="0123456789abcdef"), kit / "ledger",
                             None)
    assert "old schema" in agreements.summary(kit / "ledger")[0]


def test_agreements_expire_when_the_coordinator_says(cfg, pki, tmp_path):
    path = tmp_path / "a.json"
    write_agreement(cfg, "icd", _files(pki), path)  # the default validity
    doc = json.loads(path.read_text())
    days = (dt.datetime.fromisoformat(doc["expires"])
            - dt.datetime.fromisoformat(doc["issued"])).days
    assert days == 90
    write_agreement(cfg, "icd", _files(pki), path, valid_days=7)
    doc = json.loads(path.read_text())
    assert (dt.datetime.fromisoformat(doc["expires"])
            - dt.datetime.fromisoformat(doc["issued"])).days == 7
    # Never beyond the server certificate that vouches for it.
    with pytest.raises(ValueError, match="--valid-days 500: the server certificate"):
        write_agreement(cfg, "icd", _files(pki), path, valid_days=500)

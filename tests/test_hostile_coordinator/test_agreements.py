"""A hostile coordinator against the institution's keys and agreements (issue 25).

The coordinator holds the CA key, issues the agreements and chooses each run's
settings. It must not hold an institution's private key, get an agreement approved
or honoured that its server certificate did not sign, that has expired or that a
newer approval replaced, run with any pinned setting changed, switch enforcement off
by making the approvals disappear, or make an institution trust another CA.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsilo.client import agreements
from fedsilo.client import cli as client_cli
from fedsilo.client.policy import PolicyError
from fedsilo.common.agreement import agreement_id
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.integrity import app_sha256
from fedsilo.common.task import freeze_labels
from fedsilo.server import cli as server_cli
from fedsilo.server.launch import write_thin_app

LABELS = '["cardio", "resp"]'


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """hospital-a made its key; the coordinator provisioned it and sent ca.pem + client.toml."""
    root = tmp_path_factory.mktemp("hostile-agreements")
    site, pki = root / "hospital-a", root / "pki"
    assert client_cli.main(["keygen", "--dir", str(site), "--institution", "hospital-a"]) == 0
    assert server_cli.main(["provision", "--out", str(pki), "--host", "localhost",
                            "--institution", "hospital-a", "--public-key",
                            str(site / "node.pub")]) == 0
    for name in ("ca.pem", "client.toml"):
        shutil.copy(pki / "kits" / "hospital-a" / name, site / name)
    return {"root": root, "site": site, "pki": pki}


@pytest.fixture
def site(federation: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh copy of hospital-a's folder (no approvals yet)."""
    folder = tmp_path / "hospital-a"
    shutil.copytree(federation["site"], folder)
    return folder


@pytest.fixture
def cfg(tiny_bert: Path, tmp_path: Path) -> FedsiloConfig:
    return freeze_labels(FedsiloConfig.from_flat({
        "model": str(tiny_bert), "labels": LABELS, "num-rounds": 2, "target-epsilon": 4.0,
        "batch-size": 32, "output-dir": str(tmp_path / "out")}))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> str:
    """Hash of the app bundle the coordinator's runs ship (the same for every run)."""
    cfg = FedsiloConfig.from_flat({"model": str(tiny_bert)})
    return app_sha256(write_thin_app(tmp_path_factory.mktemp("bundle"), cfg))


def _issue(federation: dict[str, Path], cfg: FedsiloConfig, out: Path, *extra: str,
           name: str = "icd") -> dict:
    """``flower-server agreement`` for the run ``cfg`` (its pinned flags)."""
    flat = cfg.to_flat()
    flags = [f"--{k}={flat[k]}" for k in ("model", "labels", "num-rounds", "target-epsilon",
                                          "batch-size")]
    assert server_cli.main(["agreement", "--pki", str(federation["pki"]), "--name", name,
                            "--out", str(out), *flags, *extra]) == 0
    return json.loads(out.read_text())


def _approve(site: Path, path: Path) -> int:
    return client_cli.main(["approve", str(path), "--config", str(site / "client.toml"),
                            "--yes"])


def _resign(doc: dict, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate | None = None,
            **changes: str) -> dict:
    """``doc`` with ``changes`` (and signer ``cert``), signed with ``key`` as fedsilo signs."""
    body = {k: v for k, v in doc.items() if k != "signature"} | changes
    if cert is not None:
        body["certificate"] = cert.public_bytes(serialization.Encoding.PEM).decode()
    text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return {**body, "signature": base64.b64encode(
        key.sign(text, ec.ECDSA(hashes.SHA256()))).decode()}


def _key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


def _approvals(site: Path) -> set[str]:
    return set(agreements.load_approvals(site / "ledger").current)


# ----------------------------------------------------------------------------- keys
def test_no_private_key_leaves_the_institution(federation: dict[str, Path]) -> None:
    node_key = federation["site"] / "node.key"
    secret = serialization.load_ssh_private_key(node_key.read_bytes(), None)
    assert isinstance(secret, ec.EllipticCurvePrivateKey)
    scalar = secret.private_numbers().private_value.to_bytes(48, "big")
    pki = federation["pki"]
    private_keys = set()
    for path in (p for p in pki.rglob("*") if p.is_file()):  # everything provisioning wrote
        data = path.read_bytes()
        assert node_key.read_bytes() not in data and scalar not in data, path
        assert scalar.hex() not in data.decode("latin-1").lower(), path
        for load in (serialization.load_pem_private_key, serialization.load_ssh_private_key):
            try:
                load(data, None)
            except (ValueError, TypeError, UnsupportedAlgorithm):
                continue
            private_keys.add(path.relative_to(pki).as_posix())
    # Only the coordinator's own keys; the kit is two public files.
    assert private_keys == {"ca/ca.key", "server/server.key"}
    assert {p.name for p in (pki / "kits" / "hospital-a").iterdir()} == {"ca.pem",
                                                                        "client.toml"}
    registered = (pki / "allowlist" / "hospital-a.pub").read_bytes().split()[:2]
    assert registered == (federation["site"] / "node.pub").read_bytes().split()[:2]


def test_the_kits_ca_pin_refuses_a_swapped_ca(site: Path, federation: dict[str, Path],
                                              tiny_bert: Path, logs) -> None:
    other = federation["root"] / "other-pki"
    if not other.exists():
        assert server_cli.main(["provision", "--out", str(other), "--host", "localhost"]) == 0
    shutil.copy(other / "ca" / "ca.pem", site / "ca.pem")  # a valid CA, not the federation's
    (site / "data.csv").write_text("text,label\n" + "note,cardio\nnote,resp\n" * 5)
    code = client_cli.main(["--config", str(site / "client.toml"), "--check", "--model",
                            str(tiny_bert), "--labels", LABELS, "--data",
                            str(site / "data.csv")])
    assert code == 2
    assert "is not the ca-sha256" in logs.text and "that client.toml pins" in logs.text
    # Nor can the swapped CA vouch for an agreement its own server certificate signed.
    cfg = freeze_labels(FedsiloConfig.from_flat({"model": str(tiny_bert), "labels": LABELS}))
    _issue({"pki": other}, cfg, site / "agreement.json")
    logs.clear()
    assert _approve(site, site / "agreement.json") == 2
    assert "is not the ca-sha256" in logs.text
    assert not (site / "ledger" / "agreements").exists()


# ----------------------------------------------------------------------- agreements
def test_an_agreement_signed_with_the_ca_key_is_refused(site: Path, federation, cfg,
                                                        tmp_path: Path, logs) -> None:
    doc = _issue(federation, cfg, tmp_path / "agreement.json")
    ca_cert = x509.load_pem_x509_certificate((federation["pki"] / "ca" / "ca.pem").read_bytes())
    forged = _resign(doc, _key(federation["pki"] / "ca" / "ca.key"), ca_cert,
                     terms={**doc["terms"], "target-epsilon": 50.0})
    assert _approve(site, _write(tmp_path / "forged.json", forged)) == 2
    assert "not the coordinator's server certificate" in logs.text
    assert not (site / "ledger" / "agreements").exists()
    # The coordinator's own start-up check refuses it too.
    assert server_cli.main(["--pki", str(federation["pki"]), "--agreement",
                            str(tmp_path / "forged.json"), "--model", cfg.model.model,
                            "--labels", LABELS, "--target-epsilon", "50"]) == 2


def test_an_expired_agreement_is_refused_at_approval_and_at_run_time(
        site: Path, federation, cfg, tmp_path: Path, bundle: str, logs) -> None:
    doc = _issue(federation, cfg, tmp_path / "agreement.json")
    server_key = _key(federation["pki"] / "server" / "server.key")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    old = _resign(doc, server_key, expires=(now - dt.timedelta(days=1)).isoformat())
    assert _approve(site, _write(tmp_path / "old.json", old)) == 2
    assert "the agreement expired on" in logs.text
    short = _resign(doc, server_key, expires=(now + dt.timedelta(seconds=3)).isoformat())
    assert _approve(site, _write(tmp_path / "short.json", short)) == 0
    run = cfg.replace(agreement_id=next(iter(_approvals(site))))
    agreements.check_run(run, site / "ledger", bundle)  # in force: runs
    time.sleep(max(0.0, (now + dt.timedelta(seconds=3.2) - dt.datetime.now(dt.UTC))
                   .total_seconds()))
    with pytest.raises(PolicyError, match="expired on"):
        agreements.check_run(run, site / "ledger", bundle)
    assert agreements.approved_bundles(site / "ledger") == set()  # no bundle is served


def test_a_superseded_agreement_is_declined_naming_the_newer(site: Path, federation, cfg,
                                                             tmp_path: Path, bundle: str,
                                                             ) -> None:
    loose = _issue(federation, cfg, tmp_path / "loose.json")
    strict = _issue(federation, cfg.replace(target_epsilon=2.0), tmp_path / "strict.json")
    other = _issue(federation, cfg, tmp_path / "other.json", name="another-federation")
    for name in ("loose", "strict", "other"):
        assert _approve(site, tmp_path / f"{name}.json") == 0
    ids = {name: agreement_id(d) for name, d in
           (("loose", loose), ("strict", strict), ("other", other))}
    with pytest.raises(PolicyError, match=f"superseded by agreement {ids['strict']}"):
        agreements.check_run(cfg.replace(agreement_id=ids["loose"]), site / "ledger", bundle)
    agreements.check_run(cfg.replace(agreement_id=ids["strict"], target_epsilon=2.0),
                         site / "ledger", bundle)
    # Another federation's approval does not supersede this one's, nor the reverse.
    agreements.check_run(cfg.replace(agreement_id=ids["other"]), site / "ledger", bundle)


PINNED = {"local-epochs": 2, "batch-size": 64, "learning-rate": 0.5, "evaluate-every": 0,
          "keep-updates": True, "seed": 43, "max-length": 48, "optimizer": "sgd",
          "grad-sample-mode": "hooks", "update-dtype": "float16", "trainable": "top-k"}


@pytest.fixture(scope="module")
def approved(federation, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):
    """One approved agreement, shared by the parametrized cases below."""
    root = tmp_path_factory.mktemp("approved")
    site = root / "hospital-a"
    shutil.copytree(federation["site"], site)
    cfg = freeze_labels(FedsiloConfig.from_flat({
        "model": str(tiny_bert), "labels": LABELS, "num-rounds": 2, "target-epsilon": 4.0,
        "batch-size": 32}))
    doc = _issue(federation, cfg, root / "agreement.json")
    assert _approve(site, root / "agreement.json") == 0
    return site, cfg.replace(agreement_id=agreement_id(doc))


@pytest.mark.parametrize("key", sorted(PINNED))
def test_a_run_differing_in_a_pinned_setting_is_declined_naming_it(approved, bundle: str,
                                                                   key: str) -> None:
    site, run = approved
    agreements.check_run(run, site / "ledger", bundle)  # the approved run itself passes
    changed = run.replace(**{key: PINNED[key]})
    with pytest.raises(PolicyError) as declined:
        agreements.check_run(changed, site / "ledger", bundle)
    message = str(declined.value)
    assert f"in {key} (approved " in message and ";" not in message  # that term, only it


def test_deleting_the_approvals_does_not_turn_enforcement_off(site: Path, federation, cfg,
                                                              tmp_path: Path,
                                                              bundle: str) -> None:
    doc = _issue(federation, cfg, tmp_path / "agreement.json")
    assert _approve(site, tmp_path / "agreement.json") == 0
    run = cfg.replace(agreement_id=agreement_id(doc))
    agreements.check_run(run, site / "ledger", bundle)
    assert agreements.approved_bundles(site / "ledger") == {bundle}
    shutil.rmtree(site / "ledger" / "agreements")
    with pytest.raises(PolicyError, match="approved no federation agreement"):
        agreements.check_run(run, site / "ledger", bundle)
    # A runtime serving only the bundles that agreements in force pin now serves none.
    assert agreements.approved_bundles(site / "ledger") == set()

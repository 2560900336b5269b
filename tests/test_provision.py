"""Coordinator provisioning: CA, server certificate, institution kits and allow-list.

Institutions make their own keys (``flower-client keygen``); the coordinator-made keys
of the old flow appear only behind ``generate_keys`` / ``--generate-keys-at-coordinator``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import bytes_to_public_key
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

from fedsilo.client.keys import keygen
from fedsilo.common.certs import ca_fingerprint, public_key_fingerprint
from fedsilo.server.provision import (
    Provisioned,
    ProvisionError,
    load_allowlist,
    main,
    provision,
)

HOSTS = ["coordinator.example.org", "203.0.113.7"]


def _keys(root: Path, *names: str) -> dict[str, Path]:
    """Each institution's node.pub, made in its own folder under ``root``."""
    return {name: keygen(root / "sites" / name.lower(), name.lower()).public for name in names}


def _generated(out: Path, names: list[str]) -> Provisioned:
    return provision(out, HOSTS, names, generate_keys=True)


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Provisioned]:
    root = tmp_path_factory.mktemp("prov")
    out, names = root / "out", ["hospital-a", "Hospital_B"]
    return out, provision(out, HOSTS, names, port=9443, public_keys=_keys(root, *names),
                          expected_examples={"hospital-a": 1200})


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_ca_and_server_certificate(first: tuple[Path, Provisioned]) -> None:
    _, res = first
    ca, server = _cert(res.ca_cert), _cert(res.server_cert)
    ca.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"coordinator.example.org",
                                                            "localhost"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("203.0.113.7"), ipaddress.ip_address("127.0.0.1")}
    ca_days = (ca.not_valid_after_utc - ca.not_valid_before_utc).days
    server_days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    assert 4 * 365 < ca_days <= 5 * 366 and server_days <= 398
    server_key = load_pem_private_key(res.server_key.read_bytes(), None)
    assert server_key.public_key() == server.public_key()


def test_permissions(first: tuple[Path, Provisioned]) -> None:
    out, res = first
    assert _mode(out / "ca") == 0o700 and _mode(out / "ca" / "ca.key") == 0o600
    assert _mode(res.server_key) == 0o600
    for kit in res.kits.values():
        assert _mode(kit) == 0o700 and not (kit / "node.key").exists()
        node_key = out.parent / "sites" / kit.name / "node.key"
        assert _mode(node_key) == 0o600 and _mode(node_key.parent) == 0o700
    assert not list(out.rglob("*.tmp"))


def test_kit_contents_and_flower_loaders(first: tuple[Path, Provisioned]) -> None:
    out, res = first
    assert set(res.kits) == {"hospital-a", "hospital_b"}
    assert res.created == ("hospital-a", "hospital_b")
    allow = load_allowlist(out)
    ca = _cert(res.ca_cert)
    assert res.ca_sha256 == ca_fingerprint(ca)
    for name, kit in res.kits.items():
        assert {p.name for p in kit.iterdir()} == {"ca.pem", "client.toml"}
        assert (kit / "ca.pem").read_bytes() == res.ca_cert.read_bytes()
        cfg = tomllib.loads((kit / "client.toml").read_text())
        assert cfg["institution"] == name
        assert cfg["superlink"] == "coordinator.example.org:9443"
        assert cfg["ca-sha256"] == res.ca_sha256
        assert {"data", "text-column", "label-column", "target-epsilon", "target-delta",
                "max-grad-norm"} <= cfg.keys()
        # The institution's folder: its own key beside the kit's two files.
        site = out.parent / "sites" / name
        # flower-supernode --auth-supernode-private-key
        args = argparse.Namespace(auth_supernode_private_key=str(site / cfg["auth-private-key"]),
                                  auth_supernode_public_key=None)
        private, public = _try_setup_client_authentication(args)
        assert isinstance(private.curve, ec.SECP384R1)
        # flwr supernode register <public-key-file>: both the sent and the allow-list's copy
        for pub in (site / "node.pub", allow[name]):
            assert bytes_to_public_key(try_load_public_key(pub)) == public
    index = json.loads(res.allowlist.read_text())
    assert index["hospital-a"]["sha256"] == public_key_fingerprint(
        bytes_to_public_key(try_load_public_key(allow["hospital-a"])))
    assert index["hospital-a"]["expected-examples"] == 1200
    assert index["hospital_b"]["expected-examples"] is None


def test_old_flow_makes_keys_at_the_coordinator_only_when_asked(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="'a' has no --public-key.*flower-client keygen"):
        provision(tmp_path / "out", HOSTS, ["a"])
    assert not (tmp_path / "out").exists()  # refused before anything is written
    res = _generated(tmp_path / "out", ["a"])
    kit = res.kits["a"]
    assert _mode(kit / "node.key") == 0o600
    assert "COORDINATOR GENERATED IT" in (kit / "client.toml").read_text()
    assert load_allowlist(tmp_path / "out")["a"].read_bytes() == (kit / "node.pub").read_bytes()
    with pytest.raises(ProvisionError, match="exclude each other"):
        provision(tmp_path / "out", HOSTS, ["b"], public_keys=_keys(tmp_path, "b"),
                  generate_keys=True)


def test_a_key_that_is_not_the_registered_one_or_is_private_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    provision(out, HOSTS, ["a"], public_keys=_keys(tmp_path, "a"))
    before = _snapshot(out)
    other = keygen(tmp_path / "other", "a")
    with pytest.raises(ProvisionError, match="already on the allow-list with key"):
        provision(out, HOSTS, ["a"], public_keys={"a": other.public})
    with pytest.raises(ProvisionError, match="holds a PRIVATE key"):
        provision(out, HOSTS, ["b"], public_keys={"b": other.private})
    (tmp_path / "rsa.pub").write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7 x\n")
    with pytest.raises(ProvisionError, match="rsa.pub: not an OpenSSH public key"):
        provision(out, HOSTS, ["b"], public_keys={"b": tmp_path / "rsa.pub"})
    assert _snapshot(out) == before
    # The same key again, now with an expected size: only the entry changes.
    provision(out, HOSTS, ["a"], public_keys={"a": tmp_path / "sites" / "a" / "node.pub"},
              expected_examples={"a": 80})
    assert json.loads((out / "allowlist" / "allowlist.json").read_text())["a"][
        "expected-examples"] == 80


def test_rerun_keeps_keys_and_adds_institution(tmp_path: Path) -> None:
    out, keys = tmp_path / "out", _keys(tmp_path, "hospital-a", "clinic-c")
    provision(out, HOSTS, ["hospital-a"], public_keys={"hospital-a": keys["hospital-a"]})
    before = _snapshot(out)
    # hospital-a is on the allow-list already: its key need not be given again.
    res = provision(out, HOSTS, ["hospital-a", "clinic-c"],
                    public_keys={"clinic-c": keys["clinic-c"]})
    after = _snapshot(out)
    assert res.created == ("clinic-c",)
    unchanged = {k: v for k, v in before.items() if k != "allowlist/allowlist.json"}
    assert all(after[k] == v for k, v in unchanged.items())
    assert set(load_allowlist(out)) == {"hospital-a", "clinic-c"}
    assert "server/server.pem.bak" not in after
    # Same run again with an institution left out: nothing changes, nothing is dropped.
    provision(out, HOSTS, ["clinic-c"])
    assert _snapshot(out) == after


def test_new_hosts_reissue_server_certificate(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = provision(out, HOSTS, ["hospital-a"], public_keys=_keys(tmp_path, "hospital-a"))
    old_cert, old_key, ca = (res.server_cert.read_bytes(), res.server_key.read_bytes(),
                             res.ca_cert.read_bytes())
    res = provision(out, [*HOSTS, "fl.example.net"], [])
    assert (out / "server" / "server.pem.bak").read_bytes() == old_cert
    assert res.server_key.read_bytes() == old_key and res.ca_cert.read_bytes() == ca
    sans = _cert(res.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "fl.example.net" in sans.get_values_for_type(x509.DNSName)
    _cert(res.server_cert).verify_directly_issued_by(_cert(res.ca_cert))


@pytest.mark.parametrize("bad", ["-lead", "has space", "x" * 64, "../etc", "", "trail\n"])
def test_bad_institution_name(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ProvisionError, match="Invalid institution name") as err:
        provision(tmp_path / "out", HOSTS, ["ok", bad])
    assert repr(bad) in str(err.value)
    assert not (tmp_path / "out").exists()  # validated before anything is written


def test_duplicate_and_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="Duplicate.*'Hospital-A'"):
        provision(tmp_path, HOSTS, ["hospital-a", "Hospital-A"])
    with pytest.raises(ProvisionError, match="host"):
        provision(tmp_path, ["https://x.org:9092"], ["a"])
    with pytest.raises(ProvisionError, match="host"):
        provision(tmp_path, [], ["a"])


def test_interrupted_run_is_completed_without_touching_keys(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _generated(out, ["a"])
    kit = res.kits["a"]
    node_key, ca_key = (kit / "node.key").read_bytes(), (out / "ca" / "ca.key").read_bytes()
    for lost in (kit / "client.toml", kit / "node.pub", out / "allowlist" / "a.pub",
                 res.allowlist, res.ca_cert):
        lost.unlink()
    res = _generated(out, ["a"])
    assert (kit / "node.key").read_bytes() == node_key
    assert (out / "ca" / "ca.key").read_bytes() == ca_key
    assert set(load_allowlist(out)) == {"a"} and (kit / "client.toml").is_file()
    # A fresh CA certificate for the same key: the server certificate still verifies.
    _cert(res.server_cert).verify_directly_issued_by(_cert(res.ca_cert))


def test_unsafe_states_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _generated(out, ["a"])
    res.allowlist.write_text("not json")
    with pytest.raises(ProvisionError, match="allow-list index"):
        _generated(out, ["a"])
    res.allowlist.unlink()
    (out / "ca" / "ca.key").rename(tmp_path / "ca.key")
    with pytest.raises(ProvisionError, match="ca.key is missing"):
        _generated(out, ["a"])


def test_swapped_allowlist_key_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    provision(out, HOSTS, ["a", "b"], public_keys=_keys(tmp_path, "a", "b"))
    (out / "allowlist" / "a.pub").write_bytes((out / "allowlist" / "b.pub").read_bytes())
    with pytest.raises(ProvisionError, match="does not match"):
        load_allowlist(out)
    with pytest.raises(ProvisionError, match="does not match"):
        provision(out, HOSTS, ["a"])


def test_main(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("fedsilo.provision")
    logger.addHandler(caplog.handler)
    try:
        out, pub = tmp_path / "out", _keys(tmp_path, "site-1")["site-1"]
        assert main(["--out", str(out), "--host", "fl.example.org", "--port", "9443",
                     "--institution", "site-1", "--public-key", str(pub),
                     "--expected-examples", "500"]) == 0
        ca = ca_fingerprint(_cert(out / "ca" / "ca.pem"))
        assert f"CA fingerprint (SHA-256) {ca}" in caplog.text
        assert "allow-list: site-1 key SHA256:" in caplog.text and "examples 500" in caplog.text
        assert "no private key" in caplog.text and "PRIVATE key" not in caplog.text
        # The exact commands for both sides, for the host and port the kits were made for.
        assert "the kits dial fl.example.org:9443" in caplog.text
        assert f"flower-server --pki {out} --host 0.0.0.0 --port 9443 --agreement" \
            in caplog.text
        assert f"flower-server agreement --pki {out}" in caplog.text
        assert "flower-client approve agreement.json --config client.toml   # --yes" \
            in caplog.text
        assert main(["--out", str(tmp_path / "bare"), "--host", "fl.example.org"]) == 0
        assert main(["--out", str(out), "--host", "fl.example.org",
                     "--institution", "bad name"]) == 2
        assert "'bad name'" in caplog.text
        assert main(["--out", str(out), "--host", "fl.example.org", "--institution", "x",
                     "--institution", "y", "--public-key", str(pub)]) == 2
        assert "give one --public-key per --institution" in caplog.text
        assert main(["--out", str(out), "--host", "localhost", "--institution", "old",
                     "--generate-keys-at-coordinator"]) == 0
        assert "holds old's PRIVATE key, made here" in caplog.text
        assert "--host 127.0.0.1 --port 9092" in caplog.text  # loopback kits: loopback only
    finally:
        logger.removeHandler(caplog.handler)

"""Coordinator provisioning: CA, server certificate, institution kits and allow-list."""

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

from fedsilo.server.provision import (
    Provisioned,
    ProvisionError,
    fingerprint,
    load_allowlist,
    main,
    provision,
)

HOSTS = ["coordinator.example.org", "203.0.113.7"]


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Provisioned]:
    out = tmp_path_factory.mktemp("prov") / "out"
    return out, provision(out, HOSTS, ["hospital-a", "Hospital_B"], port=9443)


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
        assert _mode(kit) == 0o700 and _mode(kit / "node.key") == 0o600
    assert not list(out.rglob("*.tmp"))


def test_kit_contents_and_flower_loaders(first: tuple[Path, Provisioned]) -> None:
    out, res = first
    assert set(res.kits) == {"hospital-a", "hospital_b"}
    assert res.created == ("hospital-a", "hospital_b")
    allow = load_allowlist(out)
    for name, kit in res.kits.items():
        assert (kit / "ca.pem").read_bytes() == res.ca_cert.read_bytes()
        cfg = tomllib.loads((kit / "client.toml").read_text())
        assert cfg["institution"] == name
        assert cfg["superlink"] == "coordinator.example.org:9443"
        for key in ("root-certificates", "auth-private-key"):
            assert (kit / cfg[key]).is_file()
        assert {"data", "text-column", "label-column", "target-epsilon", "target-delta",
                "max-grad-norm"} <= cfg.keys()
        # flower-supernode --auth-supernode-private-key
        args = argparse.Namespace(auth_supernode_private_key=str(kit / cfg["auth-private-key"]),
                                  auth_supernode_public_key=None)
        private, public = _try_setup_client_authentication(args)
        assert isinstance(private.curve, ec.SECP384R1)
        # flwr supernode register <public-key-file>: both the kit's and the allow-list's copy
        for pub in (kit / "node.pub", allow[name]):
            assert bytes_to_public_key(try_load_public_key(pub)) == public
    index = json.loads(res.allowlist.read_text())
    assert index["hospital-a"]["sha256"] == fingerprint(
        bytes_to_public_key(try_load_public_key(allow["hospital-a"])))


def test_rerun_keeps_keys_and_adds_institution(tmp_path: Path) -> None:
    out = tmp_path / "out"
    provision(out, HOSTS, ["hospital-a"])
    before = _snapshot(out)
    res = provision(out, HOSTS, ["hospital-a", "clinic-c"])
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
    res = provision(out, HOSTS, ["hospital-a"])
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
    res = provision(out, HOSTS, ["a"])
    kit = res.kits["a"]
    node_key, ca_key = (kit / "node.key").read_bytes(), (out / "ca" / "ca.key").read_bytes()
    for lost in (kit / "client.toml", kit / "node.pub", out / "allowlist" / "a.pub",
                 res.allowlist, res.ca_cert):
        lost.unlink()
    res = provision(out, HOSTS, ["a"])
    assert (kit / "node.key").read_bytes() == node_key
    assert (out / "ca" / "ca.key").read_bytes() == ca_key
    assert set(load_allowlist(out)) == {"a"} and (kit / "client.toml").is_file()
    # A fresh CA certificate for the same key: the server certificate still verifies.
    _cert(res.server_cert).verify_directly_issued_by(_cert(res.ca_cert))


def test_unsafe_states_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = provision(out, HOSTS, ["a"])
    res.allowlist.write_text("not json")
    with pytest.raises(ProvisionError, match="allow-list index"):
        provision(out, HOSTS, ["a"])
    res.allowlist.unlink()
    (out / "ca" / "ca.key").rename(tmp_path / "ca.key")
    with pytest.raises(ProvisionError, match="ca.key is missing"):
        provision(out, HOSTS, ["a"])


def test_swapped_allowlist_key_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    provision(out, HOSTS, ["a", "b"])
    (out / "allowlist" / "a.pub").write_bytes((out / "allowlist" / "b.pub").read_bytes())
    with pytest.raises(ProvisionError, match="does not match"):
        load_allowlist(out)
    with pytest.raises(ProvisionError, match="does not match"):
        provision(out, HOSTS, ["a"])


def test_main(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("fedsilo.provision")
    logger.addHandler(caplog.handler)
    try:
        out = tmp_path / "out"
        assert main(["--out", str(out), "--host", "fl.example.org",
                     "--institution", "site-1"]) == 0
        assert "allow-list: site-1" in caplog.text
        assert f"flower-server --pki {out}" in caplog.text
        assert main(["--out", str(out), "--host", "fl.example.org",
                     "--institution", "bad name"]) == 2
        assert "'bad name'" in caplog.text
    finally:
        logger.removeHandler(caplog.handler)

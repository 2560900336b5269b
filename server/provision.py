"""Coordinator provisioning: private CA, SuperLink TLS certificate and institution kits.

Creates, with ``cryptography`` only (ECDSA P-384 keys; private keys 0600, private folders
0700; every file written through :mod:`fedsilo.common.atomic`)::

    ca/ca.key, ca/ca.pem                 private CA, 5 years
    server/server.key, server/server.pem SuperLink TLS certificate signed by the CA
    allowlist/<name>.pub, allowlist.json node public keys (OpenSSH) + SHA-256 fingerprints
    kits/<name>/                         for the institution: ca.pem, node.key, node.pub,
                                         client.toml

Flower 1.41 reads ``flower-supernode --auth-supernode-private-key`` with
``load_ssh_private_key`` (OpenSSH private key, EC) and ``flwr supernode register <file>``
with ``load_ssh_public_key`` (OpenSSH public key, NIST curve).

Re-running never silently overwrites a key. An existing CA is reused (a certificate
without its key is a ``ProvisionError``; a key without certificate, left by an
interrupted run, gets one). The server certificate is re-issued only when the requested
SANs changed, it was not issued by the current CA, expires within 30 days or does not
match ``server.key``; the old one is kept as ``server.pem.bak`` and the key is reused.
Existing kits are left as they are (files missing after an interrupted run are added);
new institutions get a kit and an allow-list entry, earlier entries stay. An allow-list
entry that does not match its kit's key is a ``ProvisionError``.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.common.atomic import write_atomic
from fedsilo.common.logs import configure_logging
from fedsilo.server.kit_template import client_toml

log = logging.getLogger("fedsilo.provision")

CA_DAYS = 5 * 365 + 1
SERVER_DAYS = 397
RENEW_DAYS = 30
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}", re.IGNORECASE)
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DNS = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*", re.IGNORECASE)
_PEM, _SSH = serialization.Encoding.PEM, serialization.Encoding.OpenSSH
_ECKey = ec.EllipticCurvePrivateKey
PUBLIC = 0o644  # certificates, public keys, the allow-list and kit files


class ProvisionError(ValueError):
    """Bad provisioning input, or an output folder in a state that is unsafe to touch."""


@dataclass(frozen=True)
class Provisioned:
    """Paths written or reused by :func:`provision`; ``created`` names the new kits."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    allowlist: Path
    kits: dict[str, Path]
    created: tuple[str, ...] = ()


def _mkdir(path: Path, private: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o755)
    if private:
        os.chmod(path, 0o700)
    return path


def _new_key(path: Path, fmt: serialization.PrivateFormat) -> _ECKey:
    key = ec.generate_private_key(ec.SECP384R1())
    write_atomic(path, key.private_bytes(_PEM, fmt, serialization.NoEncryption()))
    return key


def _load_key(path: Path, ssh: bool = False) -> _ECKey:
    data = path.read_bytes()
    try:
        key = (serialization.load_ssh_private_key(data, None) if ssh
               else serialization.load_pem_private_key(data, None))
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ProvisionError(f"Cannot read private key {path}: {err}") from None
    if not isinstance(key, _ECKey):
        raise ProvisionError(f"{path} is not an EC private key")
    return key


def _cert(subject: x509.Name, issuer: x509.Name, key: _ECKey, days: int, ca: bool,
          extra: list[tuple[x509.ExtensionType, bool]], signer: _ECKey) -> x509.Certificate:
    # Start 5 minutes back to tolerate small clock skew between machines.
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=5)
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                          decipher_only=False)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                              critical=True)
               .add_extension(usage, critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsilo"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ensure_ca(ca_dir: Path) -> tuple[_ECKey, x509.Certificate]:
    key_path, cert_path = ca_dir / "ca.key", ca_dir / "ca.pem"
    if cert_path.exists() and not key_path.exists():
        raise ProvisionError(f"{cert_path} exists but its key ca.key is missing: restore it, "
                             "or remove the folder to start over (all kits become invalid)")
    if key_path.exists():
        key = _load_key(key_path)
        if cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if cert.public_key() != key.public_key():
                raise ProvisionError(f"{cert_path} does not match {key_path}")
            log.info("Reusing CA %s (expires %s)", cert_path, cert.not_valid_after_utc.date())
            return key, cert
        log.warning("CA key %s has no certificate (interrupted run?); issuing one", key_path)
    else:
        key = _new_key(key_path, serialization.PrivateFormat.PKCS8)
    name = _name("fedsilo federation CA")
    cert = _cert(name, name, key, CA_DAYS, True, [], key)
    write_atomic(cert_path, cert.public_bytes(_PEM), PUBLIC)
    log.info("Created CA %s (valid until %s)", cert_path, cert.not_valid_after_utc.date())
    return key, cert


def _san_keys(names: x509.SubjectAlternativeName | list[x509.GeneralName]) -> set[tuple]:
    return {(type(n).__name__, str(n.value).lower()) for n in names}


def _ensure_server(server_dir: Path, hosts: list[str], ca_key: _ECKey,
                   ca: x509.Certificate) -> tuple[Path, Path]:
    key_path, cert_path = server_dir / "server.key", server_dir / "server.pem"
    sans: list[x509.GeneralName] = []
    for host in [*hosts, "localhost", "127.0.0.1"]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        sans += [] if entry in sans else [entry]
    key = _load_key(key_path) if key_path.exists() else None
    if cert_path.exists():
        old = x509.load_pem_x509_certificate(cert_path.read_bytes())
        old_sans = [e.value for e in old.extensions
                    if isinstance(e.value, x509.SubjectAlternativeName)]
        reasons = [] if old_sans and _san_keys(old_sans[0]) == _san_keys(sans) else [
            "host names changed"]
        try:
            old.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            reasons.append("not issued by the current CA")
        if old.not_valid_after_utc - dt.datetime.now(dt.UTC) < dt.timedelta(days=RENEW_DAYS):
            reasons.append("expires soon")
        if key is None or old.public_key() != key.public_key():
            reasons.append("server.key missing or not matching")
        if not reasons:
            log.info("Keeping server certificate %s", cert_path)
            return cert_path, key_path
        write_atomic(cert_path.with_name("server.pem.bak"), cert_path.read_bytes(), PUBLIC)
        log.info("Re-issuing server certificate (%s); old one kept as server.pem.bak",
                 ", ".join(reasons))
    if key is None:
        key = _new_key(key_path, serialization.PrivateFormat.PKCS8)
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    extra: list[tuple[x509.ExtensionType, bool]] = [
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.SubjectAlternativeName(sans), False),
        (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)]
    subject = _name(hosts[0] if len(hosts[0]) <= 64 else "fedsilo superlink")
    cert = _cert(subject, ca.subject, key, SERVER_DAYS, False, extra, ca_key)
    write_atomic(cert_path, cert.public_bytes(_PEM), PUBLIC)
    log.info("Server certificate %s for %s", cert_path, ", ".join(str(n.value) for n in sans))
    return cert_path, key_path


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """Return the OpenSSH SHA-256 fingerprint, as ``ssh-keygen -lf`` prints it."""
    line = public_key.public_bytes(_SSH, serialization.PublicFormat.OpenSSH)
    digest = hashlib.sha256(base64.b64decode(line.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _ensure_kit(kit: Path, name: str, superlink: str, ca_pem: bytes) -> tuple[bytes, bool]:
    """Create or complete one kit; return its OpenSSH public-key line and whether it is new."""
    key_path, existed = kit / "node.key", kit.exists()
    _mkdir(kit, private=True)
    if key_path.exists():
        key = _load_key(key_path, ssh=True)
    elif (kit / "node.pub").exists():
        raise ProvisionError(f"Kit {kit} has node.pub but no node.key; restore node.key, "
                             "or remove the kit folder and its allow-list entry")
    else:
        key = _new_key(key_path, serialization.PrivateFormat.OpenSSH)
    pub = key.public_key().public_bytes(_SSH, serialization.PublicFormat.OpenSSH)
    pub += f" fedsilo:{name}\n".encode()
    files = {"node.pub": pub, "ca.pem": ca_pem,
             "client.toml": client_toml(name, superlink).encode()}
    for fname, data in files.items():
        if not (kit / fname).exists():
            write_atomic(kit / fname, data, PUBLIC)
    if (kit / "ca.pem").read_bytes() != ca_pem:
        log.warning("Kit %s holds a different ca.pem than the current CA", kit)
    if existed:
        log.info("Kit for %s already exists; left as it is: %s", name, kit)
    return pub, not existed


def _check(hosts: list[str], institutions: list[str], port: int) -> tuple[list, list]:
    names: list[str] = []
    for raw in institutions:
        if not _NAME.fullmatch(raw):
            raise ProvisionError(f"Invalid institution name {raw!r}: use 1-63 letters, digits, "
                                 "'.', '_' or '-', starting with a letter or digit")
        if raw.lower() in names:
            raise ProvisionError(f"Duplicate institution name {raw!r}")
        names.append(raw.lower())
    clean: list[str] = []
    for raw in hosts:
        host = raw.strip().strip("[]").lower()
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            if not _DNS.fullmatch(host):
                raise ProvisionError(f"Invalid host name {raw!r}: give a DNS name or IP "
                                     "address without scheme or port") from None
        clean += [] if host in clean else [host]
    if not clean:
        raise ProvisionError("Give at least one public host name of the SuperLink")
    if not 0 < port < 65536:
        raise ProvisionError(f"Invalid port {port}")
    return clean, names


def provision(out_dir: Path, hosts: list[str], institutions: list[str],
              port: int = 9092) -> Provisioned:
    """Create or extend the coordinator's CA, server certificate and institution kits.

    Parameters
    ----------
    out_dir
        Output folder, created if needed; see the module docstring for layout and re-runs.
    hosts
        Public host names or IP addresses of the SuperLink; the first one goes into each
        kit's ``superlink`` address. ``localhost`` and ``127.0.0.1`` are always added.
    institutions
        Institution names, ``[a-z0-9][a-z0-9._-]{0,62}``, case-insensitive and stored in
        lower case. Existing kits are kept as they are; new names get a kit.
    port
        SuperLink Fleet API port written into each ``client.toml``.

    Returns
    -------
    Provisioned
        Paths of everything written or reused.
    """
    hosts, names = _check(hosts, institutions, port)
    out_dir = Path(out_dir)
    ca_key, ca = _ensure_ca(_mkdir(out_dir / "ca", private=True))
    server_cert, server_key = _ensure_server(_mkdir(out_dir / "server", private=True),
                                             hosts, ca_key, ca)
    allow_dir, kits_dir = _mkdir(out_dir / "allowlist"), _mkdir(out_dir / "kits", private=True)
    index_path = allow_dir / "allowlist.json"
    index = _read_index(index_path) if index_path.exists() else {}
    superlink = f"[{hosts[0]}]:{port}" if ":" in hosts[0] else f"{hosts[0]}:{port}"
    kits: dict[str, Path] = {}
    created: list[str] = []
    for name in names:
        kit, pub_path = kits_dir / name, allow_dir / f"{name}.pub"
        if name in index and not kit.exists():
            raise ProvisionError(f"{name!r} is on the allow-list but its kit {kit} is missing; "
                                 f"remove its entry from {index_path} and {pub_path} to issue "
                                 "a new key (and unregister the old node)")
        pub, new = _ensure_kit(kit, name, superlink, ca.public_bytes(_PEM))
        kits[name], fp = kit, fingerprint(serialization.load_ssh_public_key(pub))
        created += [name] if new else []
        if name in index and index[name]["sha256"] != fp:
            raise ProvisionError(f"Allow-list entry for {name!r} does not match its kit's key "
                                 f"({index[name]['sha256']} vs {fp}); resolve this by hand")
        if not pub_path.exists():
            write_atomic(pub_path, pub, PUBLIC)
        elif _pub_fingerprint(pub_path) != fp:
            raise ProvisionError(f"{pub_path} does not match the key in {kit}")
        if index.get(name) != (entry := {"public-key": pub_path.name, "sha256": fp}):
            index[name] = entry
            write_atomic(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n", PUBLIC)
    return Provisioned(out_dir / "ca" / "ca.pem", server_cert, server_key, index_path, kits,
                       tuple(created))


def load_allowlist(out_dir: Path) -> dict[str, Path]:
    """Return institution -> public-key file, checking each file against its fingerprint."""
    index_path = Path(out_dir) / "allowlist" / "allowlist.json"
    if not index_path.exists():
        raise ProvisionError(f"No allow-list at {index_path}; run fedsilo-provision first")
    out: dict[str, Path] = {}
    for name, entry in _read_index(index_path).items():
        path = index_path.parent / entry["public-key"]
        if not path.is_file() or _pub_fingerprint(path) != entry["sha256"]:
            raise ProvisionError(f"Public key {path} does not match the allow-list entry")
        out[name] = path
    return out


def _read_index(path: Path) -> dict[str, dict[str, str]]:
    try:
        index = json.loads(path.read_text())
        if all(isinstance(e, dict) and {"public-key", "sha256"} <= e.keys()
               for e in index.values()):
            return index
    except (ValueError, AttributeError):
        pass
    raise ProvisionError(f"{path} is not a valid allow-list index; restore it by hand")


def _pub_fingerprint(path: Path) -> str | None:
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm):
        return None
    return fingerprint(key) if isinstance(key, ec.EllipticCurvePublicKey) else None


def main(argv: list[str] | None = None) -> int:
    """Command line: ``flower-server provision --out DIR --host H --institution NAME ...``."""
    parser = argparse.ArgumentParser(prog="flower-server provision",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--host", action="append", required=True,
                        help="public host name or IP of the SuperLink (repeatable)")
    parser.add_argument("--institution", action="append", default=[],
                        help="institution name (repeatable)")
    parser.add_argument("--port", type=int, default=9092, help="SuperLink Fleet API port")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        result = provision(args.out, args.host, args.institution, args.port)
        allow = load_allowlist(args.out)
    except ProvisionError as err:
        log.error("%s", err)
        return 2
    log.info("allow-list: %s (flower-server registers these keys at start)",
             ", ".join(f"{name} ({allow[name].name})" for name in result.kits))
    for name in result.created:
        log.info("Send %s the folder %s over a secure channel (it holds its private key)",
                 name, result.kits[name])
    log.info("Start the coordinator with: flower-server --pki %s", args.out)
    return 0

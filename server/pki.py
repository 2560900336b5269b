"""The federation's private CA and the SuperLink's TLS certificate (``cryptography`` only).

ECDSA P-384 keys, private keys 0600 in private folders (0700), every file written
through :mod:`fedsilo.common.atomic`. An existing CA is reused (a certificate without
its key is a :class:`ProvisionError`; a key without certificate, left by an interrupted
run, gets one). The server certificate (CA:FALSE, serverAuth: the only certificate
that may sign federation agreements) is re-issued only when the requested SANs
changed, it was not issued by the current CA, expires within 30 days or does not
match ``server.key``; the old one is kept as ``server.pem.bak`` and the key is reused.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.common.atomic import write_atomic
from fedsilo.server.allowlist import PUBLIC, ProvisionError

log = logging.getLogger("fedsilo.provision")

CA_DAYS = 5 * 365 + 1
SERVER_DAYS = 397
RENEW_DAYS = 30
_PEM = serialization.Encoding.PEM
_ECKey = ec.EllipticCurvePrivateKey


def mkdir(path: Path, private: bool = False) -> Path:
    """Create ``path`` (0700 when ``private``, also if it existed) and return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o755)
    if private:
        os.chmod(path, 0o700)
    return path


def new_key(path: Path, fmt: serialization.PrivateFormat) -> _ECKey:
    """A new P-384 key, written to ``path`` (0600) in format ``fmt``."""
    key = ec.generate_private_key(ec.SECP384R1())
    write_atomic(path, key.private_bytes(_PEM, fmt, serialization.NoEncryption()))
    return key


def load_key(path: Path, ssh: bool = False) -> _ECKey:
    """Load an EC private key (PEM, or OpenSSH when ``ssh``); ProvisionError if unusable."""
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


def ensure_ca(ca_dir: Path) -> tuple[_ECKey, x509.Certificate]:
    """Reuse or create the CA key and certificate in ``ca_dir``."""
    key_path, cert_path = ca_dir / "ca.key", ca_dir / "ca.pem"
    if cert_path.exists() and not key_path.exists():
        raise ProvisionError(f"{cert_path} exists but its key ca.key is missing: restore it, "
                             "or remove the folder to start over (all kits become invalid)")
    if key_path.exists():
        key = load_key(key_path)
        if cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if cert.public_key() != key.public_key():
                raise ProvisionError(f"{cert_path} does not match {key_path}")
            log.info("Reusing CA %s (expires %s)", cert_path, cert.not_valid_after_utc.date())
            return key, cert
        log.warning("CA key %s has no certificate (interrupted run?); issuing one", key_path)
    else:
        key = new_key(key_path, serialization.PrivateFormat.PKCS8)
    name = _name("fedsilo federation CA")
    cert = _cert(name, name, key, CA_DAYS, True, [], key)
    write_atomic(cert_path, cert.public_bytes(_PEM), PUBLIC)
    log.info("Created CA %s (valid until %s)", cert_path, cert.not_valid_after_utc.date())
    return key, cert


def _san_keys(names: x509.SubjectAlternativeName | list[x509.GeneralName]) -> set[tuple]:
    return {(type(n).__name__, str(n.value).lower()) for n in names}


def ensure_server(server_dir: Path, hosts: list[str], ca_key: _ECKey,
                  ca: x509.Certificate) -> tuple[Path, Path]:
    """Reuse or (re-)issue the SuperLink certificate for ``hosts``; return cert and key paths."""
    key_path, cert_path = server_dir / "server.key", server_dir / "server.pem"
    sans: list[x509.GeneralName] = []
    for host in [*hosts, "localhost", "127.0.0.1"]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        sans += [] if entry in sans else [entry]
    key = load_key(key_path) if key_path.exists() else None
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
        key = new_key(key_path, serialization.PrivateFormat.PKCS8)
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



"""Certificate and key checks shared by the coordinator, the institutions and agreements."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_private_key,
)


def outside_validity(cert: x509.Certificate) -> str | None:
    """Say when ``cert`` is valid if that is not now (``"valid only from … to …"``), else None."""
    now = dt.datetime.now(dt.UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if start <= now <= end:
        return None
    stamp = "%Y-%m-%d %H:%M"
    return f"valid only from {start:{stamp}} to {end:{stamp}} UTC (now {now:{stamp}})"


def public_key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """OpenSSH SHA-256 fingerprint of a public key, as ``ssh-keygen -lf`` prints it."""
    blob = public_key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def key_fingerprint(path: Path) -> str:
    """OpenSSH-style SHA-256 fingerprint of the public half of a private key file."""
    key = load_ssh_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")
    return public_key_fingerprint(key.public_key())


def ca_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of a certificate's DER bytes, as ``openssl x509 -fingerprint -sha256`` shows it.

    Coordinator and institution both print it so that they can compare it out of band
    (by phone, on paper) before the institution trusts the CA.
    """
    return ":".join(f"{byte:02X}" for byte in cert.fingerprint(hashes.SHA256()))


def same_fingerprint(pinned: str, actual: str) -> bool:
    """Whether two SHA-256 fingerprints are equal, ignoring case, colons and blanks."""
    def norm(text: str) -> str:  # also takes openssl's "sha256 Fingerprint=AB:CD:…"
        return "".join(text.rsplit("=", 1)[-1].split()).replace(":", "").lower()
    return norm(pinned) == norm(actual)

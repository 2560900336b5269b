"""Certificate checks shared by the coordinator, the institutions and agreements."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from pathlib import Path

from cryptography import x509
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


def key_fingerprint(path: Path) -> str:
    """OpenSSH-style SHA-256 fingerprint of the public half of a private key file."""
    key = load_ssh_private_key(path.read_bytes(), password=None)
    blob = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

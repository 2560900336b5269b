"""The coordinator's allow-list of institutions: node public key, fingerprint, expected size.

``<pki>/allowlist/allowlist.json`` maps each institution to its entry::

    {"hospital-a": {"public-key": "hospital-a.pub", "sha256": "SHA256:…",
                    "expected-examples": 5000}}

``public-key`` names an OpenSSH public key file beside the index (what ``flwr
supernode register`` reads), ``sha256`` its OpenSSH fingerprint, and
``expected-examples`` the number of training examples the coordinator expects the
institution to declare (``null``: none given). :func:`load_allowlist` checks every
key file against its fingerprint before ``flower-server`` registers it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsilo.common.atomic import write_atomic
from fedsilo.common.certs import public_key_fingerprint

INDEX = "allowlist.json"
PUBLIC = 0o644
#: Curves ``flwr supernode register`` accepts.
CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class ProvisionError(ValueError):
    """Bad provisioning input, or an output folder in a state that is unsafe to touch."""


@dataclass(frozen=True)
class Allowed:
    """One allow-listed institution."""

    public_key: Path
    sha256: str
    expected_examples: int | None


def public_line(key: ec.EllipticCurvePublicKey, name: str) -> bytes:
    """The OpenSSH public-key line fedsilo stores for institution ``name``."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + f" fedsilo:{name}\n".encode()


def read_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load an institution's OpenSSH public key file (``node.pub``).

    Raises
    ------
    ProvisionError
        For an unreadable file, a private key sent by mistake, or an unusable key type.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ProvisionError(f"--public-key {path}: cannot read it ({err})") from None
    if b"PRIVATE KEY" in data:
        raise ProvisionError(
            f"--public-key {path} holds a PRIVATE key. Delete this copy; that key has left its "
            "institution and must not be used: the institution creates a new pair with "
            "`flower-client keygen` and sends only node.pub")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ProvisionError(f"--public-key {path}: not an OpenSSH public key ({err}); ask "
                             "the institution for the node.pub `flower-client keygen` "
                             "wrote") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, CURVES):
        raise ProvisionError(f"--public-key {path}: Flower needs an ECDSA key on a NIST "
                             "curve; ask the institution to run `flower-client keygen`")
    return key


def key_file_fingerprint(path: Path) -> str | None:
    """Fingerprint of a stored public key file, or None if it is not a usable key."""
    try:
        return public_key_fingerprint(read_public_key(path))
    except ProvisionError:
        return None


def read_index(path: Path) -> dict[str, dict[str, Any]]:
    """The index as stored (entries of older fedsilo lack ``expected-examples``)."""
    try:
        index = json.loads(path.read_text())
        if isinstance(index, dict) and all(
                isinstance(e, dict) and {"public-key", "sha256"} <= e.keys()
                and isinstance(e.get("expected-examples"), int | None)
                for e in index.values()):
            return {name: {"expected-examples": None, **e} for name, e in index.items()}
    except (OSError, ValueError):
        pass
    raise ProvisionError(f"{path} is not a valid allow-list index; restore it by hand")


def write_index(path: Path, index: dict[str, dict[str, Any]]) -> None:
    """Replace the index atomically."""
    write_atomic(path, json.dumps(index, indent=2, sort_keys=True) + "\n", PUBLIC)


def allowlist_entries(out_dir: Path) -> dict[str, Allowed]:
    """Every allow-listed institution, each key file checked against its fingerprint.

    Raises
    ------
    ProvisionError
        If the index is missing or invalid, or a key file does not match its entry.
    """
    index_path = Path(out_dir) / "allowlist" / INDEX
    if not index_path.exists():
        raise ProvisionError(f"No allow-list at {index_path}; run `flower-server provision` "
                             "first")
    out: dict[str, Allowed] = {}
    for name, entry in read_index(index_path).items():
        path = index_path.parent / entry["public-key"]
        if not path.is_file() or key_file_fingerprint(path) != entry["sha256"]:
            raise ProvisionError(f"Public key {path} does not match the allow-list entry")
        out[name] = Allowed(path, entry["sha256"], entry["expected-examples"])
    return out


def load_allowlist(out_dir: Path) -> dict[str, Path]:
    """Return institution -> public-key file, checking each file against its fingerprint."""
    return {name: entry.public_key for name, entry in allowlist_entries(out_dir).items()}

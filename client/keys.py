"""The institution's own node key, and its trust in the federation CA.

``flower-client keygen --dir FOLDER`` creates the institution's node key pair in its
own folder: ``node.key`` (OpenSSH, ECDSA P-384, mode 0600; it never leaves the
institution) and ``node.pub``, which the institution sends to the coordinator, who
puts it on the allow-list (``flower-server provision --public-key``). Both sides
compare the key's fingerprint out of band, and the CA certificate's fingerprint the
other way round: the kit's ``client.toml`` pins ``ca-sha256`` and :func:`check_ca`
refuses a ``ca.pem`` that does not match it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsilo.common.atomic import write_atomic
from fedsilo.common.certs import (
    ca_fingerprint,
    outside_validity,
    public_key_fingerprint,
    same_fingerprint,
)

log = logging.getLogger(__name__)

PRIVATE_KEY, PUBLIC_KEY = "node.key", "node.pub"


class TrustError(ValueError):
    """A key or CA certificate the institution must not use; the message says how to fix it."""


@dataclass(frozen=True)
class NodeKey:
    """The files :func:`keygen` wrote and the public key's fingerprint."""

    private: Path
    public: Path
    fingerprint: str


def keygen(folder: Path, institution: str = "") -> NodeKey:
    """Create the institution's node key pair in ``folder``; never overwrite one.

    Raises
    ------
    TrustError
        If ``folder`` already holds a node key (or its public half).
    """
    folder = Path(folder).expanduser().resolve()
    private, public = folder / PRIVATE_KEY, folder / PUBLIC_KEY
    for path in (private, public):
        if path.exists():
            raise TrustError(f"{path} already exists; keygen never replaces a key. Use it, or "
                             "move it away first (the coordinator must then register the new "
                             "public key)")
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    write_atomic(private, key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.OpenSSH,
                                            serialization.NoEncryption()), 0o600)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH)
    comment = f" fedsilo:{institution}" if institution else " fedsilo"
    write_atomic(public, line + comment.encode() + b"\n", 0o644)
    return NodeKey(private, public, public_key_fingerprint(key.public_key()))


def check_ca(cert_path: Path, pinned: str | None) -> str:
    """Refuse a CA file that is not a current CA certificate matching the pin.

    Returns the CA certificate's SHA-256 fingerprint. Without a pin (a kit from an
    older fedsilo) it only warns: compare the fingerprint with the coordinator's.

    Raises
    ------
    TrustError
        Naming ``root-certificates`` or ``ca-sha256`` and how to fix it.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as err:
        raise TrustError(f"root-certificates {cert_path}: not a readable PEM certificate "
                         f"({err}); use the ca.pem from the kit") from None
    if (when := outside_validity(cert)) is not None:
        raise TrustError(f"root-certificates {cert_path}: the CA certificate is {when}; ask "
                         "the coordinator for a current kit (and check this host's clock)")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise TrustError(f"root-certificates {cert_path}: not a CA certificate; use the "
                         "ca.pem from the kit")
    actual = ca_fingerprint(cert)
    if pinned is not None and not same_fingerprint(pinned, actual):
        raise TrustError(
            f"root-certificates {cert_path}: its SHA-256 fingerprint {actual} is not the "
            f"ca-sha256 {pinned} that client.toml pins: this is not the federation CA the "
            "coordinator provisioned. Do not connect; get ca.pem from the coordinator again "
            "and compare the fingerprint with the one it printed")
    if pinned is None:
        log.warning("client.toml pins no ca-sha256: compare the CA fingerprint %s with the one "
                    "the coordinator printed, then add ca-sha256 = \"%s\" to client.toml",
                    actual, actual)
    return actual


def check_private_key(key_path: Path) -> None:
    """Refuse a node key that others may read or that Flower cannot load.

    Raises
    ------
    TrustError
        Naming ``auth-private-key`` and how to fix it.
    """
    try:
        mode = key_path.stat().st_mode
    except OSError as err:
        raise TrustError(f"auth-private-key {key_path}: cannot read it ({err}); point it at "
                         "the node.key `flower-client keygen` made in this institution's "
                         "folder") from None
    if mode & 0o077:
        raise TrustError(f"auth-private-key {key_path}: permissions {mode & 0o777:04o} are "
                         "too open (readable by group or others); run "
                         f"`chmod 600 {key_path}`")
    try:
        key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise TrustError(f"auth-private-key {key_path}: not a readable OpenSSH private key "
                         f"({err}); create one with `flower-client keygen`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TrustError(f"auth-private-key {key_path}: not an EC key (Flower needs ECDSA); "
                         "create one with `flower-client keygen`")

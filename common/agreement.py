"""The federation agreement: the data-use terms an institution's privacy officer approves.

The coordinator issues it (``flower-server agreement``), signed with the key of its
TLS server certificate: a certificate the federation CA issued, that is not a CA
itself and is meant for a server (extended key usage serverAuth). An agreement signed
with the CA key itself, or by any other certificate, is refused. The document is::

    {"schema": "fedsilo.agreement/2", "federation": NAME, "terms": {...},
     "issued": ISO time, "expires": ISO time, "certificate": PEM, "signature": base64}

The signature covers every field but ``signature``, and the agreement's id is the
SHA-256 of exactly those signed bytes, so neither can differ without the other (an
ECDSA signature can be re-encoded; the id does not depend on it).

The terms pin every run setting (the flat run config) except those in
:data:`COORDINATOR_ONLY_KEYS`, plus the label map and the SHA-256 of the model files,
of fedsilo's code and of the app bundle, and fedsilo's version. A setting added to
fedsilo later is therefore pinned unless it is listed there. A run must match every
term, except that it may ask for a smaller ``target-epsilon`` and ``target-delta``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedsilo.common.certs import outside_validity
from fedsilo.common.config import FedsiloConfig

SCHEMA = "fedsilo.agreement/2"
#: Schemas of earlier fedsilo versions: refused, with a request to re-approve.
OLD_SCHEMAS = ("fedsilo.agreement/1",)
DEFAULT_VALID_DAYS = 90

#: Run-config keys an agreement does not pin: how and where the coordinator runs,
#: its own evaluation, the simulation's split into virtual institutions, and what
#: each institution sets for itself (its data, columns, split and device), which a
#: deployed institution takes from its own client.toml, never from the run.
COORDINATOR_ONLY_KEYS: tuple[str, ...] = (
    "output-dir", "resume", "round-timeout", "straggler-timeout", "join-timeout",
    "min-train", "min-available", "fraction-train", "agreement-id", "mlflow",
    "eval-data", "holdout-fraction",
    "partition", "dirichlet-alpha", "partition-column",
    "device", "data", "text-column", "label-column", "test-fraction", "max-examples",
)
#: Terms a run may set lower than approved (a smaller privacy loss).
AT_MOST_TERMS = ("target-epsilon", "target-delta")


class AgreementError(ValueError):
    """An agreement that cannot be trusted, or a run it does not allow."""


def fedsilo_version() -> str:
    """The installed fedsilo distribution's version."""
    try:
        return version("fedsilo")
    except PackageNotFoundError:
        return "unknown"


def run_terms(cfg: FedsiloConfig, labels: Sequence[str], *, model_sha256: str,
              app_sha256: str, code_sha256: str) -> dict[str, Any]:
    """The terms a run with settings ``cfg`` runs under (what an agreement pins)."""
    terms: dict[str, Any] = {k: v for k, v in cfg.to_flat().items()
                             if k not in COORDINATOR_ONLY_KEYS}
    terms.update({"labels": list(labels), "model-sha256": model_sha256,
                  "code-sha256": code_sha256, "app-sha256": app_sha256,
                  "fedsilo-version": fedsilo_version()})
    return terms


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _signed_part(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "signature"}


def check_signer(cert: x509.Certificate, source: str) -> None:
    """Refuse a signing certificate that is not a coordinator (server) certificate.

    Raises
    ------
    AgreementError
        If ``cert`` is a CA (or says nothing about it), is not for serverAuth, or
        may not sign.
    """
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = None
    try:
        eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        eku = []
    try:
        signs = cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    except x509.ExtensionNotFound:
        signs = True
    if is_ca is not False or ExtendedKeyUsageOID.SERVER_AUTH not in eku or not signs:
        raise AgreementError(
            f"{source}: signed with a certificate that is not the coordinator's server "
            "certificate (only a certificate the federation CA issued for the server, with "
            "CA:FALSE and serverAuth, may sign an agreement; the CA key itself may not); "
            "do not approve it")


def issue(name: str, terms: Mapping[str, Any], key: ec.EllipticCurvePrivateKey,
          certificate: x509.Certificate, valid_days: int | None = None) -> dict[str, Any]:
    """A signed agreement document for ``terms``, valid ``valid_days`` from now.

    ``None`` means :data:`DEFAULT_VALID_DAYS`, or less when the signing certificate
    expires sooner (an agreement cannot outlive the certificate that vouches for it).

    Raises
    ------
    AgreementError
        For a signing certificate that may not sign agreements, or an explicit
        ``valid_days`` beyond that certificate's end.
    """
    check_signer(certificate, "the server certificate")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    end = certificate.not_valid_after_utc
    if valid_days is not None and valid_days < 1:
        raise AgreementError(f"--valid-days {valid_days}: give a whole number of days ≥ 1")
    expires = now + dt.timedelta(days=valid_days or DEFAULT_VALID_DAYS)
    if expires > end:
        if valid_days is not None:
            raise AgreementError(
                f"--valid-days {valid_days}: the server certificate that signs the agreement "
                f"expires on {end:%Y-%m-%d}; give fewer days, or renew the certificate "
                "(flower-server provision) first")
        expires = end
    body = {"schema": SCHEMA, "federation": name, "terms": dict(terms),
            "issued": now.isoformat(), "expires": expires.isoformat(),
            "certificate": certificate.public_bytes(serialization.Encoding.PEM).decode()}
    signature = key.sign(_canonical(body), ec.ECDSA(hashes.SHA256()))
    return {**body, "signature": base64.b64encode(signature).decode()}


def agreement_id(doc: Mapping[str, Any]) -> str:
    """The agreement's identity: SHA-256 of exactly its signed part (first 16 hex digits)."""
    return hashlib.sha256(_canonical(_signed_part(doc))).hexdigest()[:16]


def expired(doc: Mapping[str, Any], now: dt.datetime | None = None) -> str | None:
    """Say when ``doc`` expired if it has (or has no readable expiry), else None."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        end = dt.datetime.fromisoformat(str(doc["expires"]))
    except (KeyError, ValueError):
        return "(it has no valid 'expires' time)"
    if end.tzinfo is None:
        return "(its 'expires' time has no time zone)"
    return None if now < end else f"on {end:%Y-%m-%d %H:%M} UTC"


def verify(doc: Mapping[str, Any], ca: x509.Certificate, source: str) -> dict[str, Any]:
    """Check signer, signature and expiry against the federation CA; return the terms.

    Raises
    ------
    AgreementError
        Naming ``source`` and what failed.
    """
    schema = doc.get("schema") if isinstance(doc, Mapping) else None
    if schema in OLD_SCHEMAS:
        raise AgreementError(
            f"{source}: an agreement of the old schema {schema!r}, which this fedsilo no "
            f"longer accepts (it pinned fewer settings); ask the coordinator to issue a "
            "new one with `flower-server agreement` and approve that")
    try:
        body = _signed_part(doc)
        if set(body) != {"schema", "federation", "terms", "issued", "expires", "certificate"}:
            raise ValueError(f"fields {sorted(body)}")
        if not isinstance(body["terms"], dict) or not isinstance(body["federation"], str):
            raise ValueError("'terms' must be an object and 'federation' a name")
        signature = base64.b64decode(doc["signature"])
        cert = x509.load_pem_x509_certificate(str(body["certificate"]).encode())
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise AgreementError(f"{source}: not a fedsilo agreement ({err})") from None
    if schema != SCHEMA:
        raise AgreementError(f"{source}: schema {schema!r}, expected {SCHEMA!r}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise AgreementError(f"{source}: its certificate is not issued by the federation CA "
                             "in your kit (root-certificates); do not approve it") from None
    check_signer(cert, source)
    if (when := outside_validity(cert)) is not None:
        raise AgreementError(f"{source}: its certificate is not valid now ({when})")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise AgreementError(f"{source}: unsupported key type {type(public).__name__}")
    try:
        public.verify(signature, _canonical(body), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AgreementError(f"{source}: the signature does not match its content: it was "
                             "changed after the coordinator signed it") from None
    if (when := expired(body)) is not None:
        raise AgreementError(f"{source}: the agreement expired {when}; ask the coordinator "
                             "for a new one")
    return dict(body["terms"])


def differences(approved: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    """Each term in which ``run`` goes beyond ``approved``, as a readable phrase."""
    out = []
    for key in sorted(set(approved) | set(run)):
        want, got = approved.get(key), run.get(key)
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool)
                      for v in (want, got))
        if key == "target-epsilon" and numbers:
            ok = got <= want
        elif key == "target-delta" and numbers:  # 0 = the automatic δ, a term of its own
            ok = got == want or (want > 0 and 0 < got <= want)
        else:
            ok = want == got if numbers else (want == got and type(want) is type(got))
        if not ok:
            out.append(f"{key} (approved {_short(want)}, this run {_short(got)})")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "…"

"""The federation agreement: the data-use terms an institution's privacy officer approves.

The coordinator issues it (``flower-server agreement``) signed with its TLS server key;
the signature, and the server certificate's chain to the federation CA in each kit,
prove who issued it. An institution approves it once (``flower-client approve``), which
stores it beside the ledger. From then on that institution runs only a run that names
an approved agreement and matches its terms:

- task: the label map;
- model: the checkpoint's name and the SHA-256 of its files, the trainable part;
- code: the fedsilo version, the SHA-256 of its code and of the app bundle;
- rounds: the number of rounds;
- privacy: DP on, its level, the most ε the run may spend (a run may spend less), δ
  (a run may use a smaller one), the clipping norm and the accountant.
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

from fedsilo.common.certs import outside_validity
from fedsilo.common.config import FedsiloConfig

SCHEMA = "fedsilo.agreement/1"


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
    p = cfg.privacy
    return {
        "labels": list(labels), "model": cfg.model.model,
        "model-sha256": model_sha256, "trainable": cfg.model.trainable,
        "fedsilo-version": fedsilo_version(), "code-sha256": code_sha256,
        "app-sha256": app_sha256, "num-rounds": cfg.federation.num_rounds,
        "dp": p.dp, "dp-level": p.dp_level, "target-epsilon": p.target_epsilon,
        "target-delta": p.target_delta, "max-grad-norm": p.max_grad_norm,
        "accountant": p.accountant,
    }


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def issue(name: str, terms: Mapping[str, Any], key: ec.EllipticCurvePrivateKey,
          certificate: x509.Certificate) -> dict[str, Any]:
    """A signed agreement document for ``terms``."""
    body = {"schema": SCHEMA, "federation": name, "terms": dict(terms),
            "issued": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "certificate": certificate.public_bytes(serialization.Encoding.PEM).decode()}
    signature = key.sign(_canonical(body), ec.ECDSA(hashes.SHA256()))
    return {**body, "signature": base64.b64encode(signature).decode()}


def agreement_id(doc: Mapping[str, Any]) -> str:
    """The agreement's identity: SHA-256 of its signed document (first 16 hex digits)."""
    return hashlib.sha256(_canonical(doc)).hexdigest()[:16]


def verify(doc: Mapping[str, Any], ca: x509.Certificate, source: str) -> dict[str, Any]:
    """Check the issuer's certificate against the CA and the signature; return the terms.

    Raises
    ------
    AgreementError
        Naming ``source`` and what failed.
    """
    try:
        body = {k: doc[k] for k in ("schema", "federation", "terms", "issued", "certificate")}
        signature = base64.b64decode(doc["signature"])
        cert = x509.load_pem_x509_certificate(str(doc["certificate"]).encode())
    except (KeyError, TypeError, ValueError) as err:
        raise AgreementError(f"{source}: not a fedsilo agreement ({err})") from None
    if body["schema"] != SCHEMA:
        raise AgreementError(f"{source}: schema {body['schema']!r}, expected {SCHEMA!r}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise AgreementError(f"{source}: its certificate is not issued by the federation CA "
                             "in your kit (root-certificates); do not approve it") from None
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
    return dict(body["terms"])


def differences(approved: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    """Each term in which ``run`` goes beyond ``approved``, as a readable phrase."""
    out = []
    for key in sorted(set(approved) | set(run)):
        want, got = approved.get(key), run.get(key)
        numbers = isinstance(want, int | float) and isinstance(got, int | float)
        if key == "target-epsilon" and numbers:
            ok = got <= want
        elif key == "target-delta" and numbers:  # 0 = the automatic δ, a term of its own
            ok = got == want or (want > 0 and 0 < got <= want)
        else:
            ok = want == got
        if not ok:
            out.append(f"{key} (approved {_short(want)}, this run {_short(got)})")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "…"

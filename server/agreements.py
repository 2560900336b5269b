"""The coordinator's side of the federation agreement: issue it, and run only under it.

``flower-server agreement --name NAME --out FILE [--valid-days N] [run flags]`` writes
the terms of the run those flags describe, signed with the coordinator's TLS server key
(its certificate, issued by the federation CA every kit holds, is the only kind of
certificate institutions accept as signer). ``flower-server --agreement FILE [run
flags]`` checks that the agreement is valid and unexpired and that the run matches it
before it starts, and names it in the run config, so institutions can check it too
(:mod:`fedsilo.client.agreements`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from fedsilo.common.agreement import (
    AgreementError,
    agreement_id,
    differences,
    issue,
    run_terms,
    verify,
)
from fedsilo.common.atomic import write_atomic
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.integrity import app_sha256, code_sha256, model_sha256
from fedsilo.common.model import resolve_model_path
from fedsilo.common.task import federation_labels
from fedsilo.server.launch import write_thin_app


def coordinator_terms(cfg: FedsiloConfig) -> dict[str, Any]:
    """The terms of the run ``cfg``, with the hashes of this host's model, app and code."""
    model = Path(resolve_model_path(cfg.model.model))
    if not model.is_dir():
        raise AgreementError(f"--model {cfg.model.model}: an agreement pins the model's files, "
                             "so give a local folder (or the bundled default)")
    with tempfile.TemporaryDirectory() as tmp:
        app = app_sha256(write_thin_app(Path(tmp), cfg))
    return run_terms(cfg, federation_labels(cfg).names, model_sha256=model_sha256(model),
                     app_sha256=app, code_sha256=code_sha256())


def write_agreement(cfg: FedsiloConfig, name: str, pki: dict[str, Path], out: Path,
                    valid_days: int | None = None) -> str:
    """Sign the run's terms with the server key; write the agreement; return its id.

    ``valid_days`` of None is :data:`fedsilo.common.agreement.DEFAULT_VALID_DAYS`.
    """
    key = load_pem_private_key(pki["key"].read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AgreementError(f"{pki['key']}: the server key must be an EC key "
                             "(as flower-server provision makes it)")
    cert = x509.load_pem_x509_certificate(pki["cert"].read_bytes())
    doc = issue(name, coordinator_terms(cfg), key, cert, valid_days)
    write_atomic(out, json.dumps(doc, indent=1), 0o644)
    return agreement_id(doc)


def run_under(cfg: FedsiloConfig, path: Path, ca_file: Path) -> FedsiloConfig:
    """Check that run ``cfg`` matches the agreement at ``path``; return it naming the id."""
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as err:
        raise AgreementError(f"--agreement {path}: cannot read it ({err})") from None
    terms = verify(doc, x509.load_pem_x509_certificate(ca_file.read_bytes()), str(path))
    diffs = differences(terms, coordinator_terms(cfg))
    if diffs:
        raise AgreementError(f"--agreement {path}: this run differs from the agreement in "
                             + "; ".join(diffs) + "; run with the agreed settings or issue "
                             "a new agreement")
    return cfg.replace(agreement_id=agreement_id(doc))

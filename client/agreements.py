"""An institution's approved federation agreements, and the check every run must pass.

``flower-client approve AGREEMENT`` verifies the coordinator's signature against the
kit's CA, shows the terms, and stores the agreement in ``<ledger-dir>/agreements/``.
Once one is stored, every train or evaluate message is checked before any data is
read: the run must name an approved agreement (run config ``agreement-id``) and match
its terms — the app bundle, fedsilo's code, the model files, the label map, the rounds
and the privacy terms — or the institution declines it, naming each differing term.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from fedsilo.client.policy import PolicyError
from fedsilo.common.agreement import (
    AgreementError,
    agreement_id,
    differences,
    run_terms,
    verify,
)
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.integrity import app_sha256, code_sha256, model_sha256
from fedsilo.common.model import resolve_model_path
from fedsilo.common.task import federation_labels

log = logging.getLogger(__name__)

FOLDER = "agreements"


def approved(ledger_dir: Path) -> dict[str, dict[str, Any]]:
    """The approved agreements by id (empty when none was approved)."""
    folder = ledger_dir / FOLDER
    docs = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        doc = json.loads(path.read_text("utf-8"))
        docs[agreement_id(doc)] = doc
    return docs


def approve(path: Path, ledger_dir: Path, ca_file: Path,
            confirm: Callable[[str], bool]) -> str:
    """Verify, show and (if ``confirm`` says yes) store an agreement; return its id.

    Raises
    ------
    AgreementError
        For an unreadable, untrusted or altered agreement, or when not confirmed.
    """
    try:
        doc = json.loads(path.read_text("utf-8"))
        ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    except (OSError, ValueError) as err:
        raise AgreementError(f"{path}: cannot read the agreement or root-certificates "
                             f"{ca_file} ({err})") from None
    terms = verify(doc, ca, str(path))
    ident = agreement_id(doc)
    shown = "\n".join(f"  {k:16} {json.dumps(v)}" for k, v in sorted(terms.items()))
    log.info("agreement %s for federation %r, issued %s, terms:\n%s", ident,
             doc["federation"], doc["issued"], shown)
    if not confirm(f"approve agreement {ident} for this institution's data? [y/N] "):
        raise AgreementError(f"{path}: not approved; nothing stored")
    folder = ledger_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{ident}.json").write_text(json.dumps(doc, indent=1), "utf-8")
    log.info("approved: stored in %s; from now on this institution runs only what matches an "
             "approved agreement", folder / f"{ident}.json")
    return ident


def local_terms(cfg: FedsiloConfig, app: Path | None) -> dict[str, Any]:
    """The terms of the run ``cfg`` as this institution sees it (hashes computed here).

    ``app`` is the Flower app bundle the ClientApp process was loaded from, if any.
    """
    model = Path(resolve_model_path(cfg.model.model))
    return run_terms(cfg, federation_labels(cfg).names,
                     model_sha256=model_sha256(model) if model.is_dir() else "not a local folder",
                     app_sha256=app_sha256(app) if app else "not loaded from an app bundle",
                     code_sha256=code_sha256())


def check_run(cfg: FedsiloConfig, ledger_dir: Path, app: Path | None) -> None:
    """Decline a run no approved agreement allows (no-op before any approval).

    ``app`` is the app bundle the message's ClientApp process was loaded from.

    Raises
    ------
    PolicyError
        Naming the agreement and every differing term.
    """
    docs = approved(ledger_dir)
    if not docs:
        return
    wanted = cfg.federation.agreement_id
    if wanted not in docs:
        raise PolicyError(f"declined: the run names agreement {wanted or '(none)'!r}, which "
                          f"this institution has not approved (approved: {', '.join(docs)}); "
                          "the coordinator runs with --agreement FILE, the institution "
                          "approves FILE with flower-client approve")
    diffs = differences(docs[wanted]["terms"], local_terms(cfg, app))
    if diffs:
        raise PolicyError(f"declined: the run differs from approved agreement {wanted} in "
                          + "; ".join(diffs))

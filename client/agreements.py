"""An institution's approved federation agreements, and the check every run must pass.

``flower-client approve AGREEMENT`` verifies the coordinator's signature against the
kit's CA (the signer must be the coordinator's server certificate, not the CA), shows
the terms and their expiry, and stores an approval record in
``<ledger-dir>/agreements/``. A deployed institution runs nothing else: every train or
evaluate message is checked before any data is read, and declined unless

- it names (run config ``agreement-id``) an agreement this institution approved;
- that agreement is the latest one approved for its federation (a newer approval
  supersedes the older ones);
- it has not expired;
- the run matches its terms (every pinned setting, the app bundle, fedsilo's code,
  the model files, the label map), except a smaller ε or δ.

No approval (an empty or deleted folder) means no run: enforcement cannot be turned
off by removing files. Agreements of the old schema are no longer honoured; the
institution is told to re-approve. Virtual institutions of a simulation do not use
agreements (the caller does not call :func:`check_run` for them).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from fedsilo.client.policy import PolicyError
from fedsilo.common.agreement import (
    OLD_SCHEMAS,
    AgreementError,
    agreement_id,
    differences,
    expired,
    run_terms,
    verify,
)
from fedsilo.common.atomic import write_json_atomic
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.integrity import code_sha256, model_sha256
from fedsilo.common.model import resolve_model_path
from fedsilo.common.task import federation_labels

log = logging.getLogger(__name__)

FOLDER = "agreements"
APPROVAL = "fedsilo.approval/1"
REAPPROVE = ("ask the coordinator for an agreement issued by this fedsilo (flower-server "
             "agreement) and approve it with `flower-client approve AGREEMENT --config "
             "client.toml`")


@dataclass(frozen=True)
class Approval:
    """One stored approval: the agreement and when (in which order) it was approved."""

    ident: str
    sequence: int
    approved: str
    doc: dict[str, Any]

    @property
    def federation(self) -> str:
        """The federation the agreement is for."""
        return str(self.doc["federation"])


@dataclass(frozen=True)
class Approvals:
    """What ``<ledger-dir>/agreements/`` holds."""

    current: dict[str, Approval]
    old_schema: tuple[str, ...]

    def latest(self, federation: str) -> Approval:
        """The newest approval for ``federation`` (the one runs may use)."""
        return max((a for a in self.current.values() if a.federation == federation),
                   key=lambda a: a.sequence)


def load_approvals(ledger_dir: Path) -> Approvals:
    """Read the approvals beside the ledger.

    Raises
    ------
    PolicyError
        For a file that is neither an approval nor an old agreement (nothing runs
        until the operator removes or restores it).
    """
    folder = ledger_dir / FOLDER
    current: dict[str, Approval] = {}
    old: list[str] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text("utf-8"))
            if record.get("schema") in OLD_SCHEMAS:
                old.append(path.stem)
                continue
            if record.get("schema") != APPROVAL:
                raise ValueError(f"schema {record.get('schema')!r}")
            doc = dict(record["agreement"])
            current[agreement_id(doc)] = Approval(agreement_id(doc), int(record["sequence"]),
                                                  str(record["approved"]), doc)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.error("%s: not a readable approval (%s); restore it or remove it", path, err)
            raise PolicyError("declined: this institution's stored approvals are unreadable; "
                              "its operator must restore or remove the file named in its "
                              "log") from None
    return Approvals(current, tuple(old))


def approve(path: Path, ledger_dir: Path, ca_file: Path,
            confirm: Callable[[str], bool]) -> str:
    """Verify, show and (if ``confirm`` says yes) store an agreement; return its id.

    Raises
    ------
    AgreementError
        For an unreadable, untrusted, altered, expired or old-schema agreement, or
        when not confirmed.
    """
    try:
        doc = json.loads(path.read_text("utf-8"))
        ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    except (OSError, ValueError) as err:
        raise AgreementError(f"{path}: cannot read the agreement or root-certificates "
                             f"{ca_file} ({err})") from None
    if not isinstance(doc, dict):
        raise AgreementError(f"{path}: not a fedsilo agreement (not a JSON object)")
    terms = verify(doc, ca, str(path))
    ident = agreement_id(doc)
    shown = "\n".join(f"  {k:22} {json.dumps(v)}" for k, v in sorted(terms.items()))
    log.info("agreement %s for federation %r, issued %s, expires %s, terms:\n%s", ident,
             doc["federation"], doc["issued"], doc["expires"], shown)
    try:
        stored = load_approvals(ledger_dir)
    except PolicyError as err:
        raise AgreementError(str(err)) from None
    if any(a.federation == doc["federation"] for a in stored.current.values()):
        before = stored.latest(doc["federation"])
        if before.ident != ident:
            log.warning("approving it supersedes agreement %s (approved %s) for federation "
                        "%r: runs under that one will be declined", before.ident,
                        before.approved, doc["federation"])
    if not confirm(f"approve agreement {ident} for this institution's data? [y/N] "):
        raise AgreementError(f"{path}: not approved; nothing stored")
    sequence = 1 + max((a.sequence for a in stored.current.values()), default=0)
    target = ledger_dir / FOLDER / f"{ident}.json"
    write_json_atomic(target, {"schema": APPROVAL, "sequence": sequence, "approved":
                               dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                               "agreement": doc})
    log.info("approved: stored in %s; from now on this institution runs only what matches "
             "this agreement for federation %r", target, doc["federation"])
    return ident


def summary(ledger_dir: Path) -> list[str]:
    """One line per stored approval (current, superseded or expired) for the operator.

    Raises
    ------
    AgreementError
        When a stored approval is unreadable (its path is logged).
    """
    try:
        stored = load_approvals(ledger_dir)
    except PolicyError as err:
        raise AgreementError(f"{ledger_dir / FOLDER}: {err}") from None
    lines = [f"agreement {i}: of the old schema, no longer honoured; {REAPPROVE}"
             for i in stored.old_schema]
    for a in sorted(stored.current.values(), key=lambda a: a.sequence):
        state = ("superseded by " + stored.latest(a.federation).ident
                 if stored.latest(a.federation).ident != a.ident else
                 f"expired {when}" if (when := expired(a.doc)) else "in force")
        lines.append(f"agreement {a.ident} for federation {a.federation!r}: approved "
                     f"{a.approved}, expires {a.doc.get('expires')}: {state}")
    return lines or [f"no federation agreement approved: every run is declined until one "
                     f"is ({REAPPROVE})"]


def local_terms(cfg: FedsiloConfig, app_sha256: str | None) -> dict[str, Any]:
    """The terms of the run ``cfg`` as this institution sees it (hashes computed here).

    ``app_sha256`` is the hash of the app bundle the run came with (None: none).
    """
    model = Path(resolve_model_path(cfg.model.model))
    return run_terms(cfg, federation_labels(cfg).names,
                     model_sha256=model_sha256(model) if model.is_dir() else "not a local folder",
                     app_sha256=app_sha256 or "not from an app bundle",
                     code_sha256=code_sha256())


def check_run(cfg: FedsiloConfig, ledger_dir: Path, app_sha256: str | None) -> None:
    """Decline a run that no agreement in force at this institution allows.

    Parameters
    ----------
    cfg
        The run config the coordinator sent (before the institution's own settings).
    ledger_dir
        The institution's ledger folder; approvals live in its ``agreements/``.
    app_sha256
        Hash of the app bundle the run came with (None: not from a bundle).

    Raises
    ------
    PolicyError
        Naming what is missing, the newer agreement, the expiry or every differing term.
        Its message leaves the institution, so it holds no local path or data.
    """
    stored = load_approvals(ledger_dir)
    wanted = cfg.federation.agreement_id
    if wanted in stored.old_schema or (stored.old_schema and not stored.current):
        raise PolicyError(f"declined: this institution's approval of agreement "
                          f"{wanted or stored.old_schema[0]} is of the old schema, no longer "
                          f"honoured; {REAPPROVE}")
    if not stored.current:
        log.warning("no approved agreement in %s: declining", ledger_dir / FOLDER)
        raise PolicyError("declined: this institution has approved no federation agreement "
                          "and runs nothing without one; the coordinator issues one with "
                          "`flower-server agreement` and runs with --agreement FILE, the "
                          "institution approves FILE with `flower-client approve`")
    if wanted not in stored.current:
        raise PolicyError(f"declined: the run names agreement {wanted or '(none)'!r}, which "
                          f"this institution has not approved (in force: "
                          f"{', '.join(a.ident for a in _in_force(stored)) or 'none'}); the "
                          "coordinator runs with "
                          "--agreement FILE, the institution approves FILE with "
                          "`flower-client approve`")
    this = stored.current[wanted]
    latest = stored.latest(this.federation)
    if latest.ident != wanted:
        raise PolicyError(f"declined: agreement {wanted} for federation {this.federation!r} "
                          f"is superseded by agreement {latest.ident}, approved later; run "
                          f"under {latest.ident}")
    if (when := expired(this.doc)) is not None:
        raise PolicyError(f"declined: agreement {wanted} expired {when}; the coordinator "
                          "issues a new one for the institution to approve")
    diffs = differences(this.doc["terms"], local_terms(cfg, app_sha256))
    if diffs:
        raise PolicyError(f"declined: the run differs from approved agreement {wanted} in "
                          + "; ".join(diffs))


def _in_force(stored: Approvals) -> list[Approval]:
    """The latest approval of each federation, unless it has expired."""
    names = sorted({a.federation for a in stored.current.values()})
    return [a for a in map(stored.latest, names) if expired(a.doc) is None]


def approved_bundles(ledger_dir: Path) -> set[str]:
    """The app-bundle hashes (``app-sha256``) that the agreements in force pin.

    Empty when nothing is approved (or all approvals expired): a runtime that serves
    only these bundles serves none. :func:`check_run` then checks every other term.
    """
    return {str(a.doc["terms"].get("app-sha256")) for a in _in_force(load_approvals(ledger_dir))}

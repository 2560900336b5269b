"""How much of this institution's text the agreed ``max-length`` cuts (``flower-client --check``).

The coordinator proposes the length and the agreement pins it; only the institution
can see what it does to its own texts. The share is computed and shown here and
never leaves the institution.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedsilo.client.agreements import load_approvals
from fedsilo.client.policy import LEDGER_KEY
from fedsilo.common import lengths
from fedsilo.common.agreement import expired
from fedsilo.common.config import DEFAULT_MODEL, ModelConfig
from fedsilo.common.data import load_records
from fedsilo.common.model import load_tokenizer

log = logging.getLogger("fedsilo.client")


def length_check(settings: dict[str, Any]) -> dict[str, float]:
    """Log the share of local texts each agreement in force truncates; return it by id."""
    stored = load_approvals(Path(settings[LEDGER_KEY]))
    in_force = [stored.latest(f) for f in sorted({a.federation for a in stored.current.values()})]
    in_force = [a for a in in_force if expired(a.doc) is None]
    if not in_force:
        log.info("no agreement in force: the share of texts its max length cuts is shown "
                 "once one is approved")
        return {}
    records = load_records(settings["data"], settings.get("text-column", "text"),
                           settings.get("label-column", "label"))
    tokenizer = load_tokenizer(ModelConfig(model=settings.get("model", DEFAULT_MODEL)))
    measured = lengths.token_lengths(tokenizer, records.texts)
    shares: dict[str, float] = {}
    for approval in in_force:
        agreed = int(approval.doc["terms"]["max-length"])
        shares[approval.ident] = share = lengths.truncated_share(measured, agreed)
        log.info("agreement %s (federation %r): max length %d tokens truncates %.1f%% of "
                 "this institution's texts (median %d tokens); this figure stays here",
                 approval.ident, approval.federation, agreed, 100 * share,
                 int(lengths.np.median(measured)) if len(measured) else 0)
        lengths.warn_if_truncated(share, agreed, f"agreement {approval.ident}")
    return shares

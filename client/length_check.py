"""How much of this institution's text the agreed ``max-length`` cuts (``flower-client --check``).

The coordinator proposes the length and the agreement pins it; only the institution
can see what it does to its own texts. The share is computed and shown here and
never leaves the institution.
"""

from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.client.agreements import load_approvals
from fedsilo.client.settings import LEDGER_KEY
from fedsilo.common import lengths
from fedsilo.common.agreement import expired
from fedsilo.common.config import DEFAULT_MODEL, ModelConfig
from fedsilo.common.model import ModelError, load_tokenizer
from fedsilo.common.records import DataError, load_records

log = logging.getLogger("fedsilo.client")


def _measure(settings: dict[str, Any]) -> np.ndarray:
    records = load_records(settings["data"], settings.get("text-column", "text"),
                           settings.get("label-column", "label"))
    tokenizer = load_tokenizer(ModelConfig(model=settings.get("model", DEFAULT_MODEL)))
    return lengths.token_lengths(tokenizer, records.texts)


def _show(measured: np.ndarray, agreed: int, what: str) -> float:
    share = lengths.truncated_share(measured, agreed)
    median = int(np.median(measured)) if len(measured) else 0
    log.info("%s: max length %d tokens truncates %.1f%% of this institution's texts (median "
             "%d tokens); this figure stays here", what, agreed, 100 * share, median)
    lengths.warn_if_truncated(share, agreed, what)
    return share


def before_approval(config: Path, agreement: Path) -> float | None:
    """Show the share of local texts ``agreement``'s max length cuts, before approving it."""
    try:
        settings = tomllib.loads(config.read_text("utf-8"))
        data = Path(settings["data"])
        settings["data"] = str(data if data.is_absolute() else config.parent / data)
        agreed = int(json.loads(agreement.read_text("utf-8"))["terms"]["max-length"])
        return _show(_measure(settings), agreed, f"agreement {agreement.name}")
    except (OSError, ValueError, KeyError, TypeError, DataError, ModelError) as err:
        log.warning("could not measure how much of the local texts the agreement's max "
                    "length cuts (%s); `flower-client --check` shows it after approval", err)
        return None


def length_check(settings: dict[str, Any]) -> dict[str, float]:
    """Log the share of local texts each agreement in force truncates; return it by id."""
    stored = load_approvals(Path(settings[LEDGER_KEY]))
    in_force = [stored.latest(f) for f in sorted({a.federation for a in stored.current.values()})]
    in_force = [a for a in in_force if expired(a.doc) is None]
    if not in_force:
        log.info("no agreement in force: the share of texts its max length cuts is shown "
                 "once one is approved")
        return {}
    measured = _measure(settings)
    return {a.ident: _show(measured, int(a.doc["terms"]["max-length"]),
                           f"agreement {a.ident} (federation {a.federation!r})")
            for a in in_force}

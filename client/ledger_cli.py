"""``flower-client ledger show|confirm``: the operator's view of the privacy budget.

``show`` prints, per dataset in the ledger folder, the three numbers (ε spent over all
runs, the lifetime ε of ``client.toml``'s ``lifetime-epsilon``, ε left) and whether the
ledger is trusted or waits for the operator. ``confirm`` is the operator's decision
after a ledger was found missing, truncated, rolled back or migrated from the old
format: it accepts the current dataset's ledger as it stands (restore a backup first
if one exists: what a lost ledger held is no longer counted).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from fedsilo.client.ledger import Ledger, LedgerError, dataset_fingerprint, dataset_key
from fedsilo.client.ledger_guard import old_ledgers
from fedsilo.client.settings import DEFAULT_LIFETIME_EPSILON, LEDGER_KEY
from fedsilo.common.records import DataError, load_records

log = logging.getLogger("fedsilo.client")


def lifetime(settings: dict[str, Any]) -> float:
    """The institution's lifetime ε per dataset (``lifetime-epsilon`` or the default)."""
    return float(settings.get("lifetime-epsilon", DEFAULT_LIFETIME_EPSILON))


def current_key(settings: dict[str, Any]) -> str:
    """The ledger key of the dataset ``client.toml`` names (``dataset-id`` or its records)."""
    if settings.get("dataset-id"):
        return dataset_key(str(settings["dataset-id"]), [], [])
    raw = load_records(settings["data"], settings.get("text-column", "text"),
                       settings.get("label-column", "label"))
    return dataset_fingerprint(raw.texts, raw.labels)


def show(settings: dict[str, Any]) -> list[str]:
    """Log (and return) one line per dataset: spent / lifetime / left and its state.

    It only reads: old-format ledgers not folded in yet are listed, not folded.
    """
    folder = Path(settings[LEDGER_KEY])
    lines, folded = [], set()
    for path in sorted(folder.glob("dataset-*.json")) if folder.is_dir() else []:
        doc = json.loads(path.read_text("utf-8"))
        ledger = Ledger.open(folder, doc["fingerprint"], doc["accountant"],
                             lifetime=lifetime(settings),
                             state_dir=str(settings.get("state-dir", "")), migrate=False)
        folded |= {e.source for e in ledger.entries}
        delta = ledger.entries[-1].delta if ledger.entries else 1e-5
        runs = {e.run for e in ledger.entries}
        state = f"REFUSED: {ledger.problem}" if ledger.problem else "trusted"
        lines.append(f"dataset {ledger.fingerprint[:12]}…: ε spent {ledger.spent(delta):.4f} / "
                     f"lifetime {ledger.lifetime:g} / left {ledger.left(delta):.4f} at "
                     f"δ={delta:.2e}; {len(ledger.entries)} release(s) in {len(runs)} run(s); "
                     f"{state}")
    lines += [f"old-format ledger {name}: not folded in yet; it will be on the dataset's "
              "first use or by `flower-client ledger confirm` (all its spend counts)"
              for name, digest, _ in old_ledgers(folder) if f"{name} sha256:{digest}" not in folded]
    for line in lines or [f"ledger {folder}: no privacy spent yet (lifetime "
                          f"ε {lifetime(settings):g} per dataset)"]:
        log.info("%s", line)
    return lines


def confirm(settings: dict[str, Any], yes: bool) -> int:
    """Accept the current dataset's ledger as it stands; 0 when done or nothing to do."""
    ledger = Ledger.open(Path(settings[LEDGER_KEY]), current_key(settings),
                         str(settings.get("accountant", "rdp")), lifetime=lifetime(settings),
                         state_dir=str(settings.get("state-dir", "")))
    if not ledger.problem:
        log.info("ledger %s is trusted; nothing to confirm", ledger.path)
        return 0
    log.warning("ledger %s: %s", ledger.path, ledger.problem)
    log.warning("confirming accepts it as it stands: ε spent %s of lifetime %g counts from "
                "now on; restore a backup first if what it lost should still count",
                f"{ledger.spent(ledger.entries[-1].delta):.4f}" if ledger.entries else "0",
                ledger.lifetime)
    if not yes:
        if not sys.stdin.isatty():
            log.error("no terminal to ask on: read the above and run again with --yes")
            return 2
        if input("accept this ledger? [y/N] ").strip().lower() not in ("y", "yes"):
            log.error("not confirmed; training stays refused")
            return 2
    ledger.confirm()
    log.info("confirmed: ledger %s is trusted again", ledger.path)
    return 0


def ledger_main(argv: list[str], load: Any) -> int:
    """``flower-client ledger show|confirm --config client.toml``.

    ``load`` reads client.toml the way ``flower-client`` does (``load_client_config``).
    """
    parser = argparse.ArgumentParser(prog="flower-client ledger", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("action", choices=("show", "confirm"))
    parser.add_argument("--config", type=Path, required=True, help="the kit's client.toml")
    parser.add_argument("--yes", action="store_true",
                        help="confirm without asking (required when there is no terminal)")
    args = parser.parse_args(argv)
    try:
        settings = load(args.config, {})
        if args.action == "show":
            show(settings)
            return 0
        return confirm(settings, args.yes)
    except (ValueError, LedgerError, DataError, OSError) as err:
        log.error("%s", err)
        return 2

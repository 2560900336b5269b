"""The institution's live view: what its node has served, and the privacy it has spent.

It reads the institution's own journal (``journal.jsonl`` beside the ledger, one line
per message served, declined or refused); :mod:`fedsilo.common.live` shows it on a
terminal only, while the SuperNode's log lines scroll above it.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from fedsilo.common import journal

SHOWN = 6  # most recent events in the table


def render(ledger_dir: Path, name: str, budget: object) -> RenderableType:
    """The view of institution ``name`` whose ledger lives in ``ledger_dir``."""
    path = ledger_dir / "journal.jsonl"
    events = journal.read(path) if path.is_file() else []
    trained = [e for e in events if e["event"] == "train"]
    spent = max((e["epsilon"] for e in trained if e.get("epsilon") is not None), default=0.0)
    head = Text(f"{name}: {len(trained)} round(s) trained, ε spent {spent:.3f} of "
                f"{budget if budget is not None else 'the run’s target'}"
                + ("" if events else " · waiting for the coordinator's first round"),
                style="bold")
    table = Table()
    for column in ("time", "run", "round", "event", "examples", "ε after", "sent"):
        table.add_column(column, justify="left" if column in ("time", "event") else "right")
    for e in events[-SHOWN:]:
        sent = e.get("sent") or {}
        eps = e.get("epsilon")
        table.add_row(str(e["time"])[11:19], str(e.get("run", "")), str(e.get("round", "")),
                      e["event"] if "reason" not in e else f"{e['event']}: {e['reason'][:48]}",
                      str(e.get("num_examples", "")), "" if eps is None else f"{eps:.3f}",
                      f"{sent['bytes']:,} B" if "bytes" in sent else "")
    return Group(head, table) if events else head

"""The coordinator's live view: the round in progress and every institution's state.

It reads what the ServerApp writes to the output folder: ``progress.json`` (the
round, phase and replies so far, rewritten as replies arrive) and ``metrics.json``
(every finished round). :mod:`fedsilo.common.live` shows it on a terminal only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from fedsilo.common.live import ONE_OFF, describe_eval, duration, eta


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text("utf-8")) if path.is_file() else {}


def _status(entry: dict[str, Any], name: str) -> str:
    for key in ("failures", "declined", "dropped"):
        if any(text.startswith(name) for text in entry.get(key, [])):
            return {"failures": "rejected/failed", "declined": "declined",
                    "dropped": "dropped"}[key]
    return "aggregated" if name in entry.get("institutions", {}) else "-"


def _head(out: Path, progress: dict[str, Any], rounds: list[dict[str, Any]],
          total: int) -> str:
    left = max(total - len(rounds), 0)
    estimate = eta([r["seconds"] for r in rounds], left)
    line = (f"round {progress['round']}/{total or '?'} · {progress['phase']} · "
            f"{progress['replied']}/{progress['expected']} institutions replied")
    if (out / "metrics.json").is_file():  # rewritten when the previous round finished
        since = time.time() - (out / "metrics.json").stat().st_mtime
        line += f" · {duration(since)} into the round"
    if progress["round"] == 1 and not rounds:
        line += f" ({ONE_OFF})"
    return f"{line} · {estimate}" if estimate else line


def heartbeat(out: Path) -> str | None:
    """The progress line the coordinator logs now and then off a terminal (None: not yet)."""
    metrics, progress = _read(out / "metrics.json"), _read(out / "progress.json")
    if not progress or metrics.get("status") == "completed":
        return None
    rounds = [r for r in metrics.get("rounds", []) if r["round"] > 0]
    return _head(out, progress, rounds, int(metrics.get("config", {}).get("num-rounds", 0) or 0))


def render(out: Path) -> RenderableType:
    """The view of the run writing to ``out``."""
    metrics, progress = _read(out / "metrics.json"), _read(out / "progress.json")
    rounds = [r for r in metrics.get("rounds", []) if r["round"] > 0]
    total = int(metrics.get("config", {}).get("num-rounds", 0) or 0)
    head = Text("waiting for the run to start…", style="dim")
    if progress:
        head = Text(_head(out, progress, rounds, total), style="bold")
    table = Table(expand=False, title=None)
    for column in ("institution", "examples", "train loss", "ε (cumulative)", "last round"):
        table.add_column(column, justify="left" if column == "institution" else "right")
    last = rounds[-1] if rounds else {}
    names = sorted({n for r in rounds for n in r["institutions"]})
    for name in names:
        stats = next((r["institutions"][name] for r in reversed(rounds)
                      if name in r["institutions"]), {})
        eps = stats.get("epsilon")
        table.add_row(name, str(stats.get("num_examples", "")),
                      f"{stats['train_loss']:.4f}" if stats.get("train_loss") is not None else "",
                      "no DP" if eps is None else f"{eps:.3f}", _status(last, name))
    parts: list[RenderableType] = [head]
    # the latest evaluated model (federated evaluation of a round can come a round later)
    evaluated = next((r for r in reversed(rounds)
                      if r.get("centralized_eval") or r.get("federated_eval")), None)
    if evaluated:
        evals = evaluated.get("centralized_eval") or evaluated["federated_eval"]
        parts.append(Text(f"after round {evaluated['round']}: {describe_eval(evals)}"))
    if names:
        parts.append(table)
    return Group(*parts)

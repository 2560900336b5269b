"""Append-only JSON-lines audit journals, kept by the coordinator and by each institution.

One line per event (who, which run and round, what was sent or received: its size and
SHA-256, ε spent), appended with fsync so an event that happened is never lost.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def digest(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """SHA-256 over names, dtypes, shapes and bytes of ``arrays``, and their total bytes."""
    sha = hashlib.sha256()
    size = 0
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        sha.update(json.dumps([name, str(value.dtype), list(value.shape)]).encode("utf-8"))
        sha.update(value.tobytes())
        size += value.nbytes
    return {"sha256": sha.hexdigest(), "bytes": size}


def _plain(value: Any) -> Any:
    """``value`` with every NaN or infinite float written as its name (JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def append(path: Path, event: str, **fields: Any) -> None:
    """Append one event to the journal at ``path`` (created with its folder if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_plain({"time": dt.datetime.now(dt.UTC).isoformat(
        timespec="milliseconds"), "event": event, **fields}), allow_nan=False, default=str)
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read(path: Path) -> list[dict[str, Any]]:
    """All events of a journal, oldest first."""
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]

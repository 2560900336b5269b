"""Re-sending a round's update, byte for byte, when the coordinator asks for it again.

A coordinator that crashes mid-round and resumes asks for that round again. The
institution may already have trained it, counted it in its ledger and released the
update. Training again would release a second noisy update and spend privacy twice;
declining would lose the round. Instead the institution keeps its latest release
(``released/<dataset>-run-<run>-last.npz`` beside the ledger, written before the spend
is recorded) and, for the same run, round and received global model, sends exactly
that update again: re-sending a released output costs no privacy. An update released
under SecAgg+ (masked) is re-sent only masked: a plain resend of that round would show
the coordinator the very update SecAgg+ hid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.common.atomic import atomic_file


@dataclass(frozen=True)
class Release:
    """What one round released: the arrays as they left, and the reply's metrics."""

    server_round: int
    received_sha256: str
    arrays: dict[str, np.ndarray]
    metrics: dict[str, Any]
    masked: bool = False  # released inside a SecAgg+ round


def _path(folder: Path, fingerprint: str, run: int) -> Path:
    return folder / "released" / f"{fingerprint[:32]}-run-{run}-last.npz"


def save(folder: Path, fingerprint: str, run: int, release: Release) -> None:
    """Atomically keep ``release`` as the run's latest (replacing the previous round's)."""
    path = _path(folder, fingerprint, run)
    meta = {"round": release.server_round, "received": release.received_sha256,
            "metrics": release.metrics, "masked": release.masked}
    with atomic_file(path) as f:
        np.savez(f, __meta__=np.array(json.dumps(meta)),
                 **{f"a/{k}": v for k, v in release.arrays.items()})


def load(folder: Path, fingerprint: str, run: int, server_round: int,
         received_sha256: str, masked: bool) -> Release | None:
    """The kept release of this round for this global model, or None.

    None too when the release was masked (SecAgg+) and this request is not, or the
    other way round.
    """
    path = _path(folder, fingerprint, run)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["__meta__"]))
            arrays = {k[2:]: npz[k] for k in npz.files if k.startswith("a/")}
    except (OSError, ValueError, KeyError):
        return None
    if meta["round"] != server_round or meta["received"] != received_sha256 \
            or bool(meta.get("masked", False)) != masked:
        return None
    return Release(server_round, received_sha256, arrays, dict(meta["metrics"]), masked)


"""The coordinator's checkpoint: everything needed to continue a run after a crash.

After every completed round the ServerApp replaces ``<output-dir>/checkpoint.npz``
(temporary file, fsync, rename, so a crash leaves the previous checkpoint intact)
with the global trainable tensors, the strategy's own state (its
:meth:`~fedsilo.server.strategy_base.ReportingMixin.checkpoint_state`), the
round number, the run's identity (the first Flower run id, which institutions' ledgers
key their rounds by), the settings and the metrics so far. ``--resume`` continues with
the next round; the settings must be those of the interrupted run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.common.atomic import atomic_file

FILE = "checkpoint.npz"
SCHEMA = "fedsilo.checkpoint/1"
#: Settings that may differ between the interrupted run and its resumption.
MAY_DIFFER = ("resume", "join-timeout", "round-timeout", "straggler-timeout",
              "fused-evaluation")
#: Settings added after the first checkpoints, each with the value that reproduces a
#: run checkpointed before it existed (until ``pooling``, every head was ``cls``;
#: until ``optimizer``, every institution used AdamW).
ADDED_LATER = {"pooling": "cls", "optimizer": "adamw"}


class CheckpointError(ValueError):
    """No usable checkpoint, or one that belongs to other settings."""


@dataclass
class Checkpoint:
    """A completed round's state."""

    server_round: int
    run_key: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, dict[str, np.ndarray]]
    config: dict[str, Any]
    metrics: dict[str, Any]


def save(folder: Path, ckpt: Checkpoint) -> Path:
    """Atomically replace ``folder/checkpoint.npz`` with ``ckpt``; return its path."""
    path = folder / FILE
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"schema": SCHEMA, "round": ckpt.server_round, "run_key": ckpt.run_key,
            "config": ckpt.config, "metrics": ckpt.metrics}
    payload = {f"arrays/{k}": v for k, v in ckpt.arrays.items()}
    for attr, tensors in ckpt.strategy_state.items():
        payload |= {f"{attr}/{k}": v for k, v in tensors.items()}
    with atomic_file(path) as f:
        np.savez(f, __meta__=np.array(json.dumps(meta, allow_nan=False)), **payload)
    return path


def load(folder: Path) -> Checkpoint:
    """Read ``folder/checkpoint.npz``.

    Raises
    ------
    CheckpointError
        When there is none or it cannot be read.
    """
    path = folder / FILE
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint {path}; a run writes one after each "
                              "completed round. Check --output-dir, or start without --resume")
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["__meta__"]))
            tensors = {k: npz[k] for k in npz.files if k != "__meta__"}
        if meta.get("schema") != SCHEMA:
            raise ValueError(f"schema {meta.get('schema')!r}, expected {SCHEMA!r}")
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"--resume: checkpoint {path} is unreadable ({err})") from None
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        group, _, name = key.partition("/")
        groups.setdefault(group, {})[name] = value
    return Checkpoint(int(meta["round"]), int(meta["run_key"]), groups.pop("arrays", {}),
                      groups, meta["config"], meta["metrics"])


def check_settings(ckpt: Checkpoint, flat: dict[str, Any], path: Path) -> None:
    """Refuse to resume with settings other than the interrupted run's.

    A setting in :data:`ADDED_LATER` that an older checkpoint lacks counts as the
    value that reproduces that run.
    """
    saved = {**{k: v for k, v in ADDED_LATER.items() if k in flat}, **ckpt.config}
    differ = sorted(k for k in set(flat) | set(saved)
                    if k not in MAY_DIFFER and flat.get(k) != saved.get(k))
    if differ:
        shown = ", ".join(f"{k} (checkpoint {saved.get(k)!r}, now {flat.get(k)!r})"
                          for k in differ)
        raise CheckpointError(f"--resume: {path} was written with other settings: {shown}. "
                              "Resume with the interrupted run's settings")

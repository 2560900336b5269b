"""An institution's privacy ledger: what each dataset has spent, kept on its own disk.

One JSON file per dataset, named by the dataset's fingerprint, so the budget follows
the data across runs (not the run). It holds the Opacus accountant's history and a
line per round (run, round, steps, sample rate, noise multiplier, ε after). It is
rewritten atomically (temporary file, fsync, rename) *before* the round's update is
returned, so a crash can never lose spend; a (run, round) already in the ledger is
never trained or counted again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant

from fedsilo.client.privacy import add_steps
from fedsilo.common.atomic import atomic_file, write_json_atomic

SCHEMA = "fedsilo.ledger/1"


class LedgerError(RuntimeError):
    """The ledger file is unreadable or belongs to another dataset or accountant."""


def dataset_fingerprint(texts: list[str], labels: list[str]) -> str:
    """SHA-256 of the (text, label) records, independent of their order."""
    digest = hashlib.sha256()
    for text, label in sorted(zip(texts, labels, strict=True)):
        digest.update(json.dumps([text, label]).encode("utf-8"))
    return digest.hexdigest()


@dataclass(frozen=True)
class Entry:
    """One round an institution trained and released."""

    run: int
    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    delta: float
    epsilon: float
    at: str
    kind: str = "train"  # or "evaluate": a DP-noised evaluation release


@dataclass
class Ledger:
    """The spend of one dataset; load it with :meth:`open`."""

    path: Path
    fingerprint: str
    accountant: str
    entries: list[Entry] = field(default_factory=list)

    @classmethod
    def open(cls, folder: Path, fingerprint: str, accountant: str) -> Ledger:
        """Load the dataset's ledger from ``folder`` (an empty one if none exists)."""
        path = folder / f"{fingerprint[:32]}.json"
        if not path.exists():
            return cls(path, fingerprint, accountant)
        try:
            doc = json.loads(path.read_text("utf-8"))
            entries = [Entry(**e) for e in doc["entries"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LedgerError(f"privacy ledger {path} is unreadable ({err}); restore it from "
                              "a backup: without it this dataset's spend is unknown") from None
        if doc.get("fingerprint") != fingerprint:
            raise LedgerError(f"privacy ledger {path} belongs to another dataset")
        if doc.get("accountant") != accountant:
            raise LedgerError(f"privacy ledger {path} was kept with the {doc.get('accountant')}"
                              f" accountant; keep using --accountant {doc.get('accountant')}")
        return cls(path, fingerprint, accountant, entries)

    def history(self, exclude_run: int | None = None) -> list[tuple[float, float, int]]:
        """The accountant history ``(σ, q, steps)``, merged like Opacus.

        ``exclude_run`` leaves one run's rounds out (the spend before that run).
        """
        out: list[tuple[float, float, int]] = []
        for e in self.entries:
            if e.run != exclude_run:
                out = add_steps(out, e.noise_multiplier, e.sample_rate, e.steps)
        return out

    def restore(self) -> IAccountant:
        """An Opacus accountant holding this dataset's whole history."""
        acc = create_accountant(self.accountant)
        acc.history = self.history()
        return acc

    def spent(self, delta: float) -> float:
        """ε spent so far at ``delta`` (0 before any step)."""
        return float(self.restore().get_epsilon(delta)) if self.entries else 0.0

    def has(self, run: int, server_round: int, kind: str = "train") -> bool:
        """Whether this (run, round, kind) was already released and counted."""
        return any(e.run == run and e.round == server_round and e.kind == kind
                   for e in self.entries)

    def record(self, run: int, server_round: int, steps: int, sample_rate: float,
               noise_multiplier: float, delta: float, kind: str = "train") -> float:
        """Add a release (a trained round, or a noised evaluation), persist, return ε after.

        Raises
        ------
        LedgerError
            If this (run, round, kind) is already in the ledger.
        """
        if self.has(run, server_round, kind):
            raise LedgerError(f"run {run} round {server_round} ({kind}) is already recorded")
        entry = Entry(run, server_round, steps, sample_rate, noise_multiplier, delta, 0.0,
                      dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), kind)
        self.entries.append(entry)
        epsilon = self.spent(delta)
        self.entries[-1] = Entry(**{**asdict(entry), "epsilon": epsilon})
        self._write()
        return epsilon

    def _write(self) -> None:
        doc = {"schema": SCHEMA, "fingerprint": self.fingerprint, "accountant": self.accountant,
               "entries": [asdict(e) for e in self.entries]}
        write_json_atomic(self.path, doc)


def keep_update(folder: Path, fingerprint: str, run: int, server_round: int,
                released: Mapping[str, np.ndarray], num_examples: int) -> Path:
    """Save a released update beside the ledger (``keep-updates``), atomically.

    The file ``released/<dataset>-run-<run>-round-<round>.npz`` holds the arrays
    exactly as they left (the update itself under SecAgg+) and ``__num_examples__``.
    """
    path = folder / "released" / f"{fingerprint[:32]}-run-{run}-round-{server_round}.npz"
    with atomic_file(path) as f:
        np.savez(f, __num_examples__=np.int64(num_examples), **released)
    return path

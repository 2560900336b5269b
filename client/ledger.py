"""An institution's privacy ledger: what each dataset has spent, kept on its own disk.

One JSON file per dataset (``dataset-<key>.json``), keyed by the *dataset*: the
fingerprint of its raw records before any split, or the ``dataset-id`` the institution
names in ``client.toml``; never by a split or a run, so no split setting and no new
run opens an empty ledger. It holds one entry per release that depended on the data
(``train`` rounds, DP-noised ``evaluate`` releases, and ``migrated`` spend of
old-format ledgers): run, round, steps, sample rate, noise multiplier, δ, and the
dataset's ε after it, computed by Opacus's accountant over the whole history.

Entries are hash-chained and every write also updates a marker kept apart
(:mod:`fedsilo.client.ledger_guard`), so a deleted, truncated or rolled-back ledger
is noticed; spend is recorded under a file lock (two interleaved records both count)
and written atomically *before* the round's reply leaves.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant

from fedsilo.client import ledger_guard as guard
from fedsilo.client.privacy import DeclinedError, add_steps
from fedsilo.common.atomic import atomic_file, write_json_atomic

log = logging.getLogger(__name__)

SCHEMA = "fedsilo.ledger/2"
#: What :meth:`Ledger.record` accepts; ``migrated`` entries come only from old ledgers.
KINDS = ("train", "evaluate")


class LedgerError(RuntimeError):
    """The ledger file is unreadable or belongs to another dataset or accountant."""


class LedgerRefused(DeclinedError):
    """The ledger cannot be trusted as it is; training waits for the operator."""


def dataset_fingerprint(texts: list[str], labels: list[str]) -> str:
    """SHA-256 of the (text, label) records, independent of their order."""
    digest = hashlib.sha256()
    for text, label in sorted(zip(texts, labels, strict=True)):
        digest.update(json.dumps([text, label]).encode("utf-8"))
    return digest.hexdigest()


def dataset_key(dataset_id: str, texts: list[str], labels: list[str]) -> str:
    """The ledger key: of the institution's ``dataset-id`` if it names one, else of the records."""
    if dataset_id:
        return hashlib.sha256(f"dataset-id:{dataset_id}".encode()).hexdigest()
    return dataset_fingerprint(texts, labels)


@dataclass(frozen=True)
class Entry:
    """One release that depended on the dataset."""

    run: int
    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    delta: float
    epsilon: float
    at: str
    kind: str = "train"
    source: str = ""  # migrated entries: the old file and its SHA-256
    hash: str = ""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class Ledger:
    """The spend of one dataset; load it with :meth:`open`.

    ``lifetime`` is the institution's lifetime ε for the dataset; ``problem`` says why
    the ledger cannot be trusted as it is ('' when it can).
    """

    path: Path
    fingerprint: str
    accountant: str
    entries: list[Entry] = field(default_factory=list)
    lifetime: float = math.inf
    state: Path = Path()
    problem: str = ""

    @classmethod
    def open(cls, folder: Path, fingerprint: str, accountant: str, *,
             lifetime: float = math.inf, state_dir: str = "", migrate: bool = True) -> Ledger:
        """Load the dataset's ledger from ``folder`` (empty if none), folding old ledgers in.

        ``migrate=False`` only reads (what ``flower-client ledger show`` does).

        Raises
        ------
        LedgerError
            For an unreadable ledger or one of another dataset or accountant.
        """
        ledger = cls(folder / f"dataset-{fingerprint[:32]}.json", fingerprint, accountant,
                     lifetime=lifetime, state=guard.state_dir(folder, state_dir))
        with guard.locked(ledger._lock):
            raw = ledger._load()
            new, note = guard.fold_old(folder, raw) if migrate else ([], "")
            if new:
                before = ledger._check(raw)
                raw = ledger._extend(raw, new)
                ledger._write(raw, pending="; ".join(p for p in (before, note) if p))
                log.warning("privacy ledger %s: %s", ledger.path, note)
            ledger.entries = [Entry(**e) for e in raw]
            ledger.problem = ledger._check(raw)
        return ledger

    @property
    def _lock(self) -> Path:
        return self.path.with_name(f".{self.path.stem}.lock")

    @property
    def _start(self) -> str:
        return guard.genesis(self.fingerprint, self.accountant)

    def _load(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            doc = json.loads(self.path.read_text("utf-8"))
            entries = [dict(e) for e in doc["entries"]]
            for e in entries:
                Entry(**e)  # every field present, none unknown
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LedgerError(f"privacy ledger {self.path} is unreadable ({err}); restore it "
                              "from a backup: without it this dataset's spend is unknown") from None
        if doc.get("fingerprint") != self.fingerprint:
            raise LedgerError(f"privacy ledger {self.path} belongs to another dataset")
        if doc.get("accountant") != self.accountant:
            raise LedgerError(f"privacy ledger {self.path} was kept with the "
                              f"{doc.get('accountant')} accountant; keep using --accountant "
                              f"{doc.get('accountant')}")
        return entries

    def _check(self, raw: list[dict[str, Any]]) -> str:
        marker = guard.Marker.read(self.state, self.fingerprint)
        return guard.problem(marker, self.path.exists(), self._start, raw)

    def _extend(self, raw: list[dict[str, Any]],
                new: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """``raw`` plus ``new`` entries, each with its ε after and its chain hash."""
        out = list(raw)
        heads = guard.chain(self._start, out)
        head = heads[-1] if heads else self._start
        history = _history(out)
        for item in new:
            history = add_steps(history, float(item["noise_multiplier"]),
                                float(item["sample_rate"]), int(item["steps"]))
            entry = asdict(Entry(**{**item, "epsilon": self._epsilon(history,
                                                                     float(item["delta"])),
                                    "hash": ""}))
            entry["hash"] = head = guard.link(head, entry)
            out.append(entry)
        return out

    def _write(self, raw: list[dict[str, Any]], pending: str = "") -> None:
        write_json_atomic(self.path, {"schema": SCHEMA, "fingerprint": self.fingerprint,
                                      "accountant": self.accountant, "entries": raw})
        heads = guard.chain(self._start, raw)
        guard.Marker(len(raw), heads[-1] if heads else self._start, pending).write(
            self.state, self.fingerprint)

    def _epsilon(self, history: list[tuple[float, float, int]], delta: float) -> float:
        acc = create_accountant(self.accountant)
        acc.history = history
        return float(acc.get_epsilon(delta)) if history else 0.0

    def history(self, exclude_run: int | None = None) -> list[tuple[float, float, int]]:
        """The accountant history ``(σ, q, steps)`` of every entry, merged like Opacus.

        ``exclude_run`` leaves one run's entries out (the spend before that run).
        """
        return _history(asdict(e) for e in self.entries if e.run != exclude_run)

    def run_history(self, run: int) -> list[tuple[float, float, int]]:
        """The history of one run's releases, training and evaluation (what its agreed ε covers)."""
        return _history(asdict(e) for e in self.entries if e.run == run)

    def restore(self) -> IAccountant:
        """An Opacus accountant holding this dataset's whole history."""
        acc = create_accountant(self.accountant)
        acc.history = self.history()
        return acc

    def spent(self, delta: float) -> float:
        """ε the dataset has spent at ``delta``, over every run (0 before any step)."""
        return self._epsilon(self.history(), delta)

    def run_spent(self, run: int, delta: float) -> float:
        """ε run ``run``'s training has spent (what is compared with its agreed ε)."""
        return self._epsilon(self.run_history(run), delta)

    def left(self, delta: float) -> float:
        """Lifetime ε the dataset has left at ``delta`` (never below 0)."""
        return max(0.0, self.lifetime - self.spent(delta))

    def has(self, run: int, server_round: int, kind: str = "train") -> bool:
        """Whether this (run, round, kind) was already released and counted."""
        kinds = {kind, "migrated"} if kind == "train" else {kind}
        return any(e.run == run and e.round == server_round and e.kind in kinds
                   for e in self.entries)

    def require_trusted(self) -> None:
        """Refuse (generically) while the ledger waits for its operator; log why here.

        Raises
        ------
        LedgerRefused
            When :attr:`problem` is set.
        """
        if self.problem:
            log.error("privacy ledger %s: %s. Training is refused until the operator restores "
                      "it from a backup or accepts it as it is with `%s`", self.path,
                      self.problem, guard.CONFIRM)
            raise LedgerRefused("declined: this institution's privacy ledger is waiting for "
                                "its operator")

    def record(self, run: int, server_round: int, steps: int, sample_rate: float,
               noise_multiplier: float, delta: float, kind: str = "train") -> float:
        """Add a release under the ledger's lock, persist it atomically, return ε after.

        The file is re-read under the lock, so records of other processes since
        :meth:`open` are kept and counted. A ledger with a :attr:`problem` still gets the
        spend (it happened), but its marker stays as it was until the operator acts.

        Raises
        ------
        ValueError
            For a ``kind`` other than ``train`` or ``evaluate``.
        LedgerError
            If (run, round, kind) is already recorded.
        """
        if kind not in KINDS:
            raise ValueError(f"ledger kind {kind!r}: must be one of {', '.join(KINDS)}")
        with guard.locked(self._lock):
            raw = self._load()
            issue = self._check(raw)
            if any(e["run"] == run and e["round"] == server_round and e["kind"] == kind
                   for e in raw):
                raise LedgerError(f"run {run} round {server_round} ({kind}) is already in "
                                  f"the privacy ledger {self.path}; it is never counted twice")
            raw = self._extend(raw, [{"run": run, "round": server_round, "kind": kind,
                                      "steps": steps, "sample_rate": sample_rate,
                                      "noise_multiplier": noise_multiplier, "delta": delta,
                                      "at": _now()}])
            if issue:
                write_json_atomic(self.path, {"schema": SCHEMA, "fingerprint": self.fingerprint,
                                              "accountant": self.accountant, "entries": raw})
            else:
                self._write(raw)
            self.entries = [Entry(**e) for e in raw]
            self.problem = self._check(raw)
        return self.entries[-1].epsilon

    def confirm(self) -> str:
        """Accept the ledger as it is now (the operator's decision); return what was wrong.

        The chain is recomputed over the entries as they stand and the marker is
        rewritten to match; nothing is removed.
        """
        with guard.locked(self._lock):
            raw = self._load()
            before = self._check(raw)
            fixed = self._extend([], raw)
            self._write(fixed)
            self.entries = [Entry(**e) for e in fixed]
            self.problem = ""
        return before


def _history(entries: Iterable[Mapping[str, Any]]) -> list[tuple[float, float, int]]:
    out: list[tuple[float, float, int]] = []
    for e in entries:
        out = add_steps(out, float(e["noise_multiplier"]), float(e["sample_rate"]),
                        int(e["steps"]))
    return out


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

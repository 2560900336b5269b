"""What keeps a privacy ledger honest: its hash chain, a marker kept apart, a lock, migration.

Every ledger entry carries ``hash = SHA-256(previous hash + the entry's content)``,
starting from a genesis value bound to the dataset and the accountant, so an edited
entry breaks the chain. After each write the chain head and the entry count also go
to a *marker* in the institution's state folder (``state-dir``; by default
``<ledger-dir>.state`` beside the ledger folder, never inside it). A ledger that is
missing, shorter than the marker, or whose entry at the marker's count has another
hash was deleted, truncated or rolled back: :func:`problem` says so, and training is
refused until the operator restores it or accepts it (``flower-client ledger confirm``).

Old-format ledgers (``fedsilo.ledger/1``, keyed by a training split) in the ledger
folder cannot be matched to a dataset, so :func:`fold_old` folds every one of them
into the dataset's ledger (all their spend counts) and leaves the marker waiting for
the operator's confirmation. The old files stay where they are.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsilo.common.atomic import write_json_atomic

OLD_SCHEMA = "fedsilo.ledger/1"
MARKER_SCHEMA = "fedsilo.ledger-marker/1"
CONFIRM = "flower-client ledger confirm --config client.toml"


def genesis(fingerprint: str, accountant: str) -> str:
    """The chain value before the first entry of a dataset's ledger."""
    return hashlib.sha256(f"fedsilo.ledger/2\n{fingerprint}\n{accountant}".encode()).hexdigest()


def link(previous: str, entry: Mapping[str, Any]) -> str:
    """The hash of ``entry`` (its ``hash`` field left out) chained to ``previous``."""
    body = json.dumps({k: v for k, v in entry.items() if k != "hash"}, sort_keys=True)
    return hashlib.sha256(f"{previous}\n{body}".encode()).hexdigest()


def chain(start: str, entries: list[dict[str, Any]]) -> list[str]:
    """The chain value after each of ``entries`` (recomputed, not read)."""
    out, head = [], start
    for entry in entries:
        head = link(head, entry)
        out.append(head)
    return out


def state_dir(ledger_dir: Path, configured: str = "") -> Path:
    """Where the markers of ``ledger_dir``'s ledgers live (``state-dir`` or the default)."""
    return Path(configured) if configured else ledger_dir.with_name(f"{ledger_dir.name}.state")


@dataclass(frozen=True)
class Marker:
    """What the institution last wrote: entry count, chain head, and a pending confirmation."""

    entries: int
    head: str
    pending: str = ""

    @staticmethod
    def path(folder: Path, fingerprint: str) -> Path:
        """The marker file of a dataset in the state folder."""
        return folder / f"{fingerprint[:32]}.marker"

    @classmethod
    def read(cls, folder: Path, fingerprint: str) -> Marker | None:
        """The stored marker (None when there is none); an unreadable one reads as pending."""
        path = cls.path(folder, fingerprint)
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text("utf-8"))
            return cls(int(doc["entries"]), str(doc["head"]), str(doc.get("pending", "")))
        except (OSError, ValueError, KeyError, TypeError):
            return cls(-1, "", f"its marker {path} is unreadable")

    def write(self, folder: Path, fingerprint: str) -> None:
        """Replace the marker atomically."""
        write_json_atomic(self.path(folder, fingerprint), {
            "schema": MARKER_SCHEMA, "fingerprint": fingerprint, "entries": self.entries,
            "head": self.head, "pending": self.pending,
            "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})


def problem(marker: Marker | None, exists: bool, start: str,
            entries: list[dict[str, Any]]) -> str:
    """Why this ledger cannot be trusted as it is ('' when it can).

    ``exists`` says whether the ledger file is there; ``entries`` are its entries as
    stored (with their ``hash`` fields).
    """
    heads = chain(start, entries)
    broken = next((k for k, (e, h) in enumerate(zip(entries, heads, strict=True))
                   if e.get("hash") != h), None)
    if broken is not None:
        return f"its hash chain breaks at entry {broken + 1} (edited by hand?)"
    if marker is None:
        return ("" if not entries else "its marker in the state folder is missing (moved or "
                "deleted?), so a rollback cannot be ruled out")
    if marker.pending:
        return marker.pending
    if marker.entries > 0 and not exists:
        return f"the ledger file is missing; its marker records {marker.entries} entries"
    if marker.entries > len(entries):
        return (f"it holds {len(entries)} entries but its marker records {marker.entries}: "
                "truncated or rolled back to an older copy")
    at = heads[marker.entries - 1] if marker.entries else start
    if at != marker.head:
        return "its entries differ from those its marker records: replaced or rolled back"
    return ""


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock (``fcntl.flock``) on ``path`` for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def old_ledgers(folder: Path) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """``(file name, sha256, entries)`` of each old-format ledger in ``folder``."""
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            raw = path.read_bytes()
            doc = json.loads(raw)
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("schema") == OLD_SCHEMA:
            out.append((path.name, hashlib.sha256(raw).hexdigest(), list(doc["entries"])))
    return out


def fold_old(folder: Path, entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Old-format entries not yet folded into ``entries``, and a note for the operator.

    Each comes back as a ``migrated`` entry naming its file and that file's SHA-256,
    so a file is folded once; its spend then counts against the dataset.
    """
    done = {e.get("source", "") for e in entries}
    new: list[dict[str, Any]] = []
    names = []
    for name, digest, old in old_ledgers(folder):
        source = f"{name} sha256:{digest}"
        if source in done:
            continue
        names.append(name)
        new += [{"run": int(e["run"]), "round": int(e["round"]), "kind": "migrated",
                 "steps": int(e["steps"]), "sample_rate": float(e["sample_rate"]),
                 "noise_multiplier": float(e["noise_multiplier"]), "delta": float(e["delta"]),
                 "source": source, "at": str(e.get("at", ""))} for e in old]
    note = (f"old-format ledger(s) {', '.join(names)} were folded in (all their spend counts "
            "against this dataset); training waits until the operator checks them and runs "
            f"`{CONFIRM}`") if names else ""
    return new, note

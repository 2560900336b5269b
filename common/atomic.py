"""The one way fedsilo replaces a state file: temporary file, fsync, rename, fsync the folder.

Every writer of a file that must never be seen half-written (privacy ledger, kept
updates, checkpoint, metrics, caches, keys and certificates) goes through
:func:`atomic_file` or its helpers, so a crash at any point leaves either the old
file or the new one, never a mix, and a completed replace survives a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

#: Mode of files fedsilo writes unless a caller asks otherwise: owner only.
PRIVATE = 0o600


def fsync_dir(folder: Path) -> None:
    """Make a rename or creation inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: int = PRIVATE, *, text: bool = False) -> Iterator[IO[Any]]:
    """Yield a file whose content replaces ``path`` only when the block ends without error.

    The temporary file is created beside ``path`` with ``mode`` (before the umask),
    flushed and fsynced, renamed over ``path``, and the folder is fsynced. On an
    exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) \
                as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | str, mode: int = PRIVATE) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8)."""
    with atomic_file(path, mode) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json_atomic(path: Path, doc: Any, mode: int = PRIVATE, indent: int | None = 1) -> None:
    """Replace ``path`` with ``doc`` as JSON (NaN and infinities are refused)."""
    write_atomic(path, json.dumps(doc, indent=indent, allow_nan=False), mode)


def swap_folder(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` in place of ``target`` (which may not exist).

    A reader sees the old folder or the new one; in the short window between the two
    renames ``target`` is absent, never half-written.
    """
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)

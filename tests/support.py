"""Helpers shared by the bad-input tests (imported by name: ``tests/`` is on sys.path)."""

from __future__ import annotations

import socket
from pathlib import Path


class Started(Exception):
    """Raised instead of starting processes: validation passed."""


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

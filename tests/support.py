"""Helpers shared by tests (imported by name: ``tests/`` is on sys.path)."""

from __future__ import annotations

import socket
from pathlib import Path

from flwr.serverapp.strategy import Strategy

from fedsilo.common.config import FedsiloConfig
from fedsilo.server.report import RunReport
from fedsilo.server.strategy import build_strategy


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


def strategy_for(cfg: FedsiloConfig, folder: Path) -> Strategy:
    """The coordinator's strategy for ``cfg``, reporting into ``folder``."""
    return build_strategy(cfg, RunReport(folder, [], cfg.to_flat(),
                                         num_rounds=cfg.federation.num_rounds))

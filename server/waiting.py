"""A bounded wait for institutions: the run fails with a clear message instead of hanging.

Flower's strategies wait, without limit, until ``min-available`` nodes are connected
(polling ``Grid.get_node_ids`` every second), both at the start and in every later
round. :class:`PatientGrid` passes everything through to the real grid but raises
:class:`JoinTimeoutError` once fewer than the minimum have been connected for longer
than ``join-timeout`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.serverapp import Grid


class JoinTimeoutError(RuntimeError):
    """Too few institutions stayed connected for too long."""


class PatientGrid:
    """Delegate to ``grid``; fail when short of ``minimum`` nodes for over ``timeout`` s."""

    def __init__(self, grid: Grid, minimum: int, timeout: float) -> None:
        self._grid, self.minimum, self.timeout = grid, minimum, timeout
        self._short_since: float | None = None

    def get_node_ids(self) -> Iterable[int]:
        """The connected node ids; raises once too few have lasted past the timeout."""
        ids = list(self._grid.get_node_ids())
        if len(ids) >= self.minimum or self.timeout <= 0:
            self._short_since = None
            return ids
        now = time.monotonic()
        self._short_since = self._short_since or now
        if now - self._short_since > self.timeout:
            raise JoinTimeoutError(
                f"only {len(ids)} of the {self.minimum} institutions needed "
                f"(--min-available) were connected for {self.timeout:g} s (--join-timeout); "
                "check that each institution runs flower-client with its kit, that its key "
                "is on the allow-list, and that it can reach this coordinator"
            )
        return ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

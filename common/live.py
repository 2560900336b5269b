"""A live terminal view that turns into plain log lines when nobody is watching.

On a terminal, :func:`live_view` redraws a rich renderable once a second below the
normal output (log lines keep scrolling above it). Anywhere else (a file, a pipe, CI,
``NO_COLOR``/``TERM=dumb``) it does nothing, and the plain per-round log lines are
the whole record.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator

from rich.console import Console, RenderableType
from rich.live import Live
from rich.text import Text


def interactive() -> bool:
    """Whether a live view makes sense: stdout and stderr are a real terminal."""
    return (sys.stdout.isatty() and sys.stderr.isatty()
            and os.environ.get("TERM", "") != "dumb" and "CI" not in os.environ)


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


@contextlib.contextmanager
def live_view(render: Callable[[], RenderableType]) -> Iterator[None]:
    """Show ``render()`` live while the block runs (only on a terminal)."""
    if not interactive():
        yield
        return

    class _View:
        def __rich__(self) -> RenderableType:
            try:
                return render()
            except (OSError, ValueError, KeyError) as err:  # a file mid-write: try again
                return Text(f"(waiting for progress: {err})", style="dim")

    handlers = [h for h in logging.getLogger("fedsilo").handlers
                if isinstance(h, logging.StreamHandler)]
    with Live(_View(), console=Console(stderr=True), refresh_per_second=1,
              redirect_stdout=True, redirect_stderr=True, transient=False):
        # Log records go through Live's proxy too, so they scroll above the view.
        previous = [h.setStream(sys.stderr) for h in handlers]
        try:
            yield
        finally:
            for handler, stream in zip(handlers, previous, strict=True):
                if stream is not None:
                    handler.setStream(stream)

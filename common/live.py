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
import statistics
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

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


#: What round 1 does once that later rounds skip (said wherever round 1's time shows).
ONE_OFF = ("round 1 includes one-off work: loading, tokenising and the frozen encoder's "
           "pass over each institution's data")


def eta(round_seconds: Sequence[float], left: int) -> str:
    """An honest ``ETA …`` from the finished rounds' wall times (round 1 first).

    Round 1 carries one-off work (see :data:`ONE_OFF`), so it is left out of the
    estimate; after round 1 alone there is no estimate yet.
    """
    if left <= 0 or not round_seconds:
        return ""
    steady = list(round_seconds[1:])
    if not steady:
        return "ETA after round 2 (round 1 included one-off work)"
    return f"ETA {duration(left * statistics.median(steady))}"


def _beat(heartbeat: Callable[[], str | None], every: float, stop: threading.Event) -> None:
    log = logging.getLogger("fedsilo.progress")
    while not stop.wait(every):
        try:
            line = heartbeat()
        except (OSError, ValueError, KeyError):  # a file mid-write: next time
            continue
        if line:
            log.info("%s", line)


@contextlib.contextmanager
def live_view(render: Callable[[], RenderableType],
              heartbeat: Callable[[], str | None] | None = None,
              every: float = 60.0) -> Iterator[None]:
    """Show ``render()`` live while the block runs (only on a terminal).

    Off a terminal, ``heartbeat()`` (when given) is logged every ``every`` seconds, so
    a long stretch without finished rounds (round 1's one-off work) is not silent.
    """
    if not interactive():
        stop = threading.Event()
        if heartbeat is not None:
            threading.Thread(target=_beat, args=(heartbeat, every, stop), daemon=True).start()
        try:
            yield
        finally:
            stop.set()
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


def describe_eval(result: Mapping[str, float]) -> str:
    """``acc 0.812 macro-F1 0.774 loss 1.2345`` with only the metrics ``result`` holds.

    Institutions that release a noised evaluation send accuracy and a count only.
    """
    parts = [f"{label} {result[key]:{fmt}}" for key, label, fmt in
             (("accuracy", "acc", ".3f"), ("macro_f1", "macro-F1", ".3f"), ("loss", "loss", ".4f"))
             if result.get(key) is not None]
    return " ".join(parts)

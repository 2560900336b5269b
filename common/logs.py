"""Logging set-up shared by the apps and the command-line tools."""

from __future__ import annotations

import logging
import sys
import warnings

_FORMAT = "%(asctime)s fedsilo %(levelname)s %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Send fedsilo's log records to stderr once per process and quieten library noise."""
    root = logging.getLogger("fedsilo")
    if not any(getattr(h, "_fedsilo", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._fedsilo = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level)
    if "transformers" in sys.modules:  # not imported by the light ClientApp process
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    # Opacus warns on every make_private about options fedsilo sets on purpose.
    warnings.filterwarnings("ignore", module=r"opacus\..*")

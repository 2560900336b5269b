"""Atomic save and tolerant load of the tensor lists that fedsilo's caches keep on disk."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from fedsilo.common.atomic import atomic_file

log = logging.getLogger(__name__)


def load_tensors(path: Path, what: str) -> list[torch.Tensor] | None:
    """The tensors saved at ``path``, or None when it is missing or unreadable (logged)."""
    if not path.is_file():
        return None
    try:
        return list(torch.load(path, weights_only=True))
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        log.warning("%s %s is unreadable (%s); computing it again", what, path, err)
        return None


def save_tensors(path: Path, tensors: list[torch.Tensor]) -> None:
    """Write ``tensors`` to ``path`` atomically (a reader never sees half a file)."""
    with atomic_file(path) as f:
        torch.save(tensors, f)

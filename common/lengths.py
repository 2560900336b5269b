"""Sequence length from the data: how many tokens the texts need and how many get cut.

The simulation measures the token lengths of its training texts and picks the
shortest ``max-length`` that covers :data:`COVERAGE` of them, within the model's
limit and :data:`MEMORY_CAP`. An institution in a deployment measures its own texts
against the agreed length (``flower-client --check``); nothing about them leaves it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

#: Share of the texts the chosen length must hold whole.
COVERAGE = 0.95
#: Most tokens ``--max-length auto`` picks: activations grow with the length (quadratic
#: in attention), and 256 tokens keeps a 2-core CPU run in minutes. An explicit
#: ``--max-length`` up to the model's limit is honoured.
MEMORY_CAP = 256
#: Shortest length the schema allows (``--max-length`` >= 8).
FLOOR = 8
#: A warning is logged when more than this share of the texts is truncated.
WARN_SHARE = 0.2
#: Texts measured at most (a seeded sample of a larger set; the share is an estimate).
SAMPLE = 10_000


@dataclass(frozen=True)
class LengthChoice:
    """The chosen length, what it truncates and why it is what it is."""

    length: int
    truncated: float
    median: int
    needed: int
    limit: int

    def describe(self) -> str:
        """One log line: the length, the share of texts it cuts, and what bound it."""
        bound = ""
        if self.needed > self.length:
            bound = (f"; {COVERAGE:.0%} of them need {self.needed}, capped at {self.length} "
                     f"(model limit {self.limit}, memory cap {MEMORY_CAP}; an explicit "
                     "--max-length N wins)")
        return (f"max length {self.length} tokens: {self.truncated:.1%} of the texts are "
                f"truncated (median {self.median} tokens{bound})")


def token_lengths(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                  seed: int = 0) -> np.ndarray:
    """Tokens per text, special tokens included (a seeded sample of ``SAMPLE`` at most)."""
    picked = list(texts)
    if len(picked) > SAMPLE:
        idx = np.random.default_rng(seed).choice(len(picked), SAMPLE, replace=False)
        picked = [picked[i] for i in np.sort(idx)]
    if not picked:
        return np.zeros(0, dtype=np.int64)
    ids = tokenizer(picked, truncation=False, add_special_tokens=True,
                    verbose=False)["input_ids"]
    return np.array([len(x) for x in ids], dtype=np.int64)


def truncated_share(lengths: np.ndarray, max_length: int) -> float:
    """Share of the texts longer than ``max_length`` tokens (0 for no texts)."""
    return float(np.mean(lengths > max_length)) if len(lengths) else 0.0


def model_limit(tokenizer: PreTrainedTokenizerBase, positions: int | None,
                schema_max: int = 512) -> int:
    """Most tokens the model takes: its position embeddings, the tokenizer's and the schema's."""
    limits = [schema_max]
    if positions:
        limits.append(int(positions))
    tok = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok, int) and 0 < tok < 1_000_000:  # "no limit" is a huge sentinel
        limits.append(tok)
    return min(limits)


def choose_length(lengths: np.ndarray, limit: int, coverage: float = COVERAGE,
                  cap: int = MEMORY_CAP) -> LengthChoice:
    """Shortest length holding ``coverage`` of the texts whole, within ``limit`` and ``cap``."""
    if len(lengths) == 0:
        return LengthChoice(FLOOR, 0.0, 0, FLOOR, limit)
    # the k-th shortest text, k = ceil(coverage * n): at most (1 - coverage) * n are longer
    k = max(1, int(np.ceil(coverage * len(lengths) - 1e-9)))
    needed = int(np.sort(lengths)[k - 1])
    length = max(FLOOR, min(needed, limit, cap))
    return LengthChoice(length, truncated_share(lengths, length),
                        int(np.median(lengths)), needed, limit)


def summary(lengths: np.ndarray, max_length: int) -> dict[str, float | int]:
    """``share`` cut at ``max_length``, the ``max_length`` and the ``median`` length."""
    return {"share": truncated_share(lengths, max_length), "max_length": max_length,
            "median": int(np.median(lengths)) if len(lengths) else 0}


def warn_if_truncated(share: float, length: int, where: str) -> bool:
    """Log a warning (and return True) when more than ``WARN_SHARE`` of texts are cut."""
    if share <= WARN_SHARE:
        return False
    log.warning("%s: %.1f%% of the texts are longer than max length %d and are cut; the "
                "model never sees their ends (a longer --max-length keeps more, at more "
                "memory and time)", where, 100 * share, length)
    return True

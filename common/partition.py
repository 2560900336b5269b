"""Splitting a data set's examples across simulated institutions.

Every function returns one sorted int64 index array per partition; the partitions are
disjoint and together cover all examples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

MAX_DIRICHLET_TRIES = 100


def _check_counts(num_examples: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"--institutions must be >= 1, got {num_partitions}")
    if num_partitions > num_examples:
        raise ValueError(f"cannot split {num_examples} examples into {num_partitions} "
                         "institutions; use fewer --institutions or more data")


def partition_iid(num_examples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Shuffle the examples and deal them into partitions whose sizes differ by at most one."""
    _check_counts(num_examples, num_partitions)
    order = np.random.default_rng(seed).permutation(num_examples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(order, num_partitions)]


def partition_dirichlet(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Split examples with label skew drawn from a Dirichlet distribution.

    For each class, partition shares are drawn from ``Dir(alpha)`` and the class's shuffled
    examples are cut accordingly; small ``alpha`` gives strong skew, large ``alpha`` nearly
    IID partitions. The draw is repeated until every partition holds at least
    ``min_partition_size`` examples.

    Raises
    ------
    ValueError
        For invalid arguments, or if no draw within ``MAX_DIRICHLET_TRIES`` attempts meets
        ``min_partition_size``.

    """
    labels = np.asarray(labels)
    num_examples = len(labels)
    _check_counts(num_examples, num_partitions)
    if alpha <= 0:
        raise ValueError(f"--dirichlet-alpha must be > 0, got {alpha}")
    if min_partition_size < 0 or min_partition_size * num_partitions > num_examples:
        raise ValueError(
            f"min_partition_size {min_partition_size} is impossible for {num_examples} "
            f"examples in {num_partitions} institutions; use fewer --institutions (at most "
            f"{num_examples // max(min_partition_size, 1)})"
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for attempt in range(1, MAX_DIRICHLET_TRIES + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for members in by_class:
            shuffled = rng.permutation(members)
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(np.int64)
            for part, chunk in zip(parts, np.split(shuffled, cuts), strict=True):
                part.append(chunk)
        result = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        smallest = min(len(p) for p in result)
        if smallest >= min_partition_size:
            logger.debug("dirichlet partition found after %d attempt(s)", attempt)
            return result
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {num_examples} examples into {num_partitions} "
        f"partitions gave every partition >= {min_partition_size} examples in "
        f"{MAX_DIRICHLET_TRIES} attempts (last smallest: {smallest}); raise "
        "--dirichlet-alpha or use fewer --institutions"
    )


def partition_by_column(
    values: Sequence[str], num_partitions: int | None = None, column: str = "institution"
) -> tuple[list[str], list[np.ndarray]]:
    """Split examples naturally, one partition per distinct value (e.g. institution).

    Returns the sorted distinct values and the matching index arrays; ``column`` names
    the ``--partition-column`` in error messages.

    Raises
    ------
    ValueError
        If ``values`` is empty, or ``num_partitions`` is given and differs from the number
        of distinct values.

    """
    if len(values) == 0:
        raise ValueError("cannot partition by column: no values")
    groups: dict[str, list[int]] = {}
    for i, value in enumerate(values):
        groups.setdefault(value, []).append(i)
    names = sorted(groups)
    if num_partitions is not None and num_partitions != len(names):
        raise ValueError(
            f"--institutions is {num_partitions} but --partition-column {column!r} has "
            f"{len(names)} distinct values ({', '.join(names)}); leave out --institutions "
            f"(the column sets the count) or set --institutions {len(names)}"
        )
    return names, [np.array(groups[name], dtype=np.int64) for name in names]

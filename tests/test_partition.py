from collections.abc import Callable

import numpy as np
import pytest

from fedsilo.common.partition import (
    partition_by_column,
    partition_dirichlet,
    partition_iid,
)


def assert_disjoint_cover(parts: list[np.ndarray], num_examples: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert np.array_equal(part, np.sort(part))
    merged = np.concatenate(parts)
    assert len(merged) == num_examples
    assert np.array_equal(np.sort(merged), np.arange(num_examples))


def mean_label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance of each partition's label distribution from the global."""
    classes = np.unique(labels)
    overall = np.array([np.mean(labels == c) for c in classes])
    skews = [0.5 * np.abs(np.array([np.mean(labels[p] == c) for c in classes]) - overall).sum()
             for p in parts]
    return float(np.mean(skews))


LABELS = np.random.default_rng(0).integers(0, 5, size=2000)


def test_iid_sizes_cover_and_determinism() -> None:
    parts = partition_iid(103, 10, seed=1)
    assert_disjoint_cover(parts, 103)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_iid(103, 10, 1), strict=True))
    assert not np.array_equal(parts[0], partition_iid(103, 10, seed=2)[0])
    assert not np.array_equal(parts[0], np.arange(len(parts[0])))  # shuffled


def test_dirichlet_cover_min_size_and_determinism() -> None:
    parts = partition_dirichlet(LABELS, 8, alpha=0.1, seed=3, min_partition_size=20)
    assert_disjoint_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 20
    again = partition_dirichlet(LABELS, 8, alpha=0.1, seed=3, min_partition_size=20)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_dirichlet(LABELS, 8, alpha=0.1, seed=4, min_partition_size=20)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_alpha_controls_label_skew() -> None:
    iid = mean_label_skew(LABELS, partition_iid(len(LABELS), 8, seed=0))
    strong = mean_label_skew(LABELS, partition_dirichlet(LABELS, 8, alpha=0.1, seed=0))
    weak = mean_label_skew(LABELS, partition_dirichlet(LABELS, 8, alpha=100.0, seed=0))
    assert strong > 0.4
    assert strong > 5 * iid
    assert weak < 0.1
    assert weak < strong / 4


def test_dirichlet_gives_up_with_clear_message() -> None:
    labels = np.repeat(np.arange(2), 15)
    with pytest.raises(ValueError, match=r"attempts .*raise --dirichlet-alpha"):
        partition_dirichlet(labels, 3, alpha=0.01, seed=0, min_partition_size=10)
    with pytest.raises(ValueError, match="min_partition_size 11 is impossible"):
        partition_dirichlet(labels, 3, alpha=1.0, seed=0, min_partition_size=11)


def test_by_column_one_partition_per_value() -> None:
    values = ["north", "south", "east", "north", "east", "north"]
    names, parts = partition_by_column(values)
    assert names == ["east", "north", "south"]
    assert [p.tolist() for p in parts] == [[2, 4], [0, 3, 5], [1]]
    assert_disjoint_cover(parts, len(values))
    assert partition_by_column(values, num_partitions=3)[0] == names
    with pytest.raises(ValueError, match=r"--institutions is 2 .*3 distinct .*east, north"):
        partition_by_column(values, num_partitions=2)
    with pytest.raises(ValueError, match="no values"):
        partition_by_column([])


@pytest.mark.parametrize(("call", "message"), [
    (lambda: partition_iid(10, 0, seed=0), "must be >= 1"),
    (lambda: partition_iid(3, 4, seed=0), "cannot split 3 examples into 4"),
    (lambda: partition_dirichlet(LABELS, 0, alpha=1.0, seed=0), "must be >= 1"),
    (lambda: partition_dirichlet(LABELS[:5], 6, 1.0, 0, 0), "cannot split 5 examples"),
    (lambda: partition_dirichlet(LABELS, 4, alpha=0.0, seed=0), "alpha must be > 0"),
])
def test_bad_arguments_raise(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()

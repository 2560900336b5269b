import numpy as np
import pytest

from fedsilo.common.metrics import accuracy, macro_f1, majority_rate


def test_accuracy() -> None:
    assert accuracy(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2])) == pytest.approx(0.75)
    assert accuracy(np.array([1]), np.array([0])) == 0.0


def test_macro_f1_hand_computed() -> None:
    # class 0: tp=1 fp=0 fn=1 -> 2/3; class 1: tp=2 fp=1 fn=0 -> 4/5
    assert macro_f1(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])) == pytest.approx(11 / 15)
    assert macro_f1(np.array([3, 1, 3]), np.array([3, 1, 3])) == pytest.approx(1.0)


def test_macro_f1_counts_classes_seen_only_in_predictions_or_truth() -> None:
    # class 0 -> 2/3, class 1 -> 1, class 2 (predicted only) -> 0
    assert macro_f1(np.array([0, 0, 1]), np.array([0, 2, 1])) == pytest.approx(5 / 9)
    # class 0 -> 2/3 (tp=1 fp=1), class 5 (true only, never predicted) -> 0
    assert macro_f1(np.array([0, 5]), np.array([0, 0])) == pytest.approx(1 / 3)


def test_majority_rate() -> None:
    assert majority_rate(np.array([2, 2, 0, 2, 1])) == pytest.approx(0.6)
    assert majority_rate(np.array(["a"])) == 1.0


def test_invalid_inputs_raise() -> None:
    empty = np.array([], dtype=np.int64)
    for metric in (accuracy, macro_f1):
        with pytest.raises(ValueError, match="empty"):
            metric(empty, empty)
        with pytest.raises(ValueError, match="shape"):
            metric(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match="empty"):
        majority_rate(empty)

"""Classification metrics on integer label arrays, without an sklearn dependency."""

from __future__ import annotations

import numpy as np


def _check_pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {y_true.shape} vs {y_pred.shape}")
    if y_true.size == 0:
        raise ValueError("cannot compute a metric on empty arrays")
    return y_true, y_pred


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Return the share of predictions equal to the true label."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Return the unweighted mean F1 over every class in ``y_true`` or ``y_pred``.

    Matches sklearn's ``f1_score(average="macro", zero_division=0)``: a class that is only
    predicted (or only true) scores an F1 of 0.
    """
    y_true, y_pred = _check_pair(y_true, y_pred)
    scores = []
    for c in np.union1d(y_true, y_pred):
        tp = np.sum((y_true == c) & (y_pred == c))
        fp = np.sum((y_true != c) & (y_pred == c))
        fn = np.sum((y_true == c) & (y_pred != c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def majority_rate(y: np.ndarray) -> float:
    """Return the share of the most frequent class (the majority-class baseline accuracy)."""
    y = np.asarray(y)
    if y.size == 0:
        raise ValueError("cannot compute the majority rate of an empty array")
    _, counts = np.unique(y, return_counts=True)
    return float(counts.max() / y.size)

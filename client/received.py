"""Check a received global model before anything at the institution uses it.

The coordinator chooses the tensors it sends. A crafted head can turn local
evaluation or training into a membership test (weights near 10³ aimed at one record)
or make one record's logit overflow (finite entries near 10³⁷). Before a received
model is loaded, every tensor must be finite and no coordinate may lie further from
the *agreed initial model* than the agreed recipe can move it: that model is the one
both sides build from the pinned checkpoint, labels and seed
(:func:`fedsilo.common.model.load_model`), and the distance is
:func:`fedsilo.common.bounds.max_received_distance` over the rounds the message's
round allows (at most the agreed ``num-rounds``). A refused model is never loaded.

Where the recipe bounds no step (plain SGD, client-level DP whose noise the
coordinator adds), only finiteness is checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from torch import nn

from fedsilo.common import journal
from fedsilo.common.bounds import (
    encoder_learning_rate,
    largest_learning_rate,
    max_received_distance,
    planned_steps,
)
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.model import get_trainable_state


class ReceivedModelError(ValueError):
    """The received model is not finite or lies outside the agreed bounds."""


def aggregations(server_round: int, num_rounds: int, evaluate: bool) -> int:
    """Aggregations the model of a message of round ``server_round`` can have had.

    Before a train message of round ``r`` there were ``r − 1``; an evaluate message of
    round ``r`` follows ``r``. Never more than the agreed ``num-rounds`` (the coordinator
    chooses the round number).
    """
    return min(max(server_round - (0 if evaluate else 1), 0), num_rounds)


def received_bound(cfg: FedsiloConfig, done: int, initial_largest: float) -> float | None:
    """The largest L∞ distance from the agreed initial model after ``done`` aggregations.

    Steps per round are counted for ``secagg-max-weight`` examples, the agreed most
    examples one institution may weigh. None where the recipe bounds no step.
    """
    train, fed = cfg.train, cfg.federation
    if train.optimizer != "adamw" or cfg.privacy.client_level:
        return None
    rate = largest_learning_rate(
        train.learning_rate, encoder_learning_rate(cfg.model.trainable,
                                                   train.encoder_learning_rate))
    steps = planned_steps(fed.secagg_max_weight, train.batch_size, train.local_epochs)
    return max_received_distance(done, rate, steps, initial_largest, fed.strategy,
                                 fed.server_learning_rate, fed.server_momentum)


def check_received(received: Mapping[str, np.ndarray], initial: Mapping[str, np.ndarray],
                   bound: float | None) -> None:
    """Refuse a received model that is not finite or further than ``bound`` from ``initial``.

    Raises
    ------
    ReceivedModelError
        Naming the tensor and how far it lies (for the institution's own log only).
    """
    for name, value in received.items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
            raise ReceivedModelError(f"received tensor {name!r} is not finite floating point")
        if bound is None or not array.size or name not in initial:
            continue
        if array.shape != np.shape(initial[name]):
            raise ReceivedModelError(f"received tensor {name!r} has shape {array.shape}, "
                                     f"the agreed model {np.shape(initial[name])}")
        distance = float(np.max(np.abs(array.astype(np.float64) - initial[name])))
        if distance > bound:
            raise ReceivedModelError(
                f"received tensor {name!r} lies {distance:.3g} from the agreed initial "
                f"model, more than the agreed recipe allows ({bound:.3g})")


def check_model(cfg: FedsiloConfig, server_round: int, evaluate: bool, model: nn.Module,
                received: Mapping[str, np.ndarray], journal_path: Path) -> None:
    """Check ``received`` against ``model`` as loaded (the agreed initial model).

    A refused model is journalled at ``journal_path`` (the institution's journal).

    Raises
    ------
    ReceivedModelError
        If the received model is refused; nothing has loaded it.
    """
    initial = {k: v.numpy() for k, v in get_trainable_state(model).items()}
    done = aggregations(server_round, cfg.federation.num_rounds, evaluate)
    largest = max((float(np.abs(v).max()) for v in initial.values() if v.size), default=0.0)
    try:
        check_received(received, initial, received_bound(cfg, done, largest))
    except ReceivedModelError as err:
        journal.append(journal_path, "refused-model", reason=str(err), round=server_round,
                       received=journal.digest(received))
        raise

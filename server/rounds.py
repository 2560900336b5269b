"""fedsilo's round loop over a Flower Message-API strategy, resumable at any round.

Flower's ``Strategy.start`` always runs rounds 1…N from the initial model. This loop
calls the same strategy hooks (``configure_train`` → ``aggregate_train`` →
``configure_evaluate`` → ``aggregate_evaluate``, the last two only in rounds where
federated evaluation is due) for rounds ``first``…``last`` and hands
each finished round to ``end_of_round`` (centralized evaluation, report, checkpoint), so
a resumed run continues with the real round numbers that institutions' ledgers use.
Every message carries the run key (``RUN_KEY``): the first run's Flower run id, which
stays the same when the run is resumed under a new Flower run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsilo.common.wire import RUN_KEY

log = logging.getLogger(__name__)


def evaluation_due(server_round: int, last: int, every: int) -> bool:
    """Whether round ``server_round`` ends with federated evaluation (``--evaluate-every``)."""
    return every > 0 and (server_round % every == 0 or server_round == last)


def run_rounds(strategy: Strategy, grid: Grid, arrays: ArrayRecord, *, first: int, last: int,
               run_key: int, timeout: float, evaluate_every: int,
               end_of_round: Callable[[int, ArrayRecord], None]) -> ArrayRecord:
    """Run rounds ``first``…``last`` starting from ``arrays``; return the final arrays."""
    config = ConfigRecord({RUN_KEY: run_key})
    for server_round in range(first, last + 1):
        log.info("round %d/%d: training", server_round, last)
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, arrays, config, grid), timeout=timeout)
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is None:
            log.warning("round %d: no update could be aggregated; the global model is "
                        "unchanged", server_round)
        else:
            arrays = aggregated
        if evaluation_due(server_round, last, evaluate_every):
            replies = grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, config, grid),
                timeout=timeout)
            strategy.aggregate_evaluate(server_round, replies)
        end_of_round(server_round, arrays)
    return arrays

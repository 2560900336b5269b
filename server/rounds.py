"""fedsilo's round loop over a Flower Message-API strategy, resumable at any round.

Flower's ``Strategy.start`` always runs rounds 1…N from the initial model. This loop
calls the same strategy hooks (``configure_train`` → ``aggregate_train`` →
``configure_evaluate`` → ``aggregate_evaluate``, the last two only in rounds where
federated evaluation is due) for rounds ``first``…``last`` and hands
each finished round to ``end_of_round`` (centralized evaluation, report, checkpoint), so
a resumed run continues with the real round numbers that institutions' ledgers use.
Every message carries the run key (``RUN_KEY``): the first run's Flower run id, which
stays the same when the run is resumed under a new Flower run.

With fused evaluation, round r's train message asks each institution to evaluate the
model it receives (round r − 1's) before training, and ``aggregate_evaluate`` gets
those metrics for round r − 1; only the last round's model needs an evaluate message.
Each Flower message costs a round trip through the SuperLink and SuperNode polling,
so this halves the messages of a round without losing an evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsilo.common.wire import (
    EVALUATE_RECEIVED_KEY,
    INSTITUTION_KEY,
    RECEIVED_PREFIX,
    RUN_KEY,
    UNIFORM_WEIGHT_KEY,
)

log = logging.getLogger(__name__)


def evaluation_due(server_round: int, last: int, every: int) -> bool:
    """Whether round ``server_round`` ends with federated evaluation (``--evaluate-every``)."""
    return every > 0 and (server_round % every == 0 or server_round == last)


def received_evaluations(replies: Iterable[Message]) -> list[Message]:
    """The fused-evaluation metrics of train replies, as the evaluate replies they replace."""
    evaluations = []
    for reply in replies:
        if reply.has_error() or "metrics" not in reply.content.metric_records:
            continue
        sent = reply.content["metrics"]
        metrics = {k[len(RECEIVED_PREFIX):]: v for k, v in sent.items()
                   if k.startswith(RECEIVED_PREFIX)}
        if not metrics:
            continue
        if UNIFORM_WEIGHT_KEY in sent:
            metrics[UNIFORM_WEIGHT_KEY] = sent[UNIFORM_WEIGHT_KEY]
        content = RecordDict({"metrics": MetricRecord(metrics)})
        if INSTITUTION_KEY in reply.content:
            content[INSTITUTION_KEY] = reply.content[INSTITUTION_KEY]
        # As if the sending node had replied to an evaluate message: the gate names
        # the institution from this node id.
        asked = Message(RecordDict(), dst_node_id=reply.metadata.src_node_id,
                        message_type=MessageType.EVALUATE)
        evaluations.append(Message(content, reply_to=asked))
    return evaluations


def run_rounds(strategy: Strategy, grid: Grid, arrays: ArrayRecord, *, first: int, last: int,
               run_key: int, timeout: float, evaluate_every: int,
               end_of_round: Callable[[int, ArrayRecord], None],
               fused_evaluation: bool = False) -> ArrayRecord:
    """Run rounds ``first``…``last`` starting from ``arrays``; return the final arrays."""
    for server_round in range(first, last + 1):
        fused = fused_evaluation and server_round > 1 and evaluation_due(
            server_round - 1, last, evaluate_every)
        config = ConfigRecord({RUN_KEY: run_key, **({EVALUATE_RECEIVED_KEY: True}
                                                    if fused else {})})
        log.info("round %d/%d: training", server_round, last)
        replies = list(grid.send_and_receive(
            strategy.configure_train(server_round, arrays, config, grid), timeout=timeout))
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is None:
            log.warning("round %d: no update could be aggregated; the global model is "
                        "unchanged", server_round)
        else:
            arrays = aggregated
        if fused and (evaluations := received_evaluations(replies)):
            strategy.aggregate_evaluate(server_round - 1, evaluations)
        if evaluation_due(server_round, last, evaluate_every) and (
                not fused_evaluation or server_round == last):
            replies = grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, ConfigRecord(
                    {RUN_KEY: run_key}), grid), timeout=timeout)
            strategy.aggregate_evaluate(server_round, replies)
        end_of_round(server_round, arrays)
    return arrays

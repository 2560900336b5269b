"""SecAgg+ as an adapter of the one round loop: the coordinator sees only the sum.

Flower 1.42 implements SecAgg+ only as a workflow over its legacy strategy API
(``SecAggPlusWorkflow``: four message stages per round). :class:`SecAggGrid` stands in
for the grid of a training round: it runs that workflow once with the train messages
the strategy configured (their tensors in Flower's legacy layout, their names in the
config under ``TENSOR_NAMES_KEY``) and returns the same types as a plain round — one
reply per institution carrying its metrics (its update stays masked) — and hands the
unmasked weighted mean update to ``on_unmasked`` (the strategy folds it:
:meth:`~fedsilo.server.strategy_base.ReportingMixin.absorb_unmasked`). Evaluation
messages, waiting, stragglers, checkpoints and ``--resume`` are the plain round's.

Each institution sends its *update* (trained − received), which Flower's
``secaggplus_mod`` multiplies by ``num_examples / max_weight``, clips to
±``clipping_range``, quantizes to ``quantization_range`` levels and masks; institutions
refuse an update outside that range rather than let it be clipped silently
(:mod:`fedsilo.client.secagg`). What SecAgg+ cannot support is refused in
:mod:`fedsilo.common.config_rules`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from fedsilo.common.config import FederationConfig
from fedsilo.common.wire import INSTITUTION_KEY, TENSOR_NAMES_KEY
from fedsilo.server.waiting import PatientGrid

log = logging.getLogger(__name__)

#: Flower's default: each coordinate maps to one of 2**22 integer levels.
QUANTIZATION_RANGE = 2**22

#: Receives one round's unmasked weighted mean update (by tensor name) and its weight.
OnUnmasked = Callable[[dict[str, np.ndarray], float], None]


def error_bound(clipping_range: float, num_examples: list[int], max_weight: float,
                quantization_range: int = QUANTIZATION_RANGE) -> float:
    """Largest per-coordinate difference between one round's SecAgg+ and exact means.

    Institution i's value ``x·w_i`` (``w_i = n_i / max_weight``) is stochastically
    rounded to a grid of step ``2c / Q`` (error below one step) and its weight to a
    grid of step ``1 / Q`` (error at most half a step, on values of at most ``c``);
    the unmasked sum is divided by the total quantized weight. Over k institutions
    the mean is off by at most ``3 · k · c / (Q · Σ w_i)``.
    """
    total = sum(num_examples) / max_weight
    return 3.0 * len(num_examples) * clipping_range / (quantization_range * total)


class _OneRound(LegacyStrategy):
    """The legacy strategy Flower's workflow drives: the round's messages in, results out."""

    def __init__(self, instructions: dict[int, FitIns], grid: PatientGrid, run_id: int) -> None:
        self.instructions, self.grid, self.run_id = instructions, grid, run_id
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Unused: the round loop owns the global model."""
        return None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """The institutions and instructions the fedsilo strategy chose for this round."""
        return [(GridClientProxy(node, self.grid, self.run_id), fit_ins)  # type: ignore[arg-type]
                for node, fit_ins in self.instructions.items()]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        """Keep the results (each carries the unmasked mean); the global model is not ours."""
        self.results = results
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[Any]:
        """Unused: evaluation runs on the plain round's messages."""
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any],
                           failures: list[Any]) -> tuple[float | None, dict[str, Any]]:
        """Unused."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        """Unused: centralized evaluation runs at the end of the plain round."""
        return None


class _StageReplies:
    """The patient grid, keeping every error reply of the protocol's stages."""

    def __init__(self, grid: PatientGrid) -> None:
        self._grid, self.errors = grid, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.errors += [r for r in replies if r.has_error()]
        return replies


def _institution_reply(node: int, res: FitRes) -> Message:
    """One institution's SecAgg+ result as a plain train reply without tensors."""
    metrics = {k: v for k, v in res.metrics.items() if k != INSTITUTION_KEY}
    content = RecordDict({"metrics": MetricRecord(metrics)})  # type: ignore[arg-type]
    if INSTITUTION_KEY in res.metrics:
        content[INSTITUTION_KEY] = ConfigRecord({"name": str(res.metrics[INSTITUTION_KEY])})
    asked = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content, reply_to=asked)  # from ``node``: the gate names it from there


class SecAggGrid:
    """Delegate to ``grid``; run each training round's messages through SecAgg+."""

    def __init__(self, grid: PatientGrid, context: Context, fed: FederationConfig,
                 on_unmasked: OnUnmasked) -> None:
        self._grid, self._context, self._on_unmasked = grid, context, on_unmasked
        self._timeout = fed.round_timeout
        self.workflow = SecAggPlusWorkflow(
            num_shares=fed.secagg_num_shares, reconstruction_threshold=fed.secagg_threshold,
            max_weight=float(fed.secagg_max_weight), clipping_range=fed.secagg_clipping_range,
            quantization_range=QUANTIZATION_RANGE, timeout=fed.round_timeout)
        log.info("SecAgg+ on: the coordinator sees only the sum of the updates "
                 "(quantization ±%g in %d levels, max weight %d)", fed.secagg_clipping_range,
                 QUANTIZATION_RANGE, fed.secagg_max_weight)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        """Evaluate messages go as they are; train messages make one SecAgg+ round."""
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        return self._secure_round(messages)

    def _secure_round(self, messages: list[Message]) -> list[Message]:
        """Run SecAgg+ for one round; return per-institution replies (metrics or errors)."""
        arrays = messages[0].content["arrays"]
        names = list(arrays.keys())
        config = dict(messages[0].content["config"])
        parameters = compat.arrayrecord_to_parameters(arrays, keep_input=True)
        instructions = {
            msg.metadata.dst_node_id: FitIns(parameters, {
                **dict(msg.content["config"]), TENSOR_NAMES_KEY: names})  # type: ignore[dict-item]
            for msg in messages}
        stages = _StageReplies(self._grid)
        one_round = _OneRound(instructions, stages, self._context.run_id)  # type: ignore[arg-type]
        legacy = LegacyContext(context=self._context, strategy=one_round,
                               config=ServerConfig(round_timeout=self._timeout))
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: int(config["server-round"])})
        legacy.state.array_records[MAIN_PARAMS_RECORD] = arrays
        self.workflow(stages, legacy)  # type: ignore[arg-type]
        replies = list(stages.errors)
        if one_round.results is None:
            log.warning("round %s: SecAgg+ halted (too few institutions stayed for the "
                        "protocol); nothing is aggregated", config["server-round"])
            return replies
        replies += [_institution_reply(proxy.node_id, res)  # type: ignore[attr-defined]
                    for proxy, res in one_round.results]
        if one_round.results:
            mean_update = parameters_to_ndarrays(one_round.results[0][1].parameters)
            self._on_unmasked(dict(zip(names, mean_update, strict=True)),
                              float(sum(res.num_examples for _, res in one_round.results)))
        return replies

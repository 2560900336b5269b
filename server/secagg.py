"""SecAgg+ rounds: Flower's legacy workflow, where the coordinator sees only the sum.

Flower 1.41 offers SecAgg+ only on its legacy ``DefaultWorkflow`` + ``LegacyContext``
path. There every institution sends its *update* (trained − received tensors), which
Flower's ``secaggplus_mod`` multiplies by ``num_examples / max_weight``, quantizes to
``quantization_range`` levels over ±``clipping_range`` and masks; the coordinator
unmasks only the weighted sum and this strategy adds the resulting mean update to the
global tensors. Institutions refuse updates outside the quantization range rather
than let them be clipped silently (``client.messages.check_secagg_range``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Context
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedsilo.common import journal
from fedsilo.common.config import FederationConfig
from fedsilo.common.task import EvalResult
from fedsilo.common.wire import INSTITUTION_KEY
from fedsilo.server.report import RunReport
from fedsilo.server.rounds import evaluation_due

log = logging.getLogger(__name__)

#: Flower's default: each coordinate maps to one of 2**22 integer levels.
QUANTIZATION_RANGE = 2**22

#: Centralized evaluation of the global tensors after a round (None = no holdout).
Evaluator = Callable[[int, dict[str, np.ndarray]], EvalResult | None]


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


def _error_of(failure: BaseException | tuple) -> tuple[int, str]:
    """Code and reason of a failed reply as the legacy workflow hands it over."""
    err = failure.args[0] if isinstance(failure, BaseException) and failure.args else failure
    return int(getattr(err, "code", 0)), str(getattr(err, "reason", err))


class SecAggFedAvg(LegacyFedAvg):
    """FedAvg on SecAgg+ sums of updates, reporting every institution's metrics."""

    def __init__(self, fed: FederationConfig, names: list[str], initial: list[np.ndarray],
                 report: RunReport, evaluator: Evaluator) -> None:
        def round_config(server_round: int) -> dict[str, Scalar]:
            return {"server-round": server_round}

        super().__init__(
            fraction_fit=fed.fraction_train, fraction_evaluate=fed.fraction_train,
            min_fit_clients=fed.min_train, min_evaluate_clients=fed.min_train,
            min_available_clients=fed.min_available,
            initial_parameters=ndarrays_to_parameters(initial),
            on_fit_config_fn=round_config, on_evaluate_config_fn=round_config,
        )
        self.names, self.current = names, initial
        self.report, self.evaluator = report, evaluator
        self.last_round, self.evaluate_every = fed.num_rounds, fed.evaluate_every
        self._finished: set[int] = set()

    def finish(self, server_round: int) -> None:
        """Close a round's report once (after federated evaluation, or when it had none)."""
        if server_round not in self._finished and server_round >= 0:
            self._finished.add(server_round)
            self.report.finish_round(server_round)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Close the previous round and remember the global tensors sent out."""
        self.finish(server_round - 1)
        self.current = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager
                           ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Ask institutions to evaluate only in rounds where ``--evaluate-every`` says so."""
        if not evaluation_due(server_round, self.last_round, self.evaluate_every):
            return []
        return super().configure_evaluate(server_round, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Report every institution and add the unmasked mean update to the globals."""
        for _, res in results:
            self.report.record_update(server_round, str(res.metrics[INSTITUTION_KEY]),
                                      res.metrics, 0)
            journal.append(self.report.journal, "received", round=server_round,
                           institution=str(res.metrics[INSTITUTION_KEY]), update="masked")
        for failure in failures:
            code, reason = _error_of(failure)
            self.report.record_error(server_round, code, reason, None)
        if not results:
            return None, {}
        # Every result carries the same unmasked mean update: SecAgg+ reveals only that.
        mean_update = parameters_to_ndarrays(results[0][1].parameters)
        self.current = [np.asarray(c + u, dtype=c.dtype)
                        for c, u in zip(self.current, mean_update, strict=True)]
        journal.append(self.report.journal, "unmasked", round=server_round,
                       mean_update=journal.digest(dict(zip(self.names, mean_update,
                                                           strict=True))))
        return ndarrays_to_parameters(self.current), {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[
        float, dict[str, Scalar]
    ] | None:
        """Evaluate on the coordinator's holdout, if it has one."""
        arrays = dict(zip(self.names, parameters_to_ndarrays(parameters), strict=True))
        result = self.evaluator(server_round, arrays)
        self.report.record_centralized_eval(server_round, result)
        if server_round == 0:
            self.finish(0)
        if result is None:
            return None
        return result.loss, {"accuracy": result.accuracy, "macro-f1": result.macro_f1}

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Record the example-weighted mean of the local evaluations; close the round."""
        total = sum(res.num_examples for _, res in results)
        if total:
            mean = {key: sum(float(res.metrics[key]) * res.num_examples
                             for _, res in results) / total
                    for key in ("loss", "accuracy", "macro-f1")}
            self.report.record_federated_eval(server_round, {**mean, "num-examples": total})
        self.finish(server_round)
        return (mean["loss"], {}) if total else (None, {})


def run_secagg(grid: Grid, context: Context, fed: FederationConfig, strategy: SecAggFedAvg,
               ) -> dict[str, np.ndarray]:
    """Run all rounds with SecAgg+ and return the final global tensors by name."""
    legacy = LegacyContext(context=context, strategy=strategy,
                           config=ServerConfig(num_rounds=fed.num_rounds,
                                               round_timeout=fed.round_timeout))
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=fed.secagg_num_shares, reconstruction_threshold=fed.secagg_threshold,
        max_weight=float(fed.secagg_max_weight), clipping_range=fed.secagg_clipping_range,
        quantization_range=QUANTIZATION_RANGE, timeout=fed.round_timeout,
    ))
    log.info("SecAgg+ on: the coordinator sees only the sum of the updates "
             "(quantization ±%g in %d levels, max weight %d)", fed.secagg_clipping_range,
             QUANTIZATION_RANGE, fed.secagg_max_weight)
    workflow(grid, legacy)
    strategy.finish(fed.num_rounds)
    return dict(zip(strategy.names, strategy.current, strict=True))

"""What local evaluation may release: nothing, or DP-noised counts charged to the ledger.

One exact evaluation of a crafted model is already a membership oracle (its accuracy
moves by exactly ``1/n`` with one record), so a deployed institution releases no local
evaluation unless it opts in (``release-evaluation = true`` in client.toml); the
coordinator evaluates on data it holds. With the opt-in it releases two Gaussian-noised
counts, correct predictions and test records (σ = ``evaluation-noise`` each; adding or
removing one record changes the pair by at most √2 in L2), recorded in the ledger
*before* the reply as one Gaussian-mechanism step (``steps=1``, ``sample_rate=1``,
``noise_multiplier=σ/√2``, ``kind="evaluate"``) through Opacus's accountant. At most one
per round of the run (1 … the agreed ``num-rounds``), and only within the institution's
ε target; anything else is declined. With the opt-in, training's noise is calibrated
for the run's training plus one evaluation per round (:func:`reserve`). Accuracy and
``num-examples`` are post-processing of the two noised counts; loss and macro-F1 are
not released.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from opacus.accountants import create_accountant

from fedsilo.client.ledger import Ledger
from fedsilo.client.policy import Policy
from fedsilo.client.privacy import DeclinedError, add_steps
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.task import EvalResult

#: Declines of a local evaluation (no data-derived detail).
NOT_RELEASED = ("declined: this institution does not release local evaluation; the "
                "coordinator evaluates on its own data")
ALREADY = ("declined: this round's local evaluation was already released or is outside "
           "the run's rounds (one per round)")
OVER_BUDGET = "declined: a noised evaluation would pass this institution's ε target"


def reserve(prior: list[tuple[float, float, int]], policy: Policy, num_rounds: int
            ) -> list[tuple[float, float, int]]:
    """``prior`` plus, when ``policy`` releases noised evaluations, one per round of the run.

    Training's noise is calibrated on this, so that the run's training *and* its
    evaluations fit the ε target together and an evaluation never makes a later round
    decline.
    """
    if policy.evaluation != "noised":
        return list(prior)
    return add_steps(list(prior), evaluation_sigma(policy.evaluation_noise), 1.0, num_rounds)


def evaluation_sigma(noise: float) -> float:
    """Noise multiplier of the two-count release: σ over its L2 sensitivity √2."""
    return noise / math.sqrt(2.0)


def admit(ledger: Ledger, run: int, server_round: int, num_rounds: int, noise: float,
          delta: float, target_epsilon: float) -> None:
    """Decline a noised evaluation outside the per-run cap or the ε target.

    Raises
    ------
    DeclinedError
        With a generic reason.
    """
    if not 1 <= server_round <= num_rounds or ledger.has(run, server_round, "evaluate"):
        raise DeclinedError(ALREADY)
    sigma = evaluation_sigma(noise)
    for history, limit in ((ledger.run_history(run), target_epsilon),  # the run's agreed ε
                           (ledger.history(), ledger.lifetime)):  # the dataset's lifetime ε
        acc = create_accountant(ledger.accountant)
        acc.history = add_steps(history, sigma, 1.0, 1)
        if float(acc.get_epsilon(delta)) > limit:
            raise DeclinedError(OVER_BUDGET)


def noised_metrics(res: EvalResult, noise: float,
                   rng: np.random.Generator | None = None) -> dict[str, float]:
    """Accuracy and record count from Gaussian-noised counts (call after recording)."""
    rng = rng or np.random.default_rng()  # seeded from the OS
    correct = round(res.accuracy * res.num_examples) + rng.normal(0.0, noise)
    total = res.num_examples + rng.normal(0.0, noise)
    count = max(round(total), 1)
    return {"num-examples": count, "accuracy": float(min(max(correct / count, 0.0), 1.0))}


def release(ledger: Ledger, run: int, server_round: int, cfg: FedsiloConfig, delta: float,
            noise: float, evaluate: Callable[[], EvalResult]) -> tuple[dict[str, float], float]:
    """Admit, evaluate, record in the ledger, then noise: the metrics and ε after.

    Raises
    ------
    DeclinedError
        From :func:`admit`, before any evaluation.
    """
    admit(ledger, run, server_round, cfg.federation.num_rounds, noise, delta,
          cfg.privacy.target_epsilon)
    res = evaluate()
    epsilon = ledger.record(run, server_round, 1, 1.0, evaluation_sigma(noise), delta,
                            kind="evaluate")  # before anything leaves
    return noised_metrics(res, noise), epsilon


def exact_metrics(res: EvalResult) -> dict[str, float]:
    """Every metric, exact: only a simulation's virtual institutions release these."""
    return {"num-examples": res.num_examples, "loss": res.loss, "accuracy": res.accuracy,
            "macro-f1": res.macro_f1}


def released(policy: Policy, evaluate: Callable[[], EvalResult],
             open_ledger: Callable[[], Ledger], run: int, server_round: int,
             cfg: FedsiloConfig, delta: float) -> tuple[dict[str, float], dict[str, object]]:
    """What one local evaluation releases under ``policy``, and what the journal keeps.

    Raises
    ------
    DeclinedError
        If nothing may leave (not opted in, over the cap or the budget).
    """
    if policy.evaluation == "exact":  # a simulation's virtual institution
        res = evaluate()
        return exact_metrics(res), {"num_examples": res.num_examples, "accuracy": res.accuracy}
    if policy.evaluation != "noised":
        raise DeclinedError(NOT_RELEASED)
    metrics, epsilon = release(open_ledger(), run, server_round, cfg, delta,
                               policy.evaluation_noise, evaluate)
    return metrics, {"released": metrics, "epsilon": epsilon}

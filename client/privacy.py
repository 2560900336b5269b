"""Privacy accounting for one institution: calibrate noise, carry the accountant.

The noise multiplier is calibrated once, by Opacus, for the institution's whole
planned participation (every round of the run), so the cumulative ε after the last
round stays within the target. The accountant's history is carried from round to
round, so the ε reported is cumulative, never per round.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from flwr.app import ConfigRecord
from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

STATE_KEY = "fedsilo.privacy"


class BudgetExceededError(RuntimeError):
    """Training this round would take the institution past its ε target."""


def default_delta(num_examples: int) -> float:
    """δ used when none is set: ``min(1e-5, 0.1 / n)``, always below ``1 / n``."""
    return min(1e-5, 0.1 / num_examples)


@dataclass(frozen=True)
class DPPlan:
    """The DP-SGD parameters an institution uses in every round of a run."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_steps: int
    target_epsilon: float
    delta: float


@functools.lru_cache(maxsize=16)
def plan(
    *,
    num_examples: int,
    batch_size: int,
    local_epochs: int,
    num_rounds: int,
    target_epsilon: float,
    delta: float,
    accountant: str,
) -> DPPlan:
    """Calibrate the noise multiplier for all planned rounds with Opacus.

    Poisson sampling with expected batch ``batch_size`` gives sample rate
    ``1 / ceil(n / batch_size)`` and that many steps per epoch (as Opacus's
    ``DPDataLoader`` does). Calibration is a binary search over the accountant
    (seconds), so results are cached per process.
    """
    steps_per_epoch = math.ceil(num_examples / batch_size)
    sample_rate = 1.0 / steps_per_epoch
    steps_per_round = steps_per_epoch * local_epochs
    planned = steps_per_round * num_rounds
    sigma = get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=planned,
        accountant=accountant,
    )
    return DPPlan(sigma, sample_rate, steps_per_round, planned, target_epsilon, delta)


def restore_accountant(state: ConfigRecord | None, mechanism: str) -> IAccountant:
    """Rebuild the accountant from what earlier rounds stored (empty on round 1)."""
    accountant = create_accountant(mechanism)
    if state is not None:
        history = zip(state["noise"], state["rate"], state["steps"], strict=True)
        accountant.history = _merged([(float(s), float(q), int(k)) for s, q, k in history])
    return accountant


def _merged(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Merge consecutive entries with the same noise and rate, as Opacus does."""
    out: list[tuple[float, float, int]] = []
    for sigma, rate, steps in history:
        if out and out[-1][:2] == (sigma, rate):
            out[-1] = (sigma, rate, out[-1][2] + steps)
        else:
            out.append((sigma, rate, steps))
    return out


def accountant_record(accountant: IAccountant) -> ConfigRecord:
    """Serialise the accountant's history for the node's persistent state."""
    history = accountant.history
    return ConfigRecord(
        {
            "noise": [float(s) for s, _, _ in history],
            "rate": [float(q) for _, q, _ in history],
            "steps": [int(k) for _, _, k in history],
        }
    )


def spent_epsilon(accountant: IAccountant, delta: float) -> float:
    """ε spent so far (0 before any step)."""
    return float(accountant.get_epsilon(delta)) if accountant.history else 0.0


def check_budget(accountant: IAccountant, dp_plan: DPPlan) -> float:
    """Return the ε this round would bring the total to; raise if over target.

    Raises
    ------
    BudgetExceededError
        If one more round at the planned noise would pass the target ε.
    """
    trial = create_accountant(accountant.mechanism())
    trial.history = _merged(
        [
            *accountant.history,
            (dp_plan.noise_multiplier, dp_plan.sample_rate, dp_plan.steps_per_round),
        ]
    )
    after = float(trial.get_epsilon(dp_plan.delta))
    if after > dp_plan.target_epsilon:
        before = spent_epsilon(accountant, dp_plan.delta)
        raise BudgetExceededError(
            f"declined: this round would raise ε from {before:.3f} to {after:.3f}, above "
            f"the target {dp_plan.target_epsilon} (δ={dp_plan.delta:.2e})"
        )
    return after

"""Privacy accounting for one institution: calibrate the noise, enforce the budget.

Three numbers: the run's ε (its ``target-epsilon``, pinned by the agreement), the
dataset's lifetime ε (``lifetime-epsilon`` in client.toml) and what is left. The noise
multiplier is calibrated once per run, with Opacus's accountant, so that the run's whole
planned participation (every round) spends its agreed ε. A run the dataset's remaining
lifetime budget cannot pay is declined before its first step (never recalibrated to
the leftover); before each round the client also checks that the run stays within its
agreed ε. ε is always computed by Opacus from the ledger's history.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

History = tuple[tuple[float, float, int], ...]
#: Upper end of the noise bisection when a run reserves other releases.
_SIGMA_MAX = 1000.0


class DeclinedError(RuntimeError):
    """The institution declines this round (not a failure of the run)."""


class BudgetExceededError(DeclinedError):
    """Training this round would take the dataset past the institution's ε target."""


@dataclass(frozen=True)
class DPPlan:
    """The DP-SGD parameters an institution uses in every round of a run."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_steps: int
    target_epsilon: float
    delta: float
    #: The count the plan was made for (the institution's released count); Opacus's
    #: expected batch is ``int(num_examples * sample_rate)``, as it computes it.
    num_examples: int
    reserved: History = ()  # this run's other releases (noised evaluations), within its ε

    @property
    def expected_batch_size(self) -> int:
        """What each noised step's sum is divided by (never the exact local count)."""
        return max(int(self.num_examples * self.sample_rate), 1)


def add_steps(history: list[tuple[float, float, int]], sigma: float, rate: float,
              steps: int) -> list[tuple[float, float, int]]:
    """Append ``steps`` at ``(σ, q)`` to an accountant history, merging like Opacus."""
    if history and history[-1][:2] == (sigma, rate):
        return [*history[:-1], (sigma, rate, history[-1][2] + steps)]
    return [*history, (sigma, rate, steps)]


def _epsilon(history: History, mechanism: str, delta: float) -> float:
    acc = create_accountant(mechanism)
    acc.history = list(history)
    return float(acc.get_epsilon(delta))


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
    reserved: History = (),
) -> DPPlan:
    """Calibrate the noise multiplier for all planned rounds of one run with Opacus.

    ``num_examples`` is the count the institution releases (``declared-examples``, else
    the exact one): nothing in the plan follows the exact count when one is declared.
    Poisson sampling with expected batch ``batch_size`` gives sample rate
    ``1 / ceil(n / batch_size)`` and that many steps per epoch (as Opacus's
    ``DPDataLoader`` does). ``target_epsilon`` is the run's agreed ε, spent by this
    run alone: the noise never depends on what earlier runs spent (a dataset whose
    lifetime budget cannot pay it declines the run, :func:`check_lifetime`). ``reserved``
    is the run's other planned releases (its noised evaluations): with it, the same
    bisection runs over Opacus's accountant of reserved plus training, so both fit the
    run's ε together. Calibration takes seconds, so results are cached per process.

    Raises
    ------
    BudgetExceededError
        If the reserved releases alone leave no room for training at any noise level.
    """
    steps_per_epoch = math.ceil(num_examples / batch_size)
    sample_rate = 1.0 / steps_per_epoch
    steps_per_round = steps_per_epoch * local_epochs
    planned = steps_per_round * num_rounds
    if not reserved:
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                     sample_rate=sample_rate, steps=planned,
                                     accountant=accountant)
        return DPPlan(sigma, sample_rate, steps_per_round, planned, target_epsilon, delta,
                      num_examples)

    def fits(s: float) -> bool:
        return _epsilon((*reserved, (s, sample_rate, planned)), accountant, delta) <= target_epsilon

    if not fits(_SIGMA_MAX):
        raise BudgetExceededError("declined: budget: this run's agreed ε cannot pay its "
                                  "planned evaluations and training together")
    low, sigma = 0.0, _SIGMA_MAX
    while sigma - low > 0.01 * sigma:
        mid = (low + sigma) / 2
        low, sigma = (low, mid) if fits(mid) else (mid, sigma)
    return DPPlan(sigma, sample_rate, steps_per_round, planned, target_epsilon, delta,
                  num_examples, reserved)


def check_lifetime(prior: History, dp_plan: DPPlan, accountant: str,
                   lifetime: float) -> float:
    """Return the dataset's ε after the whole planned run; raise if over its lifetime ε.

    ``prior`` is the dataset's spend outside this run (other runs, evaluations,
    migrated ledgers). The whole run is reserved, so a run is declined before its
    first step rather than diluted or cut short.

    Raises
    ------
    BudgetExceededError
        With a generic reason (the run's agreed ε, nothing about the data).
    """
    total = add_steps([*prior, *dp_plan.reserved], dp_plan.noise_multiplier, dp_plan.sample_rate,
                      dp_plan.planned_steps)
    after = _epsilon(tuple(total), accountant, dp_plan.delta)
    if after > lifetime:
        raise BudgetExceededError(
            f"declined: budget: this institution's remaining lifetime privacy budget for "
            f"this dataset cannot pay this run's agreed ε={dp_plan.target_epsilon:g}")
    return after


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
    history = add_steps(list(accountant.history), dp_plan.noise_multiplier,
                        dp_plan.sample_rate, dp_plan.steps_per_round)
    after = _epsilon(tuple(history), accountant.mechanism(), dp_plan.delta)
    if after > dp_plan.target_epsilon:
        before = spent_epsilon(accountant, dp_plan.delta)
        raise BudgetExceededError(
            f"declined: this round would raise ε from {before:.3f} to {after:.3f}, above "
            f"the target {dp_plan.target_epsilon} (δ={dp_plan.delta:.2e})"
        )
    return after

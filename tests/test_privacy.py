import pytest
from opacus.accountants import RDPAccountant, create_accountant

from fedsilo.client import privacy


def _plan(**kw):
    args = dict(num_examples=1000, batch_size=50, local_epochs=2, num_rounds=3,
                target_epsilon=4.0, delta=1e-5, accountant="rdp")
    return privacy.plan(**(args | kw))


def test_plan_matches_poisson_loader_and_meets_target():
    p = _plan()
    assert p.sample_rate == pytest.approx(1 / 20)
    assert p.steps_per_round == 40 and p.planned_steps == 120
    acc = RDPAccountant()
    acc.history = [(p.noise_multiplier, p.sample_rate, p.planned_steps)]
    assert acc.get_epsilon(1e-5) <= 4.0


def test_accountant_state_carries_across_rounds_cumulatively():
    p = _plan()
    record = None
    eps = []
    for _ in range(3):
        acc = privacy.restore_accountant(record, "rdp")
        privacy.check_budget(acc, p)
        acc.history.append((p.noise_multiplier, p.sample_rate, p.steps_per_round))
        record = privacy.accountant_record(acc)
        eps.append(privacy.spent_epsilon(acc, p.delta))
    assert eps[0] < eps[1] < eps[2] <= p.target_epsilon
    for k, value in enumerate(eps, start=1):
        fresh = RDPAccountant()
        fresh.history = [(p.noise_multiplier, p.sample_rate, k * p.steps_per_round)]
        assert value == pytest.approx(fresh.get_epsilon(p.delta), rel=1e-9)


def test_budget_check_declines_a_round_past_the_target():
    p = _plan()
    acc = create_accountant("rdp")
    acc.history = [(p.noise_multiplier, p.sample_rate, p.planned_steps)]
    with pytest.raises(privacy.BudgetExceededError, match="above the target 4.0"):
        privacy.check_budget(acc, p)


def test_default_delta_is_below_one_over_n():
    for n in (10, 5000, 10**7):
        assert privacy.default_delta(n) < 1 / n

import pytest
from opacus.accountants import RDPAccountant, create_accountant

from fedsilo.client import privacy
from fedsilo.common.bounds import default_delta


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


def test_earlier_spend_never_dilutes_the_noise_a_run_the_lifetime_cannot_pay_is_declined():
    fresh = _plan()
    prior = ((fresh.noise_multiplier, fresh.sample_rate, 60),)  # half of an earlier run
    after = privacy.check_lifetime(prior, fresh, "rdp", lifetime=10.0)
    acc = RDPAccountant()
    acc.history = [*prior, (fresh.noise_multiplier, fresh.sample_rate, fresh.planned_steps)]
    assert after == pytest.approx(acc.get_epsilon(1e-5))
    with pytest.raises(privacy.BudgetExceededError, match="agreed ε=4") as err:
        privacy.check_lifetime(prior, fresh, "rdp", lifetime=after - 0.01)
    assert "spent" not in str(err.value)  # a generic reason: nothing about the data's history


def test_budget_check_declines_a_round_past_the_target():
    p = _plan()
    acc = create_accountant("rdp")
    acc.history = [(p.noise_multiplier, p.sample_rate, p.planned_steps)]
    with pytest.raises(privacy.BudgetExceededError, match="above the target 4.0"):
        privacy.check_budget(acc, p)
    acc.history = [(p.noise_multiplier, p.sample_rate, p.planned_steps - p.steps_per_round)]
    assert privacy.check_budget(acc, p) <= 4.0


def test_default_delta_is_below_one_over_n():
    for n in (10, 5000, 10**7):
        assert default_delta(n) < 1 / n

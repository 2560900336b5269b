import pytest

from fedsilo.client.policy import PolicyError, institution_config
from fedsilo.client.settings import DEFAULT_LIFETIME_EPSILON
from fedsilo.common.config import ConfigError, FedsiloConfig
from fedsilo.server.gateway import is_public_route

NODE = {"institution": "h", "data": "/d.csv"}


def test_coordinator_cannot_loosen_the_institution_policy():
    run = FedsiloConfig().replace(target_epsilon=20.0, target_delta=0.1, max_grad_norm=5.0)
    cfg, policy = institution_config(run, {"institution": "h", "data": "/d.csv",
                                           "target-epsilon": 3.0, "max-grad-norm": 0.5})
    assert cfg.privacy.target_epsilon == 3.0
    assert cfg.privacy.max_grad_norm == 0.5
    assert cfg.data.data == "/d.csv" and cfg.data.holdout_fraction == 0.0
    # The run's δ=0.1 is capped by the institution's automatic δ.
    assert policy.delta(cfg.privacy.target_delta, 1000) == pytest.approx(1e-5)


def test_a_stricter_run_is_kept():
    run = FedsiloConfig().replace(target_epsilon=2.0, target_delta=1e-7)
    cfg, policy = institution_config(run, {**NODE, "target-epsilon": 8.0, "target-delta": 1e-5})
    assert cfg.privacy.target_epsilon == 2.0
    assert policy.delta(cfg.privacy.target_delta, 1000) == 1e-7


def test_split_and_budget_are_the_institutions():
    run = FedsiloConfig().replace(seed=43, test_fraction=0.99, max_examples=5)
    cfg, policy = institution_config(run, NODE)
    assert (cfg.train.seed, cfg.data.test_fraction, cfg.data.max_examples) == (42, 0.1, 0)
    assert policy.lifetime_epsilon == DEFAULT_LIFETIME_EPSILON
    cfg, policy = institution_config(run, {**NODE, "test-fraction": 0.3, "lifetime-epsilon": 4,
                                           "dataset-id": "notes-2026"})
    assert cfg.data.test_fraction == 0.3 and policy.lifetime_epsilon == 4.0
    assert policy.dataset_id == "notes-2026"
    with pytest.raises(ConfigError, match="lifetime-epsilon"):
        institution_config(run, {**NODE, "lifetime-epsilon": 0})


def test_dp_off_needs_the_institutions_consent():
    run = FedsiloConfig().replace(dp=False)
    with pytest.raises(PolicyError, match="allow-no-dp"):
        institution_config(run, NODE)
    cfg, _ = institution_config(run, {**NODE, "allow-no-dp": True})
    assert not cfg.privacy.dp


def test_unknown_node_setting_is_rejected():
    with pytest.raises(ConfigError, match="num-rounds"):
        institution_config(FedsiloConfig(), {**NODE, "num-rounds": 100})


def test_a_supernode_without_institution_settings_is_refused():
    with pytest.raises(PolicyError, match="flower-client"):
        institution_config(FedsiloConfig(), {"target-epsilon": 1.0})


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("POST", "/v1/fleet/pull-messages", True),
    ("GET", "/health", True),
    ("POST", "/v1/control/start-run", False),
    ("POST", "/v1/runtime/push-logs", False),
    ("GET", "/v1/fleet/pull-messages", False),
    ("POST", "/v1/fleet/../control/start-run", False),
    ("GET", "/docs", False),
])
def test_gateway_passes_only_the_fleet_api(method, path, allowed):
    assert is_public_route(method, path) is allowed

import argparse
import json
import tomllib
from pathlib import Path

import pytest

from fedsilo.common.config import (
    KEYS,
    ConfigError,
    FedsiloConfig,
    parse_labels,
)
from fedsilo.common.config_flags import add_config_arguments, config_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_round_trip_through_the_flat_view():
    cfg = FedsiloConfig()
    assert cfg.privacy.dp is True
    assert FedsiloConfig.from_flat(cfg.to_flat()) == cfg


def test_flat_keys_are_unique_kebab_case():
    assert all(k == k.lower() and "_" not in k for k in KEYS)
    assert {"target-epsilon", "num-rounds", "data", "model", "output-dir"} <= set(KEYS)


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("target-epsilon", -1.0, "target-epsilon"),
        ("target-epsilon", 0.0, "greater than 0"),
        ("target-delta", 1.0, "target-delta"),
        ("max-grad-norm", 0.0, "--max-grad-norm"),
        ("partition", "random", "'iid', 'dirichlet' or 'column'"),
        ("num-rounds", "three", "--num-rounds"),
        ("device", "tpu", "--device"),
    ],
)
def test_invalid_values_name_the_key_and_flag(key, value, needle):
    with pytest.raises(ConfigError) as err:
        FedsiloConfig.from_flat({key: value}, origin="run config")
    assert needle in str(err.value)
    assert str(err.value).startswith("run config: invalid")


def test_unknown_key_is_rejected_with_a_suggestion():
    with pytest.raises(ConfigError, match="unknown setting 'target-epsilom'.*target-epsilon"):
        FedsiloConfig.from_flat({"target-epsilom": 3.0})


def test_cross_field_check():
    with pytest.raises(ConfigError, match="min-train"):
        FedsiloConfig.from_flat({"min-train": 5, "min-available": 2})


def test_labels_from_json_file_and_empty(tmp_path):
    assert parse_labels('["a, with comma", "b"]') == ("a, with comma", "b")
    path = tmp_path / "labels.txt"
    path.write_text("x\n\ny\n", "utf-8")
    assert parse_labels(str(path)) == ("x", "y")
    assert parse_labels("") == ()
    with pytest.raises(ConfigError, match="no file"):
        parse_labels("missing.txt")
    cfg = FedsiloConfig.from_flat({"labels": json.dumps(["p", "q"])})
    assert cfg.data.labels == ("p", "q")
    assert FedsiloConfig.from_flat(cfg.to_flat()).data.labels == ("p", "q")


def test_cli_flags_are_generated_from_the_schema_and_only_given_ones_override():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ["privacy", "federation"], "simulation")
    args = parser.parse_args(["--target-epsilon", "3", "--no-dp", "--strategy", "fedadam"])
    overrides = config_overrides(args)
    assert overrides == {"target-epsilon": 3.0, "dp": False, "strategy": "fedadam"}
    cfg = FedsiloConfig.from_flat(overrides)
    assert cfg.privacy.target_epsilon == 3.0 and not cfg.privacy.dp
    with pytest.raises(SystemExit):
        parser.parse_args(["--strategy", "fedsgd"])


def test_pyproject_flower_run_config_matches_schema_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    table = pyproject["tool"]["flwr"]["app"]["config"]
    assert table == FedsiloConfig().to_flat()
    components = pyproject["tool"]["flwr"]["app"]["components"]
    assert components["serverapp"] == "fedsilo.server.server_app:app"
    assert components["clientapp"] == "fedsilo.client.client_app:app"

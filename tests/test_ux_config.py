"""Institutions from the data, and every configuration error names a flag that exists."""

import importlib.util
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest
from make_long_texts import make_rows, write_csv

from fedsilo.common import config
from fedsilo.common.config import KEYS, ConfigError, FedsiloConfig, parse_labels
from fedsilo.common.config_rules import cross_check
from fedsilo.common.partition import partition_by_column, partition_dirichlet, partition_iid
from fedsilo.server.cli import build_parser as server_parser

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--([a-z0-9][a-z0-9-]*)")


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "run_simulation_ux", ROOT / "simulations" / "run_simulation.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flags(parser) -> set[str]:
    return {s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--")}


CROSS_CHECKS = [  # one config per check in common/config_rules.cross_check
    {"min-train": 5, "min-available": 2},
    {"strategy": "median", "secure-aggregation": True},
    {"strategy": "trimmed-mean", "dp-level": "client"},
    {"secure-aggregation": True, "strategy": "fedadam"},
    {"secure-aggregation": True, "min-train": 1, "min-available": 1},
    {"secure-aggregation": True, "dp-level": "client"},
    {"update-dtype": "float16", "secure-aggregation": True},
    {"update-dtype": "float16", "dp-level": "client", "strategy": "fedavg"},
    {"resume": True, "dp-level": "client", "strategy": "fedavg"},
    {"strategy": "scaffold"},
    {"dp-level": "client", "strategy": "fedadam"},
]


def _messages() -> list[str]:
    found = []
    calls = [lambda c=c: FedsiloConfig.from_flat(c) for c in CROSS_CHECKS]
    calls += [lambda k=k: FedsiloConfig.from_flat({k: {"not": "a value"}}) for k in KEYS]
    calls += [lambda: FedsiloConfig.from_flat({"target-epsilom": 1.0}),
              lambda: parse_labels("[1, "), lambda: parse_labels('{"a": 1}'),
              lambda: parse_labels("no-such-labels-file.txt")]
    for call in calls:
        with pytest.raises(ConfigError) as err:
            call()
        found.append(str(err.value))
    for call in (lambda: partition_by_column(["a", "b"], 3),
                 lambda: partition_iid(3, 4, 0), lambda: partition_iid(3, 0, 0),
                 lambda: partition_dirichlet([0, 1] * 5, 2, 0.0, 0),
                 lambda: partition_dirichlet([0, 1] * 5, 3, 1.0, 0, 4),
                 lambda: partition_dirichlet([0] * 15 + [1] * 15, 3, 0.01, 0, 10)):
        with pytest.raises(ValueError) as err:
            call()
        found.append(str(err.value))
    return found


def test_every_cross_check_is_walked():
    source = inspect.getsource(cross_check)
    messages = {m for m in _messages()[:len(CROSS_CHECKS)]}
    assert len(messages) == source.count("raise ValueError") == len(CROSS_CHECKS)


def test_every_config_error_names_only_flags_that_exist(sim):
    simulation, server = _flags(sim.build_parser()), _flags(server_parser())
    for message in _messages():
        named = set(FLAG.findall(message))
        assert named, f"names no flag: {message}"
        assert named <= simulation | server, f"{named - simulation - server}: {message}"
    assert "institutions" in simulation  # the flag the partition messages name


def test_column_partition_takes_the_institution_count_from_the_data(sim, tmp_path):
    data = write_csv(tmp_path / "long.csv", make_rows(40, 20, 2, seed=1))
    args = sim.build_parser().parse_args(["--data", str(data), "--partition", "column"])
    assert sim.count_institutions(args) == 2
    cfg = sim.resolve_config(args)
    assert cfg.federation.min_train == cfg.federation.min_available == 2
    three = sim.build_parser().parse_args(["--data", str(data), "--partition", "column",
                                           "--institutions", "3"])
    assert sim.count_institutions(three) == 3  # the user's say wins ...
    assert sim.main(["--data", str(data), "--partition", "column", "--institutions", "3",
                     "--output-dir", str(tmp_path / "out")]) == 2  # ... and is checked
    assert not (tmp_path / "out").exists()
    assert sim.count_institutions(sim.build_parser().parse_args([])) == 3  # demo default


def test_config_source_names_flags_not_setting_keys():
    text = inspect.getsource(config)
    assert "num_partitions" not in text and "'labels' must" not in text


def test_each_command_offers_only_its_roles_settings(sim, logs):
    """flower-server has no flags for the institutions' data and split; both --help work."""
    from fedsilo.common.config_flags import SIMULATION_ONLY
    from fedsilo.server import cli as server_cli

    simulation, server = _flags(sim.build_parser()), _flags(server_parser())
    assert SIMULATION_ONLY <= simulation and not SIMULATION_ONLY & server
    assert {"eval-data", "max-examples", "text-column"} <= server  # the coordinator's holdout
    assert "agreement-id" in server and "agreement-id" not in simulation
    assert server_cli.main(["--partition", "iid", "--num-rounds", "1"]) == 2
    assert "--partition: simulation setting" in logs.text and "run_simulation.py" in logs.text
    for parser in (sim.build_parser(), server_parser()):  # "95%" in a help text once broke it
        with pytest.raises(SystemExit) as done:
            parser.parse_args(["--help"])
        assert done.value.code == 0

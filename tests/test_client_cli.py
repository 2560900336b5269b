import logging
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fedsilo.client.cli import ClientSetupError, load_client_config
from fedsilo.client.runtime_launch import supernode_command
from fedsilo.common.deidentify import DeidSettings


def _toml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "kit" / "client.toml"
    path.parent.mkdir()
    path.write_text(body, "utf-8")
    return path


def test_relative_paths_resolve_against_the_kit_and_flags_override(tmp_path):
    path = _toml(tmp_path, 'institution = "h-1"\nsuperlink = "fl.example.org:9092"\n'
                           'root-certificates = "ca.pem"\nauth-private-key = "node.key"\n'
                           'data = "data/my file.csv"\ntarget-epsilon = 4.0\n')
    settings = load_client_config(path, {"target-epsilon": 2.0, "data": None})
    assert settings["root-certificates"] == str(path.parent / "ca.pem")
    assert settings["data"] == str(path.parent / "data" / "my file.csv")
    assert settings["target-epsilon"] == 2.0


def test_unknown_key_and_missing_data_name_the_file_and_key(tmp_path):
    path = _toml(tmp_path, 'institution = "h"\nsuperlink = "x:1"\ndata = "d.csv"\nepsilon = 3\n')
    with pytest.raises(ClientSetupError, match=r"client.toml: unknown key\(s\) \['epsilon'\]"):
        load_client_config(path, {})
    with pytest.raises(ClientSetupError, match="missing 'data'.*--data"):
        load_client_config(None, {"institution": "h", "superlink": "x:1"})


def test_node_config_reaches_flower_intact():
    settings = {"institution": "hospital-a", "superlink": "fl:9092", "data": "/d/my notes.csv",
                "text-column": "note", "target-epsilon": 3.0, "allow-no-dp": True,
                "root-certificates": "/k/ca.pem", "auth-private-key": "/k/node.key"}
    cmd = supernode_command(settings, 9999)
    node = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert DeidSettings.from_node(node.pop("deidentify")) == DeidSettings()  # on by default
    assert node == {"institution": "hospital-a", "data": "/d/my notes.csv",
                    "text-column": "note", "target-epsilon": 3.0, "allow-no-dp": True}
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == "/k/node.key"
    assert "--insecure" not in cmd


def test_ledger_command_prints_spend_against_the_budget(tmp_path, caplog):
    from fedsilo.client import cli
    from fedsilo.client.ledger import Ledger

    ledger = Ledger.open(tmp_path / "ledger", "e" * 64, "rdp")
    eps = ledger.record(3, 1, 40, 0.05, 1.0, 1e-5)
    args = ["--ledger", "--institution", "h", "--superlink", "x:1", "--data", "d.csv",
            "--ledger-dir", str(tmp_path / "ledger"), "--lifetime-epsilon", "6"]
    logger = logging.getLogger("fedsilo")
    logger.addHandler(caplog.handler)
    try:
        assert cli.main(args) == 0
    finally:
        logger.removeHandler(caplog.handler)
    assert f"ε spent {eps:.4f} / lifetime 6 / left {6 - eps:.4f}" in caplog.text
    assert "1 release(s) in 1 run(s); trusted" in caplog.text


def test_the_kit_template_and_the_flags_follow_client_tomls_schema():
    """One schema (client/settings.py): the kit documents only its keys, flags mirror it."""
    import re
    import tomllib

    from fedsilo.client.cli import build_parser
    from fedsilo.client.settings import DEID_KEY, SCHEMA, check
    from fedsilo.server.kit_template import client_toml

    text = client_toml("hospital-a", "fl.example.org:9092", "ab" * 32)
    written = set(tomllib.loads(text)) - {DEID_KEY}
    top = text.split("[deidentify]")[0]  # that table has its own schema (DeidSettings)
    commented = set(re.findall(r"^# ([a-z][a-z0-9-]*) = ", top, re.MULTILINE))
    assert written and commented and (written | commented) <= set(SCHEMA)
    settings = tomllib.loads(text)
    check(settings, "kit")  # the kit as written passes its own schema
    flags = {s[2:] for a in build_parser()._actions for s in a.option_strings}
    assert set(SCHEMA) <= flags

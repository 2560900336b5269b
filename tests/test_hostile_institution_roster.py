"""Identity in a deployment comes from the node key the SuperLink verified.

``flower-server`` registers every allow-listed key, then writes the roster (node id →
institution, expected examples) that ``$FEDSILO_ROSTER`` names for the ServerApp. A
node whose key is registered but no longer on the allow-list maps to nobody.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsilo.common.certs import public_key_fingerprint
from fedsilo.server.allowlist import Allowed, public_line
from fedsilo.server.gate import ROSTER_ENV, load_roster
from fedsilo.server.launch import LaunchError, SuperLink, write_roster


def _keys(folder: Path, names, expected=None) -> tuple[dict[str, Allowed], dict[str, bytes]]:
    allowed, pems = {}, {}
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1()).public_key()
        (folder / f"{name}.pub").write_bytes(public_line(key, name))
        allowed[name] = Allowed(folder / f"{name}.pub", public_key_fingerprint(key),
                                (expected or {}).get(name))
        pems[name] = key.public_bytes(serialization.Encoding.PEM,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    return allowed, pems


class _Link:
    log_file = Path("superlink.log")

    def __init__(self, nodes: dict[int, bytes]) -> None:
        self.nodes = nodes

    def node_keys(self) -> dict[int, bytes]:
        return self.nodes


def test_the_roster_maps_node_ids_by_key_and_skips_keys_off_the_allow_list(tmp_path):
    allowed, pems = _keys(tmp_path, ["hospital-a", "hospital-b", "removed"],
                          {"hospital-a": 5000})
    del allowed["removed"]  # registered earlier, since taken off the allow-list
    link = _Link({11: pems["hospital-a"], 22: pems["hospital-b"], 33: pems["removed"],
                  44: b"not a key"})
    write_roster(link, allowed, tmp_path / "roster.json")
    roster = load_roster({ROSTER_ENV: str(tmp_path / "roster.json")})
    assert roster.nodes == {11: "hospital-a", 22: "hospital-b"}
    assert roster.expected == {"hospital-a": 5000}
    assert stat.S_IMODE((tmp_path / "roster.json").stat().st_mode) == 0o600


def test_an_allow_listed_institution_without_a_node_stops_the_launch(tmp_path):
    allowed, pems = _keys(tmp_path, ["hospital-a", "hospital-b"])
    with pytest.raises(LaunchError, match="hospital-b"):
        write_roster(_Link({11: pems["hospital-a"]}), allowed, tmp_path / "roster.json")
    assert not (tmp_path / "roster.json").exists()


def test_an_unreadable_roster_stops_the_server_app_instead_of_trusting_replies(tmp_path):
    (tmp_path / "roster.json").write_text("{")
    with pytest.raises(ValueError, match=ROSTER_ENV.strip("$")):
        load_roster({ROSTER_ENV: str(tmp_path / "roster.json")})


@pytest.mark.slow
def test_a_real_superlink_registration_gives_the_roster_and_survives_a_restart(tmp_path):
    """Keys registered through ``flwr supernode register``; the second start finds them."""
    allowed, _ = _keys(tmp_path, ["hospital-a", "hospital-b"], {"hospital-b": 70})
    rosters = []
    for _ in range(2):  # a restart on the same state.db: keys are "already in use"
        link = SuperLink(home=tmp_path / "home", args=[
            "--insecure", "--database", str(tmp_path / "state.db"),
            "--isolation", "subprocess"],
            extra_env={ROSTER_ENV: str(tmp_path / "roster.json")})
        link.start()
        try:
            assert link.env[ROSTER_ENV] == str(tmp_path / "roster.json")
            for name, entry in allowed.items():
                link.flwr("supernode", "register", str(entry.public_key), "fedsilo",
                          "--name", name)
            rosters.append(write_roster(link, allowed, tmp_path / "roster.json"))
        finally:
            link.stop()
    assert rosters[0] == rosters[1]
    assert sorted(rosters[0].nodes.values()) == ["hospital-a", "hospital-b"]
    assert rosters[0].expected == {"hospital-b": 70}

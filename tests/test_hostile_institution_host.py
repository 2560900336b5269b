"""A closed coordinator host: the state folder is 0700 and everything in it owner-only.

The SuperLink's ``state.db`` holds every institution's individual update, the roster
maps nodes to institutions; neither may be readable by other users of the host.
"""

from __future__ import annotations

import os
import stat

import pytest

from fedsilo.server import launch
from fedsilo.server.launch import LaunchError, SuperLink, close_state_dir


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def keep_umask():
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def test_an_old_open_state_dir_is_closed_and_new_files_are_owner_only(tmp_path):
    state = tmp_path / "coordinator-state"
    (state / "flwr-home").mkdir(parents=True)
    for name in ("state.db", "roster.json", "gateway.log", "flwr-home/superlink.log"):
        (state / name).write_text("x")
        (state / name).chmod(0o644)
    state.chmod(0o755)
    (state / "flwr-home").chmod(0o755)
    close_state_dir(state)
    assert _mode(state) == 0o700 and _mode(state / "flwr-home") == 0o700
    assert {_mode(p) for p in state.rglob("*") if p.is_file()} == {0o600}
    (state / "journal.jsonl").open("a").close()  # as the journal writer creates it
    assert _mode(state / "journal.jsonl") == 0o600


def test_a_state_dir_of_another_user_is_refused(tmp_path, monkeypatch):
    uid = os.getuid()
    monkeypatch.setattr(launch.os, "getuid", lambda: uid + 1)
    with pytest.raises(LaunchError, match="--state-dir .* another user"):
        close_state_dir(tmp_path)


@pytest.mark.slow
def test_the_superlinks_state_db_is_created_owner_only(tmp_path):
    state = tmp_path / "state"
    close_state_dir(state)
    link = SuperLink(home=state / "flwr-home", args=[
        "--insecure", "--database", str(state / "state.db"), "--isolation", "subprocess"])
    link.start()
    try:
        assert link.flwr("supernode", "ls", "fedsilo").returncode == 0  # state.db in use
    finally:
        link.stop()
    made = [p for p in state.rglob("*") if p.is_file()]
    assert state / "state.db" in made
    assert {p.name: _mode(p) for p in made} == {p.name: 0o600 for p in made}

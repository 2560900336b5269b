"""One atomic write: a failed write leaves the old file, a finished one replaces it."""

import os
import stat

import pytest

from fedsilo.common.atomic import atomic_file, swap_folder, write_atomic, write_json_atomic


def test_a_write_that_raises_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "ledger.json"
    write_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_file(target) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_a_finished_write_replaces_the_file_with_the_requested_mode(tmp_path):
    target = tmp_path / "sub" / "state.json"
    write_json_atomic(target, {"a": 1})
    assert target.read_text() == '{\n "a": 1\n}'
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    write_atomic(target, b"public", 0o644)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 & ~_umask()


def test_nan_is_refused_before_anything_is_written(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"loss": 1.0})
    with pytest.raises(ValueError):
        write_json_atomic(target, {"loss": float("nan")})
    assert target.read_text() == '{\n "loss": 1.0\n}'


def test_swap_folder_replaces_a_whole_folder(tmp_path):
    target, staging = tmp_path / "model", tmp_path / "staging"
    target.mkdir()
    (target / "old.bin").write_text("old")
    staging.mkdir()
    (staging / "new.bin").write_text("new")
    swap_folder(staging, target)
    assert sorted(p.name for p in target.iterdir()) == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old

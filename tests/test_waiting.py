"""Waiting for institutions is bounded: a clear error instead of a hang."""

import time

import pytest

from fedsilo.server.waiting import JoinTimeoutError, PatientGrid


class FakeGrid:
    def __init__(self, counts):
        self.counts = list(counts)
        self.run = "the run"

    def get_node_ids(self):
        return list(range(self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]))


def test_too_few_for_too_long_fails_naming_the_flags():
    grid = PatientGrid(FakeGrid([1]), minimum=2, timeout=0.2)
    assert len(grid.get_node_ids()) == 1  # short, but not for long yet
    time.sleep(0.3)
    with pytest.raises(JoinTimeoutError, match="--join-timeout") as err:
        grid.get_node_ids()
    assert "only 1 of the 2" in str(err.value) and "--min-available" in str(err.value)


def test_enough_nodes_reset_the_clock_and_other_calls_pass_through():
    grid = PatientGrid(FakeGrid([1, 2, 1, 1]), minimum=2, timeout=0.2)
    grid.get_node_ids()
    time.sleep(0.3)
    assert len(grid.get_node_ids()) == 2  # back to enough: the wait starts over
    assert len(grid.get_node_ids()) == 1
    assert grid.run == "the run"


def test_zero_timeout_waits_forever():
    grid = PatientGrid(FakeGrid([0]), minimum=2, timeout=0)
    grid.get_node_ids()
    time.sleep(0.05)
    assert grid.get_node_ids() == []

"""map_forked: the same list as the serial map, closures allowed, serial where short or nested."""

import os

import pytest

from hwnas.search import forked
from hwnas.search.forked import map_forked


def test_a_closure_over_unpicklable_state_maps_in_forked_children(monkeypatch):
    monkeypatch.setattr(forked, "_cores", lambda: 2)
    offset = 10
    unpicklable = lambda x: x  # noqa: E731 (a lambda is what pickling refuses)
    pids = map_forked(lambda x: (unpicklable(x) + offset, os.getpid()), list(range(12)))
    assert [value for value, _ in pids] == [x + 10 for x in range(12)]
    assert os.getpid() not in {pid for _, pid in pids}  # computed in children, not here


def test_short_lists_and_nested_maps_run_here(monkeypatch):
    monkeypatch.setattr(forked, "_cores", lambda: 2)
    assert {pid for pid in map_forked(lambda _: os.getpid(), [1, 2, 3])} == {os.getpid()}
    inner = map_forked(lambda x: map_forked(lambda y: os.getpid(), list(range(8)))[0], list(range(8)))
    assert len(set(inner)) <= 2  # each child ran its inner map itself: no fork from a forked child


def test_an_exception_in_a_child_reaches_the_caller(monkeypatch):
    monkeypatch.setattr(forked, "_cores", lambda: 2)

    def fail(x):
        raise ValueError(f"bad {x}")

    with pytest.raises(ValueError, match="bad"):
        map_forked(fail, list(range(8)))

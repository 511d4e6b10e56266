"""`map_forked`: a pure function over a list in forked processes, for setup work that would otherwise keep
the other cores idle (the search space's per-choice latency estimates, before any worker has a job)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# the function of the map in progress: forked children inherit it, so it need not be picklable (a closure
# over a graph is not)
_FUNCTION: Callable | None = None
# fewer items than this per process and the forks cost more than they save
_MIN_ITEMS_PER_PROCESS = 4


def _call(item):
    return _FUNCTION(item)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def map_forked(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`[function(x) for x in items]`, computed by up to one forked process per core. `function` must not
    depend on what another call did (each child has its own copy of the parent's memory); serial where the
    platform cannot fork or the list is short."""
    global _FUNCTION
    processes = min(_cores(), len(items) // _MIN_ITEMS_PER_PROCESS)
    if processes < 2 or _FUNCTION is not None or "fork" not in multiprocessing.get_all_start_methods():
        return [function(x) for x in items]
    _FUNCTION = function
    try:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            return pool.map(_call, items, chunksize=1)
    finally:
        _FUNCTION = None

"""Waiting out a neighbour's burst before a profiling network is measured.

On a shared machine (a VM, a CI runner) another tenant slows everything on this one in bursts of seconds that
the load average does not show, and a profile taken in such a stretch comes out slow throughout (one came out
+21 % on every held-out model: estimator-history.md, 2026-12-06). `QuietGate` times a small fixed reference model
before and after each network; while the reference runs more than `tolerance` slower than its quiet level, the
machine is taken as busy: wait and look again, and measure the network again if the burst began during it.

The quiet level is a low percentile of the recent looks, not the fastest one nor one of all looks: a host can move
a VM between speed levels for minutes to hours (the reference at 0.20, 0.135 or 0.11 ms, load average 0.0 at all),
and a bar set at a level the machine has left would hold every later measurement for its full `patience`. Over the
last `window` looks a burst of seconds stays out of the bar, and a new level sets it within about one patience of
waiting. `level_ms` is the level the measurements were let through at, what a profile and a benchmark record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from hwnas.estimator.networks import BlockConfig, NetworkConfig, build_network
from hwnas.targets.measure import MeasureSettings

T = TypeVar("T")


@dataclass
class QuietGate:
    """`wait()` blocks until the reference model runs within `tolerance` of its quietest median (at most
    `patience` seconds, then it lets the measurement go ahead and counts it in `gave_up`); `quiet()` says
    whether it does now."""

    settings: MeasureSettings  # the target's (its thread count)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    tolerance: float = 0.06
    patience: float = 30.0
    pause: float = 0.5
    window: int = 60  # looks the bar is the percentile of (a look every `pause` while waiting, 2 per measurement)
    looks_ms: list[float] = field(default_factory=list)  # every look's median, in order
    passed_ms: list[float] = field(default_factory=list)  # the looks that found the machine quiet
    waited_s: float = 0.0
    gave_up: int = 0
    remeasured: int = 0  # measurements taken again: a burst began while they ran
    _run: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from hwnas.graph.session import make_session, random_feeds, run

        # a conv stack of ~0.3 ms that moves data as the profiled kernels do (compute and cache traffic)
        blocks = (BlockConfig("conv", 32, 3, 1), BlockConfig("dwsep", 64, 3, 1), BlockConfig("conv", 32, 1, 1))
        model, _ = build_network(NetworkConfig(16, 32, blocks))
        session = make_session(model, optimized=True, threads=self.settings.threads,
                               providers=list(self.providers))
        feeds = random_feeds(model, {"x": (1, 16, 32, 32)}, seed=0)
        self._run = lambda: run(session, feeds)
        for _ in range(20):
            self._run()
        for _ in range(5):  # a few looks to start the percentile from: a burst at start-up does not set the bar
            self.reference_ms()

    def reference_ms(self, runs: int = 15) -> float:
        times = []
        for _ in range(runs):
            start = time.perf_counter_ns()
            self._run()
            times.append((time.perf_counter_ns() - start) / 1e6)
        median = float(np.median(times))
        self.looks_ms.append(median)
        return median

    @property
    def quiet_ms(self) -> float:
        """The reference's time on a quiet machine now: the 10th percentile of the last `window` looks."""
        return float(np.percentile(self.looks_ms[-self.window:], 10))

    @property
    def level_ms(self) -> float:
        """The reference's time while measurements were let through: the median of the quiet looks (of all looks
        before any was quiet)."""
        return float(np.median(self.passed_ms or self.looks_ms))

    def level_ms_since(self, passed: int) -> float:
        """The level of the measurements let through after the first `passed` ones (`level_ms` if none was): a run's
        level moves between its parts (0.111 -> 0.135 ms within one int8 benchmark)."""
        return float(np.median(self.passed_ms[passed:])) if len(self.passed_ms) > passed else self.level_ms

    def quiet(self) -> bool:
        look = self.reference_ms()
        if look <= self.quiet_ms * (1 + self.tolerance):
            self.passed_ms.append(look)
            return True
        return False

    def wait(self) -> bool:
        """Whether the machine is quiet now, after waiting up to `patience` seconds for it."""
        deadline = time.monotonic() + self.patience
        while not self.quiet():
            if time.monotonic() > deadline:
                self.gave_up += 1
                return False
            time.sleep(self.pause)
            self.waited_s += self.pause
        return True

    def measure(self, measurement: Callable[[], T]) -> T:
        """`measurement()` once the machine is quiet, taken again (once) when a burst began while it ran."""
        self.wait()
        result = measurement()
        if not self.quiet():
            self.remeasured += 1
            self.wait()
            result = measurement()
        return result


@dataclass(frozen=True)
class SpeedLevel:
    """The reference model's quiet level now and while an estimator was profiled (ms): how much longer than then
    this machine takes now (`scale`; a shared VM's host moves it by up to 1.5x for minutes to hours)."""

    now_ms: float
    profiled_ms: float

    @property
    def scale(self) -> float:
        return self.now_ms / self.profiled_ms

    @classmethod
    def now(cls, profiled_ms: float, settings: MeasureSettings, providers: tuple[str, ...] = ("CPUExecutionProvider",),
            looks: int = 10) -> SpeedLevel:
        """The level now: the quiet gate's reference model over its start-up looks and `looks` more (~0.1 s)."""
        gate = QuietGate(settings, providers)
        for _ in range(looks):
            gate.quiet()
        return cls(gate.level_ms, profiled_ms)

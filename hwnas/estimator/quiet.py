"""Waiting out a neighbour's burst before a profiling network is measured.

On a shared machine (a VM, a CI runner) another tenant slows everything on this one in bursts of seconds that
the load average does not show: MobileNetV2 0.5 at 128², timed in 0.5 s windows on a 2-core EPYC VM, ran
0.92–1.03 ms in quiet stretches and up to 1.7 ms in a burst. A network profiled inside a burst gives samples
20–50 % slow, and a profile taken in a noisy quarter of an hour came out +21 % on every held-out model
(estimator-history.md, 2026-12-06). `QuietGate` times a small fixed reference model before and after each
network; while the reference runs more than `tolerance` slower than the quietest it has run, the machine is
taken as busy: wait and look again, and measure the network again if the burst began during it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from hwnas.estimator.networks import BlockConfig, NetworkConfig, build_network


@dataclass
class QuietGate:
    """`wait()` blocks until the reference model runs within `tolerance` of its quietest median (at most
    `patience` seconds, then it lets the measurement go ahead and counts it in `gave_up`); `quiet()` says
    whether it does now."""

    settings: object  # the target's MeasureSettings (threads)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    tolerance: float = 0.06
    patience: float = 30.0
    pause: float = 0.5
    quietest_ms: float = float("inf")
    waited_s: float = 0.0
    gave_up: int = 0
    _run: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from hwnas.graph.session import make_session, random_feeds, run

        # a conv stack of ~0.3 ms that moves data as the profiled kernels do (compute and cache traffic)
        blocks = (BlockConfig("conv", 32, 3, 1), BlockConfig("dwsep", 64, 3, 1), BlockConfig("conv", 32, 1, 1))
        model, _ = build_network(NetworkConfig(16, 32, blocks))
        session = make_session(model, optimized=True, threads=getattr(self.settings, "threads", 1),
                               providers=list(self.providers))
        feeds = random_feeds(model, {"x": (1, 16, 32, 32)}, seed=0)
        self._run = lambda: run(session, feeds)
        for _ in range(20):
            self._run()
        for _ in range(5):  # the quietest of a few looks: where a burst at start-up does not set the bar
            self.reference_ms()

    def reference_ms(self, runs: int = 15) -> float:
        times = []
        for _ in range(runs):
            start = time.perf_counter_ns()
            self._run()
            times.append((time.perf_counter_ns() - start) / 1e6)
        median = float(np.median(times))
        self.quietest_ms = min(self.quietest_ms, median)
        return median

    def quiet(self) -> bool:
        return self.reference_ms() <= self.quietest_ms * (1 + self.tolerance)

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

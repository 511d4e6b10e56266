"""Profiling a target: sample kernels, measure them, fit the estimator, sample more where it errs.

Two ways to measure a kernel (`mode`):

- `kernel` (simulated targets, and any target that can only time whole models): each sample is a
  one-kernel ONNX model (`hwnas.estimator.networks.build_kernel_model`). The target measures it; on a
  measured target the time of an almost empty model (the runtime's per-run overhead) is subtracted.
- `context` (the `cpu` target and `ort:CPUExecutionProvider`): each sample is a kernel *as it runs
  inside a model*: random mobile-CNN-like networks (`hwnas.estimator.networks.build_network`) run with
  ONNX Runtime's per-node profiler, each node's time attributed to its kernel
  (`hwnas.estimator.attribution`). So a network's kernels add up to its latency, layout copies and
  cache state included, which one-kernel models get wrong on a CPU: there every conv pays for
  converting its input to ORT's blocked layout and its output back, which inside a model happens once
  per layout change. docs/estimator.md has the measured comparison of the two modes.

Adaptive sampling (after nn-Meter): a first third of the budget is drawn at random; then, round by
round, a fresh batch is measured, the current estimator's error on it is computed *before* it joins the
training set, and the next batch perturbs the configurations with the largest errors (channel counts
±1…±PF, sizes ±25 %), so that measurements concentrate where the cost surface has cliffs. In `context`
mode the perturbed unit is the block that produced the kernel, measured at the head of a new network.

int8 (`quantize`, context mode): every second network (`int8_every`; 1: every network) is profiled as
the QDQ model `quantize` makes of it (the caller passes the quantize pass's `quantize_model`, or a
function that aligns channels first: this layer does not import the passes), calibrated on 4 random inputs, its
random draws from the "mobile" block mix (networks.BLOCK_MIXES: what is deployed quantized). ORT runs
DequantizeLinear → Conv → QuantizeLinear as one QLinearConv;
its kernels are `Kernel.int8` and get regressors of their own (`KIND/int8`, estimator.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from hwnas.estimator.attribution import NetworkProfile, NodeOverheads, measure_in_context, measure_node_overheads, real_node_excess
from hwnas.estimator.denormal import measure_assist_ns
from hwnas.estimator.estimator import LatencyEstimator, Sample, relative_errors
from hwnas.estimator.networks import (
    BlockConfig,
    KernelConfig,
    NetworkConfig,
    block_of,
    build_kernel_model,
    build_network,
    network_around,
    overhead_model,
    perturb,
    perturb_block,
    random_config,
    random_network,
    text_line_network,
)
from hwnas.estimator.quiet import QuietGate
from hwnas.graph.shapes import Shape
from hwnas.targets.base import Target
from hwnas.targets.fusion_rules import FusionRules
from hwnas.targets.kernels import decompose
from hwnas.targets.machine import Machine

def _measure(target: Target, config: KernelConfig, rules: FusionRules, overhead_ms: float = 0.0) -> Sample | None:
    model = build_kernel_model(config, residual_allowed=rules.residual_add)
    shapes = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in model.graph.input}
    kernels = [k for k in decompose(model, shapes, rules) if k.kind != "free"]
    if len(kernels) != 1:
        return None  # the target runs it as several kernels: no clean per-kernel figure
    latency = target.measure(model, shapes).latency_ms
    if overhead_ms:
        latency = max(latency - overhead_ms, 0.1 * latency)  # a kernel faster than the noise: keep it positive
    return Sample(kernels[0], latency)


# ---- profiling loops ----------------------------------------------------------------------------------

MODES = ("kernel", "context")


# (model, calibration inputs) -> the model quantized to QDQ int8 (hwnas.passes.quantize.quantize_model)
Quantizer = Callable[[onnx.ModelProto, Mapping[str, np.ndarray]], onnx.ModelProto]


@dataclass
class ProfileReport:
    """What profiling did, round by round: how many measurements, and the error on the fresh batch."""

    measurements: int = 0
    rounds: list[dict] = field(default_factory=list)
    mode: str = "kernel"
    networks: int = 0  # context mode: networks profiled
    load_average: list[float] = field(default_factory=list)  # 1-minute load average before each measurement


def supports_context(target: Target) -> bool:
    """Whether `target` runs ONNX Runtime's CPU provider, whose per-node profile `context` mode reads."""
    from hwnas.targets.measure import CPU_PROVIDER
    from hwnas.targets.ort_ep import OrtTarget

    return isinstance(target, OrtTarget) and target.provider == CPU_PROVIDER


def default_mode(target: Target) -> str:
    return "context" if supports_context(target) else "kernel"


def profile_target(
    target: Target,
    budget: int,
    seed: int = 0,
    rounds: int = 5,
    progress: Callable[[int], None] | None = None,
    mode: str | None = None,
    rules: FusionRules | None = None,
    scale_to_run: bool = False,
    quantize: Quantizer | None = None,
    int8_every: int = 2,
    quiet_gate: bool = False,
    network: Callable[[np.random.Generator], NetworkConfig] | None = None,
    text_lines: float = 0.0,
) -> tuple[LatencyEstimator, ProfileReport]:
    """Measure up to `budget` kernels on `target` with adaptive sampling and fit an estimator on them.

    `mode`: `kernel` (one-kernel models) or `context` (kernels inside random networks, ORT CPU only);
    by default `context` where the target supports it. `rules`: the fusion rules the kernels are cut by
    (default: the target's). `scale_to_run` (context mode): scale each network's kernels to its
    measured run time rather than adding the measured executor overhead (`attribute`). `quantize`
    (context mode): every `int8_every`-th network is profiled quantized by it (int8 kernels, see above).
    `quiet_gate` (context mode): before and after each network, wait out a neighbour's burst (`quiet.QuietGate`).
    `network` (context mode): draws the random networks instead of `networks.random_network` (a family where a
    profile is thin, e.g. `benchmarks/studies/int8_stage_draws.py`'s). `text_lines` (context mode): the share of the
    random networks drawn as text lines (`networks.text_line_network`) instead; 0 draws exactly as before.
    """
    mode = mode or default_mode(target)
    if mode not in MODES:
        raise ValueError(f"unknown profiling mode {mode!r}; known: {', '.join(MODES)}")
    if mode == "context" and not supports_context(target):
        raise ValueError(f"context mode needs ONNX Runtime's CPU provider; {target.name} is not one")
    rules = rules or target.rules
    if quantize is not None and mode != "context":
        raise ValueError("int8 profiling (quantize) needs context mode: the int8 kernels are timed inside networks")
    if int8_every < 1:
        raise ValueError(f"int8_every must be >= 1, got {int8_every}")
    if network is not None and mode != "context":
        raise ValueError("a network family (network) needs context mode: kernel mode profiles one-kernel models")
    check_text_lines(text_lines, mode)
    sampler = make_sampler(target, rules, seed, mode, scale_to_run, quantize, int8_every, quiet_gate, network, text_lines)
    estimator, report = _adaptive(target, rules, sampler, budget, seed, rounds, progress)
    report.mode = mode
    report.networks = getattr(sampler, "networks", 0)
    report.load_average = sampler.load
    if sampler.measured:  # recorded at every fit already (`_new_estimator`); now with the load it was measured at
        estimator.target_config["machine"] = machine_entry(report)
    estimator.target_config["profiling"] = {"mode": mode, "budget": budget, "seed": seed,
                                            "measurements": report.measurements, "networks": report.networks,
                                            "int8_networks": getattr(sampler, "int8_networks", 0),
                                            **({"int8_every": int8_every} if quantize is not None else {}),
                                            **({"network": getattr(network, "__name__", repr(network))} if network is not None else {}),
                                            **({"text_lines": text_lines} if text_lines else {})}
    if mode == "context":
        estimator.kernel_offset_ms = per_kernel_offset(estimator.samples_)
        ratios = sampler.run_over_nodes
        estimator.target_config["profiling"].update(
            overheads_us={key.removesuffix("_ms"): round(value * 1e3, 3) for key, value in dataclasses.asdict(sampler.overheads).items()},
            scale_to_run=scale_to_run,
            # ~1.0-1.1 on a quiet machine; much more means runs waited for a core (busy machine)
            run_over_profiled_nodes={"median": round(float(np.median(ratios)), 3), "p90": round(float(np.percentile(ratios, 90)), 3)}
            if ratios else None,
            kernel_offset_us=round(estimator.kernel_offset_ms * 1e3, 3),
            denormal_assist_ns=measure_assist_ns(target, seed))
        if sampler.gate is not None:
            estimator.target_config["profiling"]["quiet_gate"] = {
                "waited_s": round(sampler.gate.waited_s, 1), "gave_up": sampler.gate.gave_up,
                "remeasured_networks": sampler.gate.remeasured, "reference_ms": round(sampler.gate.level_ms, 4)}
    return estimator, report


def profiled_reference_ms(estimator: LatencyEstimator) -> float | None:
    """The quiet gate's reference level while `estimator` was profiled (`QuietGate.level_ms`; older profiles stored
    their fastest look or a percentile of all looks); None where profiling ran without the gate. A timing taken with
    the reference at another level compares the machine's speed as much as the estimator."""
    return estimator.target_config.get("profiling", {}).get("quiet_gate", {}).get("reference_ms")


def check_text_lines(share: float, mode: str) -> None:
    """`profile_target(text_lines=share)` takes a share in [0, 1] of context mode's networks (ValueError otherwise)."""
    if not 0.0 <= share <= 1.0 or (share and mode != "context"):
        raise ValueError(f"text_lines is a share of context mode's networks in [0, 1], got {share} ({mode} mode)")


def make_sampler(target: Target, rules: FusionRules, seed: int, mode: str, scale_to_run: bool = False,
                 quantize: Quantizer | None = None, int8_every: int = 2, quiet_gate: bool = False,
                 network: Callable[[np.random.Generator], NetworkConfig] | None = None, text_lines: float = 0.0):
    """What measures `mode`'s samples on `target`: `random()` draws one, `around(origin)` a neighbour of one."""
    if mode == "context":
        return _ContextSampler(target, rules, seed, scale_to_run, quantize, int8_every, quiet_gate, network, text_lines)
    return _KernelSampler(target, rules, seed)


# The small random networks the profiler's cost on real nodes is measured on (`real_node_excess`): networks of the
# profiling generator's kind, from a seed of their own, with at least CALIBRATION_NODES nodes and at most
# CALIBRATION_MACS multiply-adds (mostly 0.1-1 ms on a 2-core CPU: a larger one's plain run is noisier than its excess)
CALIBRATION_NETWORKS, CALIBRATION_SEED, CALIBRATION_NODES, CALIBRATION_MACS = 8, 4242, 16, 10_000_000


def calibration_networks(rules: FusionRules, count: int = CALIBRATION_NETWORKS) -> list[onnx.ModelProto]:
    """The first `count` random networks of `CALIBRATION_SEED` that are small enough (see above); fewer where the
    generator's first 100 × `count` draws hold fewer (today's generator gives 8 in its first 111)."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    chosen: list[onnx.ModelProto] = []
    for _ in range(100 * count):
        model, _ = build_network(random_network(rng))
        if len(model.graph.node) >= CALIBRATION_NODES and sum(k.macs for k in decompose(model, {}, rules)) <= CALIBRATION_MACS:
            chosen.append(model)
            if len(chosen) == count:
                break
    return chosen


def least_node_overheads(target: Target, gate: QuietGate | None, looks: int = 3, calibrate: bool = True) -> NodeOverheads:
    """The node overheads every profiled network's kernels are corrected by (`measure_node_overheads`): each the
    least of a few looks, each after the quiet gate's wait when there is one. A burst only adds time, and one look taken
    in a burst at start-up put ORT's profiler at 4.4 µs a node for a whole profile (2.4 in a quiet one):
    every kernel of it came out ~2 µs short a node (estimator-history.md, 2026-12-06 stop 32).
    `calibrate`: then add to the profiler's cost what it adds to real nodes beyond trivial ones, measured on
    `calibration_networks` (`real_node_excess`; ~1 µs a node on a 2-core Xeon, which the trivial nodes miss)."""
    def look() -> NodeOverheads:
        if gate is not None:
            gate.wait()
        return measure_node_overheads(target.settings, target.providers)

    seen = [look() for _ in range(looks)]
    least = NodeOverheads(**{f.name: min(getattr(o, f.name) for o in seen) for f in dataclasses.fields(NodeOverheads)})
    if not calibrate:
        return least
    excess = real_node_excess(calibration_networks(target.rules), least, target.settings, target.providers,
                              None if gate is None else gate.measure)
    # never below the trivial nodes' cost: a negative excess is a plain run that waited for a core
    return dataclasses.replace(least, profiler_ms=least.profiler_ms + max(excess, 0.0))


def per_kernel_offset(samples: Sequence[Sample]) -> float:
    """What the attribution adds per kernel beyond a network's plain run (`Sample.network_ms`): the median over
    the profiled networks of (kernel sum - plain run) / kernels, in ms, at least 0.

    What the node overheads (`least_node_overheads`) leave over: before the profiler's cost was measured on
    real networks (`real_node_excess`), ~0.7 us per kernel on a 2-core EPYC, nothing in a 12-kernel 2 ms
    network, but 8 % of a 55-kernel 0.5 ms model (MobileNetV2 0.35 at 96²). The median keeps networks whose
    plain run waited for a core (a busy machine) from pulling it down much. Networks whose kernels were not all kept (one the budget
    cut short, kernels dropped by `attribute`) still count: a missing kernel makes the sum smaller, so
    the offset errs low."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    plain: dict[int, float] = {}
    for s in samples:
        if s.network is not None and s.network_ms is not None:
            sums[s.network] = sums.get(s.network, 0.0) + s.latency_ms
            counts[s.network] = counts.get(s.network, 0) + 1
            plain[s.network] = s.network_ms
    if not sums:
        return 0.0
    return max(0.0, float(np.median([(sums[n] - plain[n]) / counts[n] for n in sums])))


def machine_entry(report: ProfileReport) -> dict:
    """What a measured estimator only fits: this machine (`Machine`), and how busy it was."""
    load = report.load_average
    return {
        **Machine.current().to_entry(),
        "date": datetime.date.today().isoformat(),
        "load_average_1min": ({"min": round(min(load), 2), "mean": round(float(np.mean(load)), 2), "max": round(max(load), 2)}
                              if load else None),
        "note": "fits this machine only; re-profile on another (docs/estimator.md). The load average counts the "
                "profiling process itself (~1 on an otherwise idle machine).",
    }


def _load() -> float:
    try:
        return float(os.getloadavg()[0])
    except OSError:  # not available on this platform
        return float("nan")


class _KernelSampler:
    """One-kernel models; on a measured target minus the time of an almost empty model."""

    def __init__(self, target: Target, rules: FusionRules, seed: int):
        self.target, self.rules = target, rules
        self.rng = np.random.default_rng(seed)
        self.pf = target.parallelism_factor
        self.load: list[float] = []
        probe = target.measure(overhead_model(), {})
        self.measured = probe.cycles is None  # simulated targets count cycles; nothing to subtract there
        self.overhead_ms = probe.latency_ms if self.measured else 0.0

    def random(self) -> list[tuple[object, Sample]]:
        return self._measure(random_config(self.rng, self.pf))

    def around(self, origin: KernelConfig) -> list[tuple[object, Sample]]:
        return self._measure(perturb(origin, self.rng, self.pf))

    def _measure(self, config: KernelConfig) -> list[tuple[object, Sample]]:
        if self.measured:
            self.load.append(_load())
        sample = _measure(self.target, config, self.rules, self.overhead_ms)
        return [] if sample is None else [(config, sample)]


class _ContextSampler:
    """Random networks profiled node by node; each kernel's origin is the block that produced it."""

    measured = True

    def __init__(self, target: Target, rules: FusionRules, seed: int, scale_to_run: bool = False,
                 quantize: Quantizer | None = None, int8_every: int = 2, quiet_gate: bool = False,
                 network: Callable[[np.random.Generator], NetworkConfig] | None = None, text_lines: float = 0.0):
        self.target, self.rules = target, rules
        self.network = network
        self.text_lines = text_lines
        self.quantize = quantize
        self.int8_every = int8_every
        self.int8_networks = 0
        self.rng = np.random.default_rng(seed)
        self.pf = target.parallelism_factor
        self.load: list[float] = []
        self.networks = 0
        self.scale_to_run = scale_to_run
        self.run_over_nodes: list[float] = []  # each network's plain-run median / profiled node sum
        self.gate = QuietGate(target.settings, tuple(target.providers)) if quiet_gate else None
        self.overheads = least_node_overheads(target, self.gate)

    def random(self) -> list[tuple[object, Sample]]:
        if self.network is not None:
            return self._measure(self.network(self.rng))
        if self.text_lines and self.rng.random() < self.text_lines:  # no draw at 0: profiles of before replay
            return self._measure(text_line_network(self.rng))
        mix = "mobile" if is_int8_network(self.networks, self.quantize, self.int8_every) else "any"
        return self._measure(random_network(self.rng, mix=mix))

    def around(self, origin: tuple[BlockConfig, int, int]) -> list[tuple[object, Sample]]:
        block, c, h = perturb_block(*origin, self.rng, self.pf)
        return self._measure(network_around(self.rng, block, c, h))

    def measure_model(self, model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> list[Sample]:
        """A user's model timed as a profiling network is: each of its kernels in context (`profile --around`).
        No network index: one of this run would collide with the stored samples' (`per_kernel_offset`)."""
        profile = self._in_context(model, shapes)
        return [Sample(k, t, network_ms=profile.total_ms) for k, t in zip(profile.kernels, profile.latency_ms)]

    def _in_context(self, model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> NetworkProfile:
        """`model`'s kernels timed in context, after the quiet gate's wait when there is one."""
        def measured():
            return measure_in_context(model, shapes, self.rules, self.target.settings, self.target.providers,
                                      self.overheads, self.scale_to_run)
        return measured() if self.gate is None else self.gate.measure(measured)

    def _measure(self, config: NetworkConfig) -> list[tuple[object, Sample]]:
        model, block_inputs, int8 = profiled_network(config, self.networks, self.rng, self.quantize, self.int8_every)
        self.int8_networks += int8
        self.load.append(_load())
        profile = self._in_context(model, {"x": (1, config.c_in, config.size, config.width or config.size)})
        network = self.networks
        self.networks += 1
        self.run_over_nodes.append(profile.total_ms / max(profile.nodes_ms, 1e-9))
        out, block = [], 0
        for k, t in zip(profile.kernels, profile.latency_ms):
            block = block_of(k, default=block)  # an unnamed node a rewrite added: the block before it
            out.append(((config.blocks[block], *block_inputs[block]), Sample(k, t, network, profile.total_ms)))
        return out


def is_int8_network(index: int, quantize: Quantizer | None, int8_every: int) -> bool:
    """Whether a profile's `index`-th network is profiled as int8 (its random draws use the "mobile" block mix)."""
    return quantize is not None and index % int8_every == int8_every - 1


def profiled_network(config: NetworkConfig, index: int, rng: np.random.Generator, quantize: Quantizer | None,
                     int8_every: int) -> tuple[onnx.ModelProto, list, bool]:
    """(model, block inputs, quantized) of a profile's `index`-th network: every `int8_every`-th one quantized by
    `quantize`, on calibration inputs drawn from `rng` (the profile's generator, which the draw advances)."""
    model, block_inputs = build_network(config)
    if not is_int8_network(index, quantize, int8_every):
        return model, block_inputs, False
    calibration = rng.normal(size=(4, config.c_in, config.size, config.width or config.size)).astype(np.float32)
    return quantize(model, {"x": calibration}), block_inputs, True


def _adaptive(target: Target, rules: FusionRules, sampler, budget: int, seed: int, rounds: int,
              progress: Callable[[int], None] | None) -> tuple[LatencyEstimator, ProfileReport]:
    samples: list[Sample] = []
    origins: list = []
    report = ProfileReport()

    def take(draws: Callable[[int], list], want: int) -> list:
        got: list = []
        i = 0
        while len(got) < want and len(samples) + len(got) < budget:
            new = draws(i)[: budget - len(samples) - len(got)]
            i += 1
            if progress and new:
                progress(len(new))
            got += new
            if i > 20 * max(want, 1):  # nothing measurable comes out: stop rather than spin
                break
        return got

    first = take(lambda _: sampler.random(), max(1, budget // 3))
    samples += [s for _, s in first]
    origins += [o for o, _ in first]
    per_round = max(1, (budget - len(samples)) // max(rounds, 1))
    estimator = _new_estimator(target, rules, seed, sampler.measured).fit(samples)
    while len(samples) < budget:
        worst = _worst(estimator, origins, samples, keep=max(4, per_round // 4))
        got = take(lambda i: sampler.around(worst[(i // 2) % len(worst)]) if i % 2 == 0 else sampler.random(), per_round)
        if not got:
            break
        predicted = [e.latency_ms for e in estimator.predict_kernels([s.kernel for _, s in got], [s.small_network for _, s in got])]
        err = relative_errors(predicted, [s.latency_ms for _, s in got])
        report.rounds.append({"measured": len(got), "mape_before_fit": float(np.mean(err)),
                              "within_5pct_before_fit": float(np.mean(err <= 0.05))})
        samples += [s for _, s in got]
        origins += [o for o, _ in got]
        estimator = _new_estimator(target, rules, seed, sampler.measured).fit(samples)
    report.measurements = len(samples)
    return estimator, report


def _new_estimator(target: Target, rules: FusionRules, seed: int, measured: bool) -> LatencyEstimator:
    """An estimator of the target; a measured one names its machine from its first fit on, so every fit (the
    rounds' and the one written) fits what loading it fits (`LatencyEstimator.correction_quantile`)."""
    config = {**target.describe(), **({"machine": machine_entry(ProfileReport())} if measured else {})}
    return LatencyEstimator(target.name, target.parallelism_factor, rules, config, random_state=seed)


def _worst(estimator: LatencyEstimator, origins: list, samples: list[Sample], keep: int) -> list:
    """The origins (configurations, blocks) of the kernels the estimator fits worst (in-sample relative error)."""
    predicted = [e.latency_ms for e in estimator.predict_kernels([s.kernel for s in samples], [s.small_network for s in samples])]
    err = relative_errors(predicted, [s.latency_ms for s in samples])
    order = np.argsort(-err)[:keep]
    return [origins[i] for i in order]

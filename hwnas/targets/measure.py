"""The measurement protocol shared by every target that times ONNX Runtime (`cpu`, `ort:<EP>`).

One protocol, so that numbers from different commands and targets mean the same thing:
- a session with ORT's default graph optimizations (ORT_ENABLE_ALL), as a deployment would run it;
- `warmup` untimed runs (first runs allocate the arena and pick kernels), then timed runs of
  `session.run` with `time.perf_counter_ns` until there are at least `repeats` samples *and* at least
  `min_seconds` of timed work (so a 50 µs kernel gets thousands of samples, not 20 scheduler-sized ones);
- the median is the latency; the samples are kept, and the spread is IQR / median.

`measure_interleaved` times several models in rounds (A, B, A, B, ...) in one process so that a
comparison shares whatever noise the machine has (DESIGN.md: "Compare A/B in one run, interleaved").
`profile_nodes` reads ORT's own per-node profile (the estimator's kernel measurements).
`isolate=True` runs any of them in a fresh worker process (`python -m hwnas.targets.measure REQUEST`)
fed through files in a temporary directory; docs/measurement.md says when that matters.
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from hwnas.errors import BadInputError, CheckFailedError, HwnasError
from hwnas.graph.io import load_model, save_model
from hwnas.graph.session import make_session, random_feeds, run, session_options
from hwnas.graph.shapes import Shape, resolve_input_shapes
from hwnas.targets.base import Measurement
from hwnas.targets.machine import Machine

# ORT's `providers` argument: provider names, or (name, {option: value}) pairs; the first one is the target.
Providers = Sequence[str | tuple[str, Mapping[str, str]]]
CPU_PROVIDER = "CPUExecutionProvider"
CPU: Providers = (CPU_PROVIDER,)
# takes one round of timed runs and returns its times (ns by model), e.g. after waiting for a quiet machine
RoundGate = Callable[[Callable[[], dict[str, int]]], dict[str, int]]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class MeasureSettings:
    warmup: int = 5
    repeats: int = 20
    threads: int = 1
    isolate: bool = False
    min_seconds: float = 0.1  # with 20 repeats, adds samples only to models faster than 5 ms

    def __post_init__(self) -> None:
        for name, low in (("warmup", 0), ("repeats", 1), ("threads", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise BadInputError(f"measurement option {name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.min_seconds, (int, float)) or not 0 <= self.min_seconds < float("inf"):
            raise BadInputError(f"measurement option min_seconds must be a number >= 0, got {self.min_seconds!r}")

    def as_options(self) -> list[str]:
        """`key=value` for every setting that differs from the default (a target's canonical name)."""
        default = MeasureSettings()
        return [
            f"{f.name}={int(v) if isinstance(v, bool) else v}"
            for f in dataclasses.fields(self)
            if (v := getattr(self, f.name)) != getattr(default, f.name)
        ]


MEASURE_OPTIONS = tuple(f.name for f in dataclasses.fields(MeasureSettings))


def parse_options(text: str, where: str) -> dict[str, str]:
    """`a=1,b=2` -> {'a': '1', 'b': '2'}; malformed or repeated items are bad input."""
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise BadInputError(f"{where}: bad option {item!r}: expected key=value")
        if key in options:
            raise BadInputError(f"{where}: option {key!r} given twice")
        options[key] = value
    return options


def split_settings(options: Mapping[str, str], where: str) -> tuple[MeasureSettings, dict[str, str]]:
    """The measurement settings named in `options`, and the options that are not measurement settings."""
    given = {k: v for k, v in options.items() if k in MEASURE_OPTIONS}
    rest = {k: v for k, v in options.items() if k not in MEASURE_OPTIONS}
    converted = {key: _convert(key, text, where) for key, text in given.items()}
    try:
        return MeasureSettings(**converted), rest
    except BadInputError as e:
        raise BadInputError(f"{where}: {e}") from None


def _convert(key: str, text: str, where: str) -> object:
    if key == "isolate":
        if text.lower() not in _TRUE + _FALSE:
            raise BadInputError(f"{where}: isolate must be 1 or 0, got {text!r}")
        return text.lower() in _TRUE
    try:
        return float(text) if key == "min_seconds" else int(text)
    except ValueError:
        kind = "a number" if key == "min_seconds" else "an integer"
        raise BadInputError(f"{where}: {key} must be {kind}, got {text!r}") from None


def positive_int(options: Mapping[str, str], key: str, where: str) -> int | None:
    """An integer option >= 1 such as `pf=16`, or None when it is not given."""
    text = options.get(key)
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1:
        raise BadInputError(f"{where}: {key} must be an integer >= 1, got {text!r}")
    return int(text)


def environment() -> dict:
    """What a measured number depends on besides the model: runtime version and the host CPU."""
    machine = Machine.current()
    return {"onnxruntime": machine.onnxruntime, "cpu": machine.cpu, "isa": machine.isa, "logical_cpus": machine.logical_cpus}


@dataclass(frozen=True)
class NodeTiming:
    """One node as ORT ran it (post-optimisation name and op), with its median time per run."""

    name: str
    op_type: str
    provider: str
    input_shapes: tuple[Shape, ...]
    output_shapes: tuple[Shape, ...]
    duration_ms: float
    runs: int

    @classmethod
    def from_dict(cls, d: Mapping) -> NodeTiming:
        shapes = {k: tuple(tuple(s) for s in d[k]) for k in ("input_shapes", "output_shapes")}
        return cls(**{**d, **shapes})


def summarize(samples_ms: Sequence[float]) -> Measurement:
    """Median latency, with the samples and their spread (IQR / median) for judging noise."""
    samples = np.asarray(samples_ms, dtype=np.float64)
    p25, median, p75 = np.percentile(samples, [25, 50, 75])
    return Measurement(
        latency_ms=float(median),
        samples_ms=tuple(float(s) for s in samples),
        details={
            "runs": len(samples),
            "min_ms": float(samples.min()),
            "p25_ms": float(p25),
            "p75_ms": float(p75),
            "spread": float((p75 - p25) / median) if median > 0 else 0.0,
        },
    )


def measure_model(
    model: onnx.ModelProto, shapes: Mapping[str, Shape], settings: MeasureSettings, providers: Providers = CPU
) -> Measurement:
    return measure_interleaved({"model": model}, shapes, settings, providers)["model"]


def measure_interleaved(
    models: Mapping[str, onnx.ModelProto],
    shapes: Mapping[str, Shape],
    settings: MeasureSettings,
    providers: Providers = CPU,
    round_gate: RoundGate | None = None,
) -> dict[str, Measurement]:
    """Time every model in alternating rounds in one process; the same settings and inputs for each.

    `round_gate` takes each round (one timed run of every model) and returns its times; a quiet gate's
    `measure` holds rounds back while the machine is slowed by a neighbour (`hwnas.estimator.quiet`)."""
    if not models:
        raise ValueError("measure_interleaved needs at least one model")
    if settings.isolate and round_gate is not None:
        raise ValueError("a round gate runs in this process: it cannot gate an isolated measurement")
    if settings.isolate:
        samples = _in_worker("time", models, shapes, settings, providers)
    else:
        samples = _time(models, shapes, settings, providers, round_gate)
    return {key: summarize(samples[key]) for key in models}


def profile_nodes(
    model: onnx.ModelProto, shapes: Mapping[str, Shape], settings: MeasureSettings, providers: Providers = CPU
) -> list[NodeTiming]:
    """Per-node times from ORT's profiler: `warmup` runs dropped, median over exactly `repeats` runs.

    `min_seconds` does not apply: every profiled run adds an event per node to the trace file, so the
    run count stays exactly what was asked for.
    """
    if settings.isolate:
        return [NodeTiming.from_dict(d) for d in _in_worker("profile", {"model": model}, shapes, settings, providers)]
    return _profile(model, shapes, settings, providers)


def _open(model: onnx.ModelProto, settings: MeasureSettings, providers: Providers) -> ort.InferenceSession:
    session = make_session(model, optimized=True, threads=settings.threads, providers=list(providers))
    _check_provider(session, providers)
    return session


def _check_provider(session: ort.InferenceSession, providers: Providers) -> None:
    # ORT falls back to the CPU provider with only a warning when an EP fails to initialise (no GPU,
    # missing driver): the numbers would silently be CPU numbers under the EP's name.
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if wanted not in session.get_providers():
        raise CheckFailedError(
            f"execution provider {wanted} could not be initialised; ONNX Runtime would run on {session.get_providers()}"
        )


def _runner(model: onnx.ModelProto, session: ort.InferenceSession, shapes: Mapping[str, Shape]) -> Callable[[], object]:
    feeds = random_feeds(model, resolve_input_shapes(model, shapes), seed=0)
    return partial(run, session, feeds)


def _time(
    models: Mapping[str, onnx.ModelProto], shapes: Mapping[str, Shape], settings: MeasureSettings, providers: Providers,
    round_gate: RoundGate | None = None,
) -> dict[str, list[float]]:
    runners = {key: _runner(model, _open(model, settings, providers), shapes) for key, model in models.items()}
    return interleave(runners, settings, round_gate)


def interleave(
    runners: Mapping[str, Callable[[], object]], settings: MeasureSettings, round_gate: RoundGate | None = None
) -> dict[str, list[float]]:
    """Warm every runner up, then time one call of each per round until every runner has enough samples
    (each round through `round_gate` where one is given)."""
    for call in runners.values():
        for _ in range(settings.warmup):
            call()
    keys = list(runners)
    samples: dict[str, list[float]] = {key: [] for key in keys}
    budget_ns = settings.min_seconds * 1e9
    spent = dict.fromkeys(keys, 0)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed run would be charged to whichever model triggered it
    try:
        rounds = 0
        while rounds < settings.repeats or min(spent.values()) < budget_ns:
            # Rotate who goes first: the first model of a round would otherwise always run on caches
            # the last model of the previous round left behind.
            order = keys[rounds % len(keys):] + keys[:rounds % len(keys)]
            timed = round_gate(partial(_round, runners, order)) if round_gate else _round(runners, order)
            for key, elapsed in timed.items():
                spent[key] += elapsed
                samples[key].append(elapsed / 1e6)
            rounds += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def _round(runners: Mapping[str, Callable[[], object]], order: list[str]) -> dict[str, int]:
    """One timed call of each runner in `order`: nanoseconds by key."""
    timed = {}
    for key in order:
        start = time.perf_counter_ns()
        runners[key]()
        timed[key] = time.perf_counter_ns() - start
    return timed


def _profile(
    model: onnx.ModelProto, shapes: Mapping[str, Shape], settings: MeasureSettings, providers: Providers
) -> list[NodeTiming]:
    with tempfile.TemporaryDirectory(prefix="hwnas-profile-") as tmp:  # removes the trace file too
        session = profiling_session(model, settings, providers, os.path.join(tmp, "trace"))
        call = _runner(model, session, shapes)
        for _ in range(settings.warmup + settings.repeats):
            call()
        with open(session.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
    return node_timings(events, skip_runs=settings.warmup)


def profiling_session(
    model: onnx.ModelProto, settings: MeasureSettings, providers: Providers, prefix: str,
    optimized_model_path: str | None = None,
) -> ort.InferenceSession:
    """A session that writes ORT's per-node trace (and, if asked, the graph as ORT optimized it)."""
    # make_session has no profiling switch, and profiling can only be turned on when a session is made.
    opts = session_options(optimized=True, threads=settings.threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = prefix
    if optimized_model_path:
        opts.optimized_model_filepath = optimized_model_path
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=list(providers))
    except Exception as e:  # ORT raises its own exception types; all mean "cannot run this model"
        raise CheckFailedError(f"cannot profile: ONNX Runtime cannot load the model ({last_line(str(e))})") from None
    _check_provider(session, providers)
    return session


_KERNEL_SUFFIX = "_kernel_time"


def node_timings(events: Sequence[Mapping], skip_runs: int) -> list[NodeTiming]:
    """Per-node median duration per run from an ORT Chrome-trace, dropping the first `skip_runs` runs.

    A node's events are assigned to the `model_run` that started last before them; a node that runs
    several times in one run (inside a Loop) is summed within the run, and counts 0 in runs it sat out.
    """
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    timed = range(skip_runs, len(starts))
    per_run: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    first: dict[str, Mapping] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith(_KERNEL_SUFFIX):
            continue
        index = bisect.bisect_right(starts, e["ts"]) - 1
        if index < skip_runs:
            continue
        name = e["name"][: -len(_KERNEL_SUFFIX)]
        first.setdefault(name, e)
        per_run[name][index] += e["dur"] / 1000.0  # trace durations are in microseconds
    return [
        NodeTiming(
            name=name,
            op_type=e["args"].get("op_name", ""),
            provider=e["args"].get("provider", ""),
            input_shapes=_shapes(e["args"].get("input_type_shape", [])),
            output_shapes=_shapes(e["args"].get("output_type_shape", [])),
            duration_ms=float(np.median([per_run[name].get(r, 0.0) for r in timed])),
            runs=len(timed),
        )
        for name, e in first.items()
    ]


def _shapes(type_shapes: Sequence[Mapping[str, Sequence[int]]]) -> tuple[Shape, ...]:
    # ORT writes each tensor as {"float": [1, 3, 32, 32]}.
    return tuple(tuple(int(d) for d in shape) for entry in type_shapes for shape in entry.values())


def last_line(text: str) -> str:
    """The last non-empty line, stripped: what a failing program's stderr has to say."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _in_worker(
    kind: str,
    models: Mapping[str, onnx.ModelProto],
    shapes: Mapping[str, Shape],
    settings: MeasureSettings,
    providers: Providers,
):
    """Run `_time` or `_profile` in a fresh Python process; returns its JSON result."""
    with tempfile.TemporaryDirectory(prefix="hwnas-measure-") as tmp:
        paths = {key: str(save_model(m, Path(tmp) / f"model{i}.onnx")) for i, (key, m) in enumerate(models.items())}
        request = {
            "kind": kind,
            "models": paths,
            "shapes": {name: list(shape) for name, shape in shapes.items()},
            "settings": dataclasses.asdict(dataclasses.replace(settings, isolate=False)),
            "providers": [p if isinstance(p, str) else [p[0], dict(p[1])] for p in providers],
        }
        request_path = Path(tmp) / "request.json"
        request_path.write_text(json.dumps(request), encoding="utf-8")
        proc = subprocess.run(
            [sys.executable, "-m", "hwnas.targets.measure", str(request_path)],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
        )
        if proc.returncode != 0:
            error = BadInputError if proc.returncode == BadInputError.exit_code else CheckFailedError
            raise error(f"isolated measurement failed: {last_line(proc.stderr) or f'exit status {proc.returncode}'}")
        return json.loads((Path(tmp) / "result.json").read_text(encoding="utf-8"))


def _worker(request_path: Path) -> None:
    request = json.loads(request_path.read_text(encoding="utf-8"))
    models = {key: load_model(path) for key, path in request["models"].items()}
    shapes = {name: tuple(dims) for name, dims in request["shapes"].items()}
    settings = MeasureSettings(**request["settings"])
    providers = [p if isinstance(p, str) else (p[0], p[1]) for p in request["providers"]]
    if request["kind"] == "time":
        result: object = _time(models, shapes, settings, providers)
    else:
        result = [dataclasses.asdict(t) for t in _profile(models["model"], shapes, settings, providers)]
    (request_path.parent / "result.json").write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    try:
        _worker(Path(sys.argv[1]))
    except HwnasError as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)

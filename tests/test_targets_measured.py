"""Measured targets (cpu, ort:<EP>, cmd:<command>) and the measurement protocol they share."""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

import hwnas.targets.measure as measure
from hwnas.errors import BadInputError, CheckFailedError
from hwnas.graph.io import load_model
from hwnas.targets import get_target
from hwnas.targets.command import CommandTarget, parse_latency_ms
from hwnas.targets.cpu import CpuTarget
from hwnas.targets.measure import (
    MeasureSettings,
    NodeTiming,
    measure_interleaved,
    measure_model,
    node_timings,
    profile_nodes,
)
from hwnas.targets.ort_ep import OrtTarget, nchwc_block_size
from tests.conftest import REAL_MODELS, real_model_path
from tests.graphs import const, make_model, tensor

FAST = MeasureSettings(warmup=1, repeats=5, min_seconds=0)
TIME_ORT = Path(__file__).parent / "data" / "time_ort.py"
PYTHON = shlex.quote(sys.executable)


def conv_model(channels: int = 8, size: int = 16, seed: int = 0):
    """x[1,3,S,S] → Conv 3×3 (C) → Relu → depthwise Conv 3×3 → y."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Conv", ["b", "w2"], ["y"], name="dw", group=channels, pads=[1, 1, 1, 1]),
    ]
    weights = [
        const("w1", rng.normal(0, 0.3, (channels, 3, 3, 3)).astype(np.float32)),
        const("w2", rng.normal(0, 0.3, (channels, 1, 3, 3)).astype(np.float32)),
    ]
    return make_model(nodes, [tensor("x", [1, 3, size, size])], [tensor("y", [1, channels, size, size])], weights)


# --- specs -------------------------------------------------------------------------------------------


def test_cpu_spec_defaults():
    target = get_target("cpu")
    assert isinstance(target, CpuTarget)
    assert target.settings == MeasureSettings(warmup=5, repeats=20, threads=1, isolate=False)
    assert target.parallelism_factor == nchwc_block_size()
    assert target.name == "cpu"


def test_cpu_parallelism_factor_is_the_nchwc_block_of_this_cpu():
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in lines if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags")
    if "avx2" not in flags:
        pytest.skip("not an AVX2 machine; ORT's NCHWc block is not known here")
    # ORT's MLAS blocks channels by one SIMD register of float32: 16 with AVX-512F, else 8 with AVX2.
    assert get_target("cpu").parallelism_factor == (16 if "avx512f" in flags else 8)
    assert get_target("ort:CPUExecutionProvider").parallelism_factor == get_target("cpu").parallelism_factor


def test_cpu_spec_options_round_trip():
    target = get_target("cpu:threads=2,repeats=50,warmup=10,isolate=1")
    assert target.settings == MeasureSettings(warmup=10, repeats=50, threads=2, isolate=True)
    assert get_target(target.name) == target
    overridden = get_target("cpu:pf=32,min_seconds=0")
    assert overridden.parallelism_factor == 32 and get_target(overridden.name) == overridden


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("cpu:threads=0", "threads"),
        ("cpu:threads=two", "threads"),
        ("cpu:bogus=1", "bogus.*allowed: warmup, repeats, threads, isolate, min_seconds, pf"),
        ("cpu:pf=0", "pf"),
        ("cpu:threads", "key=value"),
        ("cpu:isolate=maybe", "isolate"),
        ("cpu:min_seconds=-1", "min_seconds"),
        ("cpu:threads=1,threads=2", "twice"),
    ],
)
def test_cpu_spec_bad_options(spec, complaint):
    with pytest.raises(BadInputError, match=complaint):
        get_target(spec)


def test_cpu_describe_names_the_configuration():
    info = get_target("cpu:threads=2").describe()
    assert info["name"] == "cpu:threads=2"
    assert info["threads"] == 2
    assert info["onnxruntime"] == ort.__version__
    assert info["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert info["cpu"] and info["settings"]["repeats"] == 20


def test_ort_spec_provider_options_and_pf():
    target = get_target("ort:CPUExecutionProvider,pf=16,repeats=3,arena_extend_strategy=kSameAsRequested")
    assert isinstance(target, OrtTarget)
    assert target.parallelism_factor == 16
    assert target.settings.repeats == 3
    assert target.providers == (("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}),)
    assert get_target(target.name) == target


@pytest.mark.parametrize("spec", ["ort:NoSuchEP", "ort:", "ort:NoSuchEP,device_id=0"])
def test_ort_spec_unavailable_provider_names_the_available_ones(spec):
    with pytest.raises(BadInputError, match="CPUExecutionProvider"):
        get_target(spec)


def test_ort_bad_pf():
    with pytest.raises(BadInputError, match="pf"):
        get_target("ort:CPUExecutionProvider,pf=0")


# --- the protocol ------------------------------------------------------------------------------------


def test_measure_returns_repeats_samples_and_their_median():
    m = measure_model(conv_model(), {}, MeasureSettings(warmup=1, repeats=7, min_seconds=0))
    assert len(m.samples_ms) == 7 and all(s > 0 for s in m.samples_ms)
    assert m.latency_ms == pytest.approx(float(np.median(m.samples_ms)))
    assert m.details["runs"] == 7
    assert m.details["p25_ms"] <= m.latency_ms <= m.details["p75_ms"]
    assert m.details["spread"] >= 0


def test_min_seconds_adds_samples_to_fast_models():
    m = measure_model(conv_model(), {}, MeasureSettings(warmup=1, repeats=2, min_seconds=0.05))
    assert sum(m.samples_ms) >= 50
    assert len(m.samples_ms) > 2


def test_cpu_target_measures():
    m = get_target("cpu:warmup=1,repeats=5,min_seconds=0").measure(conv_model(), {"x": (1, 3, 16, 16)})
    assert len(m.samples_ms) == 5 and m.latency_ms > 0 and m.cycles is None


def test_ort_cpu_provider_measures():
    m = get_target("ort:CPUExecutionProvider,warmup=1,repeats=5,min_seconds=0").measure(conv_model(), {})
    assert len(m.samples_ms) == 5 and m.latency_ms > 0


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_failed_provider_initialisation_is_not_timed_as_cpu():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the fallback case cannot be provoked")
    # Built directly, past from_spec's availability check: ORT would quietly fall back to the CPU.
    target = OrtTarget(provider="CUDAExecutionProvider", settings=FAST)
    with pytest.raises(CheckFailedError, match="CUDAExecutionProvider could not be initialised"):
        target.measure(conv_model(), {})


def test_interleaved_measures_every_model_the_same_number_of_times():
    models = {"small": conv_model(channels=4, size=8), "large": conv_model(channels=64, size=96)}
    result = measure_interleaved(models, {}, MeasureSettings(warmup=1, repeats=9, min_seconds=0))
    assert set(result) == {"small", "large"}
    assert [len(m.samples_ms) for m in result.values()] == [9, 9]
    # ~2000× the MACs: no amount of noise makes the results come out swapped.
    assert result["large"].latency_ms > 2 * result["small"].latency_ms


def test_a_round_gate_takes_every_round_and_keeps_the_times_it_returns():
    models = {"a": conv_model(seed=1), "b": conv_model(seed=2)}
    rounds = []

    def gate(measurement):
        measurement()  # a burst began during the first try: the gate measures the round again
        timed = measurement()
        rounds.append(timed)
        return timed

    result = measure_interleaved(models, {}, MeasureSettings(warmup=1, repeats=5, min_seconds=0), round_gate=gate)
    assert len(rounds) == 5 and all(set(r) == {"a", "b"} for r in rounds)
    assert list(result["a"].samples_ms) == [r["a"] / 1e6 for r in rounds]
    with pytest.raises(ValueError, match="cannot gate an isolated measurement"):
        measure_interleaved(models, {}, MeasureSettings(repeats=2, isolate=True), round_gate=gate)


def test_isolate_measures_in_a_fresh_process(monkeypatch):
    def no_session_here(*args):
        raise AssertionError("isolate=True opened a session in the calling process")

    monkeypatch.setattr(measure, "_open", no_session_here)
    models = {"a": conv_model(seed=1), "b": conv_model(seed=2)}
    settings = MeasureSettings(warmup=1, repeats=4, min_seconds=0, isolate=True)
    result = measure_interleaved(models, {"x": (1, 3, 16, 16)}, settings)
    assert [len(result[k].samples_ms) for k in ("a", "b")] == [4, 4]
    assert all(m.latency_ms > 0 for m in result.values())


def test_isolated_failures_keep_their_exit_class():
    model = conv_model()
    with pytest.raises(BadInputError, match="isolated measurement failed: --input-shape x:1x5x16x16"):
        measure_model(model, {"x": (1, 5, 16, 16)}, MeasureSettings(warmup=1, repeats=2, isolate=True))
    # Channels declared dynamic, fed 5 to a 3-channel conv: loads, then fails on the worker's first run.
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "C"
    with pytest.raises(CheckFailedError, match="isolated measurement failed: .*ONNX Runtime failed to run"):
        measure_model(model, {"x": (1, 5, 16, 16)}, MeasureSettings(warmup=1, repeats=2, isolate=True))


# --- per-node profiling ------------------------------------------------------------------------------


def test_profile_nodes_times_the_convs_and_deletes_the_trace(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    timings = profile_nodes(conv_model(channels=8, size=16), {}, FAST)
    convs = [t for t in timings if t.op_type == "Conv"]
    assert len(convs) == 2  # the Relu is fused into the first conv; both convs stay
    assert all(t.duration_ms >= 0 and t.runs == FAST.repeats for t in timings)
    assert {t.provider for t in timings} == {"CPUExecutionProvider"}
    padded = -(-8 // nchwc_block_size()) * nchwc_block_size()  # NCHWc pads channels to its block
    assert convs[0].input_shapes[:2] == ((1, 3, 16, 16), (padded, 3, 3, 3))
    assert convs[1].input_shapes[1] == (padded, 1, 3, 3)
    assert list(tmp_path.iterdir()) == []


def test_profile_nodes_isolated_matches_in_process():
    model = conv_model()
    here = profile_nodes(model, {}, FAST)
    there = profile_nodes(model, {}, MeasureSettings(warmup=1, repeats=5, min_seconds=0, isolate=True))
    strip = lambda ts: [(t.name, t.op_type, t.input_shapes, t.output_shapes, t.runs) for t in ts]  # noqa: E731
    assert strip(there) == strip(here)
    assert all(isinstance(t, NodeTiming) for t in there)


def _event(name, ts, dur=0, cat="Node"):
    args = {
        "op_name": "Conv",
        "provider": "CPUExecutionProvider",
        "input_type_shape": [{"float": [1, 3, 8, 8]}],
        "output_type_shape": [{"float": [1, 8, 8, 8]}],
    }
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}


def test_node_timings_drops_warmup_runs_and_sums_repeated_nodes():
    events = []
    for run, (conv_us, loop_us) in enumerate([(900, 900), (100, 10), (300, 30)]):
        start = 1000 * run
        events += [
            _event("model_run", start, 500, cat="Session"),
            _event("c_kernel_time", start + 1, conv_us),
            _event("c_fence_before", start + 2),  # not a kernel
            _event("loop_kernel_time", start + 3, loop_us),
            _event("loop_kernel_time", start + 4, loop_us),  # runs twice in one run (inside a Loop)
        ]
    timings = node_timings(events, skip_runs=1)
    assert [t.name for t in timings] == ["c", "loop"]
    assert timings[0].duration_ms == pytest.approx(0.2)  # median of 100 and 300 µs; the 900 µs warm-up dropped
    assert timings[1].duration_ms == pytest.approx(0.04)  # median of 2×10 and 2×30 µs
    assert timings[0].runs == 2
    assert timings[0].input_shapes == ((1, 3, 8, 8),) and timings[0].output_shapes == ((1, 8, 8, 8),)


# --- cmd: ----------------------------------------------------------------------------------------------


def _cmd(command: str) -> CommandTarget:
    target = get_target("cmd:" + command)
    assert isinstance(target, CommandTarget)
    return target


def test_cmd_reads_the_programs_milliseconds_and_they_agree_with_cpu():
    model, shapes = conv_model(channels=32, size=64), {"x": (1, 3, 64, 64)}
    external = _cmd(f"{PYTHON} {shlex.quote(str(TIME_ORT))} {{model}}").measure(model, shapes)
    inside = get_target("cpu:warmup=2,repeats=10").measure(model, shapes)
    assert external.samples_ms == (external.latency_ms,)
    # The same runtime timed two ways: the same order of magnitude, not a speed assertion.
    assert inside.latency_ms / 5 < external.latency_ms < inside.latency_ms * 5


def test_cmd_writes_the_model_with_the_analysis_shapes(tmp_path):
    copy = tmp_path / "seen.onnx"
    dynamic = conv_model()
    dynamic.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    script = f"import shutil, sys; shutil.copy(sys.argv[1], {str(copy)!r}); print(1.0)"
    _cmd(f"{PYTHON} -c {shlex.quote(script)} {{model}}").measure(dynamic, {"x": (1, 3, 24, 16)})
    dims = load_model(copy).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 24, 16]


def _python(script: str) -> str:
    return f"{PYTHON} -c {shlex.quote(script)} {{model}}"


@pytest.mark.parametrize(
    ("script", "complaint"),
    [
        ("import sys; sys.stderr.write('warming up\\nboom: no device\\n'); sys.exit(3)", "status 3: boom: no device"),
        ("print('12 ms'); print('all done')", "printed no latency.*'all done'"),
        ("pass", "printed nothing"),
        ("print('-4 ms')", "printed no latency"),
    ],
)
def test_cmd_failures_are_failed_checks_that_say_why(script, complaint):
    with pytest.raises(CheckFailedError, match=complaint):
        _cmd(_python(script)).measure(conv_model(), {})


def test_cmd_timeout_is_a_failed_check():
    target = get_target("cmd:[timeout=0.5] " + _python("import time; time.sleep(30)"))
    with pytest.raises(CheckFailedError, match="did not finish within 0.5 s"):
        target.measure(conv_model(), {})


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("cmd:no-such-benchmark-program {model}", "'no-such-benchmark-program' not found"),
        (f"cmd:{PYTHON} -c 'print(1)'", r"must contain \{model\}"),
        ("cmd:[bogus=1] run {model}", "bogus"),
        ("cmd:[shell=1 run {model}", "closing"),
        ("cmd:[timeout=never] run {model}", "timeout"),
        (f"cmd:{PYTHON} 'unbalanced {{model}}", "cannot split"),
    ],
)
def test_cmd_bad_specs_fail_before_running(spec, complaint):
    with pytest.raises(BadInputError, match=complaint):
        get_target(spec)


def test_cmd_uses_a_shell_only_when_asked():
    command = "echo $((1+1)) {model}"
    with pytest.raises(CheckFailedError, match="printed no latency"):
        _cmd(command).measure(conv_model(), {})  # echo prints "$((1+1)) PATH" verbatim
    target = _cmd("[shell=1,pf=16] " + command)
    assert target.parallelism_factor == 16 and get_target(target.name) == target
    assert target.measure(conv_model(), {}).latency_ms == 2.0


@pytest.mark.parametrize(
    ("stdout", "ms"),
    [
        ("12.5\n", 12.5),
        ("loading\n12.5 ms\n\n", 12.5),
        ("latency=12.5ms", 12.5),
        ("mean: 3e-1", 0.3),
        ("done", None),
        ("", None),
        ("nan", None),
        ("0", None),
        ("/tmp/hwnas-cmd-x1/model.onnx", None),
    ],
)
def test_parse_latency_ms(stdout, ms):
    assert parse_latency_ms(stdout) == (pytest.approx(ms) if ms is not None else None)


# --- the real models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_models_measure_and_profile(name):
    model, shapes = load_model(real_model_path(name)), REAL_MODELS[name]
    settings = MeasureSettings(warmup=1, repeats=2, min_seconds=0)
    assert measure_model(model, shapes, settings).latency_ms > 0
    timings = profile_nodes(model, shapes, settings)
    assert any(t.op_type == "Conv" for t in timings)
    # The profile accounts for most of a run (DESIGN.md: ~93 %); the kernels are not lost or doubled.
    assert 0 < sum(t.duration_ms for t in timings) < 10 * measure_model(model, shapes, settings).latency_ms

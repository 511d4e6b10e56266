"""cpu int8 profiling: networks quantized by the quantize pass give int8 kernels regressors of their own."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from hwnas import api
from hwnas.estimator.estimator import LatencyEstimator
from hwnas.estimator.profile import profile_target
from hwnas.models import build
from hwnas.passes.quantize import quantize_model
from hwnas.targets import get_target
from hwnas.targets.kernels import decompose


@pytest.mark.slow
def test_profiling_with_quantize_fits_int8_regressors_that_int8_models_use(tmp_path):
    target = get_target("cpu")
    # enough measurements that the int8 convs reach MIN_SAMPLES_PER_REGRESSOR
    estimator, report = profile_target(target, 200, seed=0, rounds=1, quantize=quantize_model)
    assert estimator.target_config["profiling"]["int8_networks"] >= 1
    int8_keys = {k for k in estimator.regressors_ if k.endswith("/int8")}
    assert "conv/int8" in int8_keys or "dwconv/int8" in int8_keys
    assert any(s.kernel.int8 for s in estimator.samples_) and any(not s.kernel.int8 for s in estimator.samples_)
    path = tmp_path / "cpu.json"
    estimator.save(path)
    loaded = LatencyEstimator.load(path)
    assert set(loaded.regressors_) == set(estimator.regressors_)  # KIND/int8 survives the round trip
    model = build("mobilenetv2", width=0.35, resolution=64)
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    q = api.run(model, "quantize{preset=cpu}", calibration={model.graph.input[0].name: x}, allow_drift=1.0,
                verify=False).model
    shapes = {model.graph.input[0].name: (1, 3, 64, 64)}
    float_ms = loaded.estimate(model, shapes).latency_ms
    int8 = loaded.estimate(q, shapes)
    assert int8.latency_ms > 0 and int8.latency_ms != pytest.approx(float_ms, rel=1e-6)
    # an int8 kernel of a kind profiled in int8 is predicted by the int8 regressor, not the float one
    kind = "conv" if "conv/int8" in int8_keys else "dwconv"
    kernel = next(k for k in decompose(q, shapes, loaded.rules) if k.kind == kind and k.int8)
    as_int8, as_float = loaded.predict_kernels([kernel, dataclasses.replace(kernel, int8=False)])
    assert as_int8.latency_ms != pytest.approx(as_float.latency_ms, rel=1e-6)


def _profile_script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_cpu.py"
    spec = importlib.util.spec_from_file_location("profile_cpu", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_int8_only_profiling_keeps_the_float_measurements_and_their_predictions():
    """`profile_cpu.py --int8-only FROM`: FROM's float samples (and so its float predictions) stay; the int8
    samples are the new profile's, numbered after FROM's networks."""
    from hwnas.estimator.estimator import Sample

    script = _profile_script()
    base = LatencyEstimator.load("hwnas/estimator/data/estimators/cpu.json")
    fresh = [Sample(s.kernel, 2 * s.latency_ms, s.network) for s in base.samples_[:400]]  # a stand-in int8 profile
    new = LatencyEstimator(base.target, base.parallelism_factor, base.rules, {"profiling": {"budget": 400}}).fit(fresh)
    merged = script.merged(base, new, lambda k: k.int8, "int8")
    assert [s for s in merged.samples_ if not s.kernel.int8] == [s for s in base.samples_ if not s.kernel.int8]
    assert sorted(s.latency_ms for s in merged.samples_ if s.kernel.int8) == sorted(
        s.latency_ms for s in fresh if s.kernel.int8)
    first = merged.target_config["int8_profiling"]["networks_from"]
    assert first > max(s.network for s in base.samples_ if s.network is not None)
    assert all(s.network >= first for s in merged.samples_ if s.kernel.int8 and s.network is not None)
    assert merged.rules == base.rules and merged.kernel_offset_ms == base.kernel_offset_ms
    floats = [s.kernel for s in base.samples_ if not s.kernel.int8][:200]
    assert [e.latency_ms for e in merged.predict_kernels(floats)] == [e.latency_ms for e in base.predict_kernels(floats)]


def test_a_merged_profile_holds_the_new_kernels_at_the_base_profiles_speed_level():
    """The fresh profile's kernel times are scaled by base level / fresh level (the quiet gate's reference), so
    that one recorded level holds for every kernel of the merged estimator; without a level on both sides, as is."""
    from hwnas.estimator.estimator import Sample

    script = _profile_script()
    shipped = LatencyEstimator.load("hwnas/estimator/data/estimators/cpu.json")
    samples = ([s for s in shipped.samples_ if s.kernel.int8][:150]
               + [s for s in shipped.samples_ if not s.kernel.int8][:150])

    def profiled(level: float | None, times: float = 1.0) -> LatencyEstimator:
        gate = {"quiet_gate": {"reference_ms": level}} if level else {}
        return LatencyEstimator(shipped.target, shipped.parallelism_factor, shipped.rules,
                                {"profiling": {"budget": 300, **gate}}).fit(
            [Sample(s.kernel, times * s.latency_ms, s.network) for s in samples])

    base, fresh = profiled(0.1), profiled(0.2, times=2.0)  # the same kernels, timed at half the speed
    merged = script.merged(base, fresh, lambda k: k.int8, "int8")
    int8 = sorted(s.latency_ms for s in samples if s.kernel.int8)
    assert int8 and np.allclose(sorted(s.latency_ms for s in merged.samples_ if s.kernel.int8), int8)
    assert merged.target_config["int8_profiling"]["scaled_to_base_level"] == 0.5
    unrecorded = script.merged(profiled(None), fresh, lambda k: k.int8, "int8")
    assert np.allclose(sorted(s.latency_ms for s in unrecorded.samples_ if s.kernel.int8), [2 * t for t in int8])


def test_int8_networks_are_aligned_every_second_time_and_verified_exact():
    """The int8 profiles' quantizer: align-channels{multiple=16} (checked exact by api.run) on every second
    network before the quantize pass."""
    from hwnas.estimator.networks import NetworkConfig, build_network, random_network

    quantize = api.profiling_quantizer()
    rng = np.random.default_rng(0)  # a draw where alignment reaches all but a few convs (how many varies: 40-100 %)
    config = random_network(rng)
    model, _ = build_network(config)
    calibration = {"x": rng.normal(size=(2, config.c_in, config.size, config.size)).astype(np.float32)}
    shapes = {"x": (1, config.c_in, config.size, config.size)}
    rules = get_target("cpu").rules

    def aligned_share(q) -> float:
        convs = [k for k in decompose(q, shapes, rules) if k.kind in ("conv", "dwconv") and k.int8]
        return sum(k.c_out % 16 == 0 for k in convs) / len(convs)

    first, second = aligned_share(quantize(model, calibration)), aligned_share(quantize(model, calibration))
    assert first >= 0.8 and second < first  # the first call aligned (a graph output's conv keeps its width)
    empty, _ = build_network(NetworkConfig(3, 16, ()))  # a random network can have no node: quantized as it is
    assert quantize(empty, {"x": np.zeros((2, 3, 16, 16), np.float32)}).graph.output


@pytest.mark.slow
def test_replace_kinds_keeps_the_other_kinds_and_needs_its_base(monkeypatch, capsys):
    """`profile_cpu.py --replace-kinds K --from FROM`: FROM's kernels of every kind but K, the new run's of K;
    either option alone is bad input (exit 2, one line, before anything is measured)."""
    script = _profile_script()
    base = LatencyEstimator.load("hwnas/estimator/data/estimators/cpu.json")
    fresh = LatencyEstimator(base.target, base.parallelism_factor, base.rules, {"profiling": {"budget": 300}}).fit(
        [s for s in base.samples_ if s.kernel.kind in ("resize", "conv")][:300])
    merged = script.merged(base, fresh, lambda k: k.kind == "resize", "kinds")
    assert [s for s in merged.samples_ if s.kernel.kind != "resize"] == [s for s in base.samples_ if s.kernel.kind != "resize"]
    assert sum(s.kernel.kind == "resize" for s in merged.samples_) == sum(s.kernel.kind == "resize" for s in fresh.samples_)
    assert merged.target_config["kinds_profiling"]["kept"] == sum(s.kernel.kind == "resize" for s in fresh.samples_)
    for argv in (["--replace-kinds", "resize"], ["--from", "x.json"]):
        monkeypatch.setattr(sys, "argv", ["profile_cpu.py", *argv])
        assert script.main() == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_int8_draws_are_pooled_each_at_the_base_profiles_speed_level():
    """`--int8-draws 2`: the second draw's int8 kernels join the first's (each scaled to the base's level), the
    float ones stay the base's, and each draw's record is kept (`int8_profiling`, `int8_2_profiling`)."""
    from hwnas.estimator.estimator import Sample

    script = _profile_script()
    shipped = LatencyEstimator.load("hwnas/estimator/data/estimators/cpu.json")
    samples = ([s for s in shipped.samples_ if s.kernel.int8][:100]
               + [s for s in shipped.samples_ if not s.kernel.int8][:100])

    def profiled(level: float, times: float = 1.0) -> LatencyEstimator:
        return LatencyEstimator(shipped.target, shipped.parallelism_factor, shipped.rules,
                                {"profiling": {"budget": 200, "quiet_gate": {"reference_ms": level}}}).fit(
            [Sample(s.kernel, times * s.latency_ms, s.network) for s in samples])

    base = profiled(0.1)
    first = script.merged(base, profiled(0.2, times=2.0), lambda k: k.int8, "int8")
    both = script.merged(first, profiled(0.05, times=0.5), lambda k: k.int8, "int8", draw=2)
    int8 = sorted(s.latency_ms for s in samples if s.kernel.int8)
    assert np.allclose(sorted(s.latency_ms for s in both.samples_ if s.kernel.int8), sorted(int8 + int8))
    assert [s for s in both.samples_ if not s.kernel.int8] == [s for s in base.samples_ if not s.kernel.int8]
    assert both.target_config["int8_profiling"]["scaled_to_base_level"] == 0.5
    assert both.target_config["int8_2_profiling"]["scaled_to_base_level"] == 2.0
    assert both.target_config["profiling"]["base_kept"] == first.target_config["profiling"]["base_kept"]
    second_networks = [s.network for s in both.samples_[len(first.samples_):]]
    assert min(second_networks) > max(s.network for s in first.samples_ if s.network is not None)


def test_int8_draws_needs_int8_only_and_a_positive_count(monkeypatch, capsys):
    script = _profile_script()
    for argv in (["--int8-draws", "2"], ["--int8-only", "hwnas/estimator/data/estimators/cpu.json", "--int8-draws", "0"]):
        monkeypatch.setattr(sys, "argv", ["profile_cpu.py", *argv])
        assert script.main() == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_text_line_draws_pool_unscaled_and_drop_whole_float_networks_of_the_base():
    """`benchmarks/studies/text_line_draws.py`: `--keep-level` pools a draw's times as measured, and `--drop N`
    leaves out whole float networks of the base (never int8 ones) until N samples are gone."""
    from hwnas.estimator.estimator import Sample

    script = _profile_script()
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "studies" / "text_line_draws.py"
    spec = importlib.util.spec_from_file_location("text_line_draws", path)
    study = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    spec.loader.exec_module(study)
    shipped = LatencyEstimator.load("hwnas/estimator/data/estimators/cpu.json")
    samples = [s for s in shipped.samples_ if s.network is not None][:300]

    def profiled(level: float, times: float = 1.0) -> LatencyEstimator:
        return LatencyEstimator(shipped.target, shipped.parallelism_factor, shipped.rules,
                                {"profiling": {"budget": 300, "quiet_gate": {"reference_ms": level}}}).fit(
            [Sample(s.kernel, times * s.latency_ms, s.network) for s in samples])

    base, fresh = profiled(0.1), profiled(0.2, times=2.0)
    kept = script.merged(base, fresh, lambda k: not k.int8, "text_line", draw=2, scale_level=False)
    scaled = script.merged(base, fresh, lambda k: not k.int8, "text_line", draw=2)
    added = len(kept.samples_) - len(base.samples_)
    assert added == sum(not s.kernel.int8 for s in samples)
    assert np.allclose([s.latency_ms for s in kept.samples_[-added:]], [2 * s.latency_ms for s in samples if not s.kernel.int8])
    assert np.allclose([s.latency_ms for s in scaled.samples_[-added:]], [s.latency_ms for s in samples if not s.kernel.int8])
    fewer = study.without_float_networks(base, 50, seed=0)
    gone = {s.network for s in base.samples_} - {s.network for s in fewer.samples_}
    assert len(base.samples_) - len(fewer.samples_) >= 50 and gone
    assert all(not s.kernel.int8 for s in base.samples_ if s.network in gone)
    assert [s for s in fewer.samples_ if s.kernel.int8] == [s for s in base.samples_ if s.kernel.int8]

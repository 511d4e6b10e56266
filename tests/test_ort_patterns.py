"""Op chains ONNX Runtime runs as one node (erf GELU, decomposed LayerNorm, SiLU) are one kernel; Softmax's
axis and the catch-all kind's ops are told apart; the profiling networks write what ORT fuses.

Every claim about ORT is checked against its own optimized graph (`SessionOptions.optimized_model_filepath`)."""

from __future__ import annotations

import collections
import dataclasses
import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from hwnas.errors import BadInputError
from hwnas.estimator.estimator import LatencyEstimator, Sample, _kernel_from_dict
from hwnas.estimator.features import FEATURES_VERSION, SHAPE_FEATURES, feature_matrix
from hwnas.estimator.networks import BlockConfig, NetworkBuilder, NetworkConfig, _act, _layer_norm, build_network
from hwnas.targets.fusion_rules import FusionRules, builtin_rules
from hwnas.targets.kernels import decompose

CPU = builtin_rules("cpu")
NPU = builtin_rules("npu")


def _ort_ops(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    """Op types of the graph ORT runs (CPU provider, every optimization)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def _chain(build, shape=(1, 16, 64)) -> onnx.ModelProto:
    """Transpose → `build` → MatMul, so that the chain sits between kernels as in a model (after a
    Transpose, not an anchor: a Conv or MatMul takes x·sigmoid(x) in as a `self_gate`, and ORT folds a
    bias Add after a MatMul into a Gemm)."""
    b = NetworkBuilder(0)
    x = b.input("x", (shape[0], shape[2], shape[1]))
    x = b.node("Transpose", [x], shape, perm=[0, 2, 1])
    y = build(b, x)
    return b.model([b.node("MatMul", [y, b.weight([shape[-1], shape[-1]], shape[-1])], shape)])


def _gelu_ort_order_2(b: NetworkBuilder, x: str) -> str:
    """(x · 0.5) · (1 + erf(x/√2)): ORT's other GELU order."""
    shape = b.shapes[x]
    erf = b.node("Erf", [b.node("Div", [x, b.scalar(math.sqrt(2.0))], shape)], shape)
    return b.node("Mul", [b.node("Mul", [x, b.scalar(0.5)], shape), b.node("Add", [erf, b.scalar(1.0)], shape)], shape)


def _gelu_unfused_order(b: NetworkBuilder, x: str) -> str:
    """x · ((1 + erf(x/√2)) · 0.5): what the profiling networks used to write; ORT does not fuse it."""
    shape = b.shapes[x]
    erf = b.node("Erf", [b.node("Div", [x, b.scalar(math.sqrt(2.0))], shape)], shape)
    return b.node("Mul", [x, b.node("Mul", [b.node("Add", [erf, b.scalar(1.0)], shape), b.scalar(0.5)], shape)], shape)


def _bias_gelu(b: NetworkBuilder, x: str) -> str:
    bias = b.const(np.full(b.shapes[x][-1], 0.1, np.float32))
    return _act(b, b.node("Add", [x, bias], b.shapes[x]), "gelu")


def _swish(b: NetworkBuilder, x: str) -> str:
    return _act(b, x, "swish")


CHAINS = {  # what we build → (the kernel op, how many ONNX nodes it covers, the node ORT runs it as)
    "gelu exporters' order": (lambda b, x: _act(b, x, "gelu"), "Gelu", 5, "Gelu"),
    "gelu ORT's other order": (_gelu_ort_order_2, "Gelu", 5, "Gelu"),
    "bias + gelu": (_bias_gelu, "Gelu", 6, "BiasGelu"),
    "decomposed LayerNorm": (lambda b, x: _layer_norm(b, x, decomposed=True), "LayerNormalization", 9,
                             "LayerNormalization"),
    "x·sigmoid(x)": (_swish, "QuickGelu", 2, "QuickGelu"),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_a_chain_ort_fuses_is_one_kernel_of_the_op_ort_runs(name, tmp_path):
    build, op, nodes, ort_op = CHAINS[name]
    model = _chain(build)
    assert _ort_ops(model, tmp_path)[ort_op] == 1  # ORT runs the chain as one node
    kernels = [k for k in decompose(model, {}, CPU) if k.kind != "free"]
    assert [k.op for k in kernels] == ["Transpose", op, "MatMul"]
    assert len(kernels[1].nodes) == nodes
    assert kernels[1].input_shapes == ((1, 16, 64),) and kernels[1].output_shapes == ((1, 16, 64),)
    # the npu's rules know no patterns: the chain's ops stay kernels of their own there
    assert op not in {k.op for k in decompose(model, {}, NPU)}


def _gelu_scaled_by_mul(b: NetworkBuilder, x: str) -> str:
    """(x · (1 + erf(x · 1/√2))) · 0.5: ORT 1.32 fuses the Div form only."""
    shape = b.shapes[x]
    erf = b.node("Erf", [b.node("Mul", [x, b.scalar(math.sqrt(0.5))], shape)], shape)
    return b.node("Mul", [b.node("Mul", [x, b.node("Add", [erf, b.scalar(1.0)], shape)], shape), b.scalar(0.5)], shape)


@pytest.mark.parametrize("build", [_gelu_unfused_order, _gelu_scaled_by_mul])
def test_a_gelu_form_ort_does_not_fuse_is_not_one_kernel(build, tmp_path):
    model = _chain(build)
    assert _ort_ops(model, tmp_path)["Gelu"] == 0
    assert "Gelu" not in {k.op for k in decompose(model, {}, CPU)}


def test_the_decomposed_layer_norm_is_the_kernel_the_op_is():
    native = [k for k in decompose(_chain(lambda b, x: _layer_norm(b, x)), {}, CPU) if k.kind != "free"][1]
    chain = [k for k in decompose(_chain(lambda b, x: _layer_norm(b, x, True)), {}, CPU) if k.kind != "free"][1]
    assert (chain.op, chain.kind, chain.c_in, chain.c_out) == (native.op, native.kind, native.c_in, native.c_out)
    assert chain.input_elements == native.input_elements and chain.output_elements == native.output_elements


def test_a_swish_after_an_anchor_stays_in_its_kernel():
    """The `self_gate` rule takes x·sigmoid(x) into the conv before any pattern: as the shipped samples were cut."""
    b = NetworkBuilder(0)
    x = b.input("x", (1, 8, 16, 16))
    y = b.node("Conv", [x, b.weight([8, 8, 1, 1], 8)], (1, 8, 16, 16))
    kernels = decompose(b.model([_act(b, y, "swish")]), {}, CPU)
    assert [k.ops for k in kernels] == [("Conv", "Sigmoid", "Mul")]


def test_profiling_networks_write_gelu_and_layer_norm_as_ort_fuses_them(tmp_path):
    blocks = (BlockConfig("conv", 16, 3, act="gelu"),
              BlockConfig("attention", 16, groups=2, hidden=32, act="gelu", op="decomposed_ln"))
    model, _ = build_network(NetworkConfig(3, 8, blocks, seed=1))
    ran = _ort_ops(model, tmp_path)
    kernels = collections.Counter(k.op for k in decompose(model, {}, CPU))
    assert ran["Gelu"] + ran["BiasGelu"] == kernels["Gelu"] == 2
    assert ran["LayerNormalization"] == kernels["LayerNormalization"] == 2
    assert "Erf" not in kernels and "ReduceMean" not in kernels


def _softmax_model(axis: int, opset: int = 17) -> onnx.ModelProto:
    b = NetworkBuilder(0)
    x = b.input("x", (1, 8, 40, 40))
    model = b.model([b.node("Softmax", [x], (1, 8, 40, 40), axis=axis)])
    model.opset_import[0].version = opset
    return model


def test_softmax_kernels_say_which_axis_they_normalize():
    last, channels = (decompose(_softmax_model(axis), {}, CPU)[0] for axis in (-1, 1))
    assert (last.inner, channels.inner) == (1, 1600)
    work_last, shape_last = feature_matrix([last], 16)
    work_channels, shape_channels = feature_matrix([channels], 16)
    assert not np.array_equal(work_last, work_channels) and not np.array_equal(shape_last, shape_channels)
    # before opset 13 Softmax normalizes the flattened axes from `axis` on: contiguous, the innermost
    assert decompose(_softmax_model(1, opset=11), {}, CPU)[0].inner == 1


def test_stored_softmax_samples_from_before_the_axis_was_recorded_are_the_heads_axis_1():
    kernel = decompose(_softmax_model(1), {}, CPU)[0]
    data = json.loads(json.dumps(dataclasses.asdict(kernel)))
    del data["inner"]
    assert _kernel_from_dict(data).inner == 1600


def _other_samples() -> list[Sample]:
    """Transposes (a cheap copy) and last-axis Softmaxes 10x dearer per element, at the same sizes."""
    samples = []
    for i, (c, h) in enumerate((c, h) for c in (8, 16, 24, 32, 48, 64) for h in (8, 12, 16, 24, 32)):
        b = NetworkBuilder(i)
        x = b.input("x", (1, c, h, h))
        model = b.model([b.node("Transpose", [x], (1, h, h, c), perm=[0, 2, 3, 1]),
                         b.node("Softmax", [x], (1, c, h, h), axis=-1)])
        transpose, softmax = (k for k in decompose(model, {}, CPU) if k.kind == "other")
        elements = c * h * h
        samples += [Sample(transpose, 1e-6 * elements + 0.002), Sample(softmax, 1e-5 * elements + 0.002)]
    return samples


def test_each_op_of_the_catch_all_kind_has_its_own_regressor():
    estimator = LatencyEstimator("cpu", 16, CPU).fit(_other_samples())
    assert {"other:Transpose", "other:Softmax"} <= set(estimator.regressors_)
    transpose, softmax = (s.kernel for s in _other_samples()[-2:])
    t, s = estimator.predict_kernels([transpose, softmax])
    assert s.latency_ms > 5 * t.latency_ms
    assert t.in_distribution and s.in_distribution


def _unary_samples(ops=("Relu", "Softplus")) -> list[Sample]:
    """A Relu (~0.03 ns per element in ORT) and a Softplus (~11 ns: a scalar log(1 + exp x)) at the same sizes:
    the same features, only the op tells them apart."""
    samples = []
    for i, (c, h) in enumerate((c, h) for c in (8, 16, 24, 32, 48, 64) for h in (8, 12, 16, 24, 32)):
        b = NetworkBuilder(i)
        x = b.input("x", (1, c, h, h))
        model = b.model([b.node(op, [x], (1, c, h, h)) for op in ops])
        for k in decompose(model, {}, CPU):
            if k.kind == "elementwise":
                samples.append(Sample(k, (3e-8 if k.op == "Relu" else 1.1e-5) * c * h * h + 0.002))
    return samples


def test_each_elementwise_op_has_its_own_regressor_and_a_never_profiled_one_is_flagged():
    samples = _unary_samples()
    estimator = LatencyEstimator("cpu", 16, CPU, {"provider": "CPUExecutionProvider"}).fit(samples)
    assert {"elementwise:Relu", "elementwise:Softplus", "elementwise"} <= set(estimator.regressors_)
    # a simulated target (no ONNX Runtime provider) keeps one elementwise regressor: its ops cost alike
    assert "elementwise:Relu" not in LatencyEstimator("npu-32x32", 32, CPU).fit(samples).regressors_
    relu, softplus = (s.kernel for s in samples[-2:])
    r, s = estimator.predict_kernels([relu, softplus])
    assert s.latency_ms == pytest.approx(1.1e-5 * 64 * 32 * 32 + 0.002, rel=0.15)
    assert r.latency_ms < 0.2 * s.latency_ms and r.in_distribution and s.in_distribution
    tanh = _unary_samples(("Tanh",))[-1].kernel  # never profiled: the kind's pooled regressor, flagged
    t = estimator.predict_kernels([tanh])[0]
    assert t.latency_ms > 0 and not t.in_distribution


def test_rank_tells_a_pixel_shuffle_transpose_from_a_plain_one():
    b = NetworkBuilder(0)
    x = b.input("x", (1, 4, 32, 32))
    six = b.node("Reshape", [x, b.const(np.array([1, 4, 16, 2, 16, 2], np.int64))], (1, 4, 16, 2, 16, 2))
    model = b.model([b.node("Transpose", [six], (1, 4, 2, 2, 16, 16), perm=[0, 1, 3, 5, 2, 4]),
                     b.node("Transpose", [x], (1, 32, 32, 4), perm=[0, 2, 3, 1])])
    shuffle, plain = (k for k in decompose(model, {}, CPU) if k.op == "Transpose")
    rank = list(feature_matrix([shuffle, plain], 16)[1][:, SHAPE_FEATURES.index("rank")])
    assert rank == [6.0, 4.0]


def test_fitted_arrays_of_older_features_are_refitted_on_load(tmp_path):
    estimator = LatencyEstimator("cpu", 16, CPU).fit(_other_samples())
    path = tmp_path / "cpu.json"
    estimator.save(path)
    with np.load(tmp_path / "cpu.fitted.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["meta"]))
    assert meta["features"] == FEATURES_VERSION > 1
    del meta["features"]  # as written before the version was recorded
    arrays["meta"] = np.array(json.dumps(meta))
    arrays = {k: (v * 0 if k.endswith("/coef") else v) for k, v in arrays.items()}  # would predict 0 ms if used
    np.savez_compressed(tmp_path / "cpu.fitted.npz", **arrays)
    kernel = _other_samples()[-1].kernel
    assert LatencyEstimator.load(path).predict_kernels([kernel])[0].latency_ms > 0.01


def test_shipped_cpu_estimator_loads_and_costs_an_exported_gelu_as_one_kernel():
    from hwnas.estimator.defaults import _load_shipped

    estimator = _load_shipped("cpu")
    assert "Gelu" in estimator.rules.patterns
    kernels = decompose(_chain(lambda b, x: _act(b, x, "gelu")), {}, estimator.rules)
    estimates = estimator.predict_kernels(kernels)
    assert [e.op for e in estimates if e.kind != "free"] == ["Transpose", "Gelu", "MatMul"]
    assert all(e.latency_ms > 0 for e in estimates if e.kind != "free")


def test_fusion_rules_name_known_patterns_only():
    with pytest.raises(BadInputError, match="unknown patterns"):
        FusionRules.from_dict({"patterns": ["FastGelu"]})
    assert "patterns" not in FusionRules().to_dict()  # rules without patterns keep their form
    assert FusionRules.from_dict(CPU.to_dict()) == CPU


def test_fusion_detection_finds_the_patterns_ort_runs_as_one_node(tmp_path):
    from hwnas.estimator.cpu_fusion import CASES, PairMeasurement, case_shapes, pair_models, rules_from_verdicts

    verdicts = []
    for case in (c for c in CASES if c.rule.startswith("patterns:")):
        models = pair_models(case, case_shapes(case)[0])
        nodes = {key: sum(_ort_ops(models[key], tmp_path).values()) for key in ("t1", "t12")}
        ops = len(models["t2"].graph.node)
        verdicts.append(PairMeasurement(case.pair, case.rule, "median", 1.0, 1.0, 2.0, 0.0, nodes["t12"] - nodes["t1"], ops))
    for criterion in ("latency", "latency_or_node"):  # no saving against the Relu: decided by the node count
        assert rules_from_verdicts(verdicts, criterion).patterns == CPU.patterns


def test_in_context_profiling_times_each_fused_chain_as_its_kernel():
    """ORT's Gelu / LayerNormalization / QuickGelu nodes are attributed to the chain's kernel, none dropped."""
    from hwnas.estimator.attribution import measure_in_context
    from hwnas.targets.measure import MeasureSettings

    blocks = (BlockConfig("conv", 16, 3, act="gelu"),
              BlockConfig("attention", 16, groups=2, hidden=32, act="swish", op="decomposed_ln"))
    model, _ = build_network(NetworkConfig(3, 8, blocks, seed=1))
    profile = measure_in_context(model, {}, CPU, MeasureSettings(warmup=1, repeats=3, min_seconds=0))
    timed = collections.Counter(k.op for k in profile.kernels)
    assert (timed["Gelu"], timed["LayerNormalization"], timed["QuickGelu"]) == (1, 2, 1)
    assert all(t > 0 for t in profile.latency_ms)


def test_profiling_around_a_model_builds_blocks_with_its_fused_chains():
    from hwnas.estimator.around import block_unit
    from hwnas.estimator.networks import network_around

    b = NetworkBuilder(0)
    x = b.input("x", (1, 24, 20, 20))
    y = b.node("Conv", [x, b.weight([24, 24, 3, 3], 216)], (1, 24, 20, 20), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    gelu = next(k for k in decompose(b.model([_act(b, y, "gelu")]), {}, CPU) if k.op == "Gelu")
    layer_norm = [k for k in decompose(_chain(lambda b, x: _layer_norm(b, x, True), (1, 16, 32)), {}, CPU)
                  if k.op == "LayerNormalization"][0]
    for kernel in (gelu, layer_norm):
        block, c, h = block_unit(kernel)
        model, _ = build_network(network_around(np.random.default_rng(0), block, c, h))
        made = [k for k in decompose(model, {}, CPU) if k.op == kernel.op]
        assert any(k.input_shapes == kernel.input_shapes and len(k.ops) == len(kernel.ops) for k in made), kernel.op


def test_profiling_around_a_softmax_keeps_its_axis():
    from hwnas.estimator.around import kernel_unit
    from hwnas.estimator.networks import build_kernel_model

    for axis in (-1, 1):
        kernel = decompose(_softmax_model(axis), {}, CPU)[0]
        unit = build_kernel_model(kernel_unit(kernel))
        assert decompose(unit, {}, CPU)[0].inner == kernel.inner


def test_valid_taps_count_the_window_reads_that_miss_the_padding():
    """A 5x5 depthwise conv on a text line's 2 x 96 map reads input with 40 % of its window rows (ORT skips the
    padding's), one on a 32 x 32 map with most of them; a 1x1 conv and a pool without padding with all."""
    from hwnas.estimator.features import WORK_FEATURES, valid_tap_fraction

    def model(h: int, w: int) -> onnx.ModelProto:
        weights = [onnx.numpy_helper.from_array(np.ones((8, 1, 5, 5), np.float32), "dw"),
                   onnx.numpy_helper.from_array(np.ones((8, 8, 1, 1), np.float32), "pw")]
        nodes = [onnx.helper.make_node("Conv", ["x", "dw"], ["a"], group=8, pads=[2, 2, 2, 2], name="dw"),
                 onnx.helper.make_node("Conv", ["a", "pw"], ["b"], name="pw"),
                 onnx.helper.make_node("MaxPool", ["b"], ["y"], kernel_shape=[2, 2], strides=[2, 2], name="pool")]
        graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, h, w])],
                                       [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], weights)
        return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])

    for (h, w), expected in (((2, 96), 0.4 * (96 * 5 - 6) / (96 * 5)), ((32, 32), ((32 * 5 - 6) / (32 * 5)) ** 2)):
        kernels = {k.name: k for k in decompose(model(h, w), {"x": (1, 8, h, w)}, builtin_rules("cpu"))}
        assert math.isclose(valid_tap_fraction(kernels["dw"]), expected)
        assert valid_tap_fraction(kernels["pw"]) == 1.0 and valid_tap_fraction(kernels["pool"]) == 1.0
        work, _ = feature_matrix([kernels["dw"]], 16)
        assert math.isclose(work[0, WORK_FEATURES.index("macs")], kernels["dw"].macs * expected)  # walked, not im2col

"""The estimators on quantized (QDQ) models: Q/DQ pairs are part of the kernels around them."""

from __future__ import annotations

import numpy as np
import pytest

import hwnas.api as api
from hwnas.estimator.estimate import estimate
from hwnas.estimator.networks import BlockConfig, NetworkConfig, build_network
from hwnas.models import build


@pytest.fixture(scope="module")
def models():
    model = build("mobilenetv2", resolution=96)
    calibration = {"input": np.random.default_rng(0).standard_normal((4, 3, 96, 96)).astype(np.float32)}
    float_model = api.run(model, "fold-bn").model
    quantized = api.run(model, "fold-bn,quantize{preset=cpu}", calibration=calibration, allow_drift=0.5).model
    return float_model, quantized


def test_an_int8_npu_estimates_the_quantized_model_as_its_float_graph(models):
    float_model, quantized = models
    f, q = estimate(float_model, "npu-32x32"), estimate(quantized, "npu-32x32")
    assert q.latency_ms == pytest.approx(f.latency_ms, rel=0.02)
    convs = [k.name for k in f.kernels if k.op in ("Conv", "Gemm")]
    assert [k.name for k in q.kernels if k.op in ("Conv", "Gemm")] == convs  # no Q/DQ kernel of their own
    assert not [k for k in q.kernels if k.op in ("QuantizeLinear", "DequantizeLinear") and k.kind != "free"]


def test_a_float_model_on_an_int8_npu_says_the_estimate_assumes_int8(models):
    float_model, quantized = models
    assert [w for w in estimate(float_model, "npu-32x32").warnings if "assumes int8" in w]
    assert not [w for w in estimate(quantized, "npu-32x32").warnings if "assumes int8" in w]
    assert not [w for w in estimate(float_model, "cpu").warnings if "assumes int8" in w]


def test_the_shipped_cpu_estimator_knows_int8_kernels(models):
    """Profiled with --int8: a quantized model's convs are costed by the KIND/int8 regressors, in distribution,
    and differently from the float ones (ORT's QLinearConv is another kernel)."""
    float_model, quantized = models
    int8 = {k.name: k for k in estimate(quantized, "cpu").kernels if k.op == "Conv"}
    fp32 = {k.name: k for k in estimate(float_model, "cpu").kernels if k.op == "Conv"}
    assert int8 and all(k.in_distribution for k in int8.values())
    assert any(abs(int8[n].latency_ms - fp32[n].latency_ms) > 1e-6 for n in int8 if n in fp32)


def test_the_cpu_costs_the_dequantize_that_writes_a_graph_output(models):
    """ORT runs a DequantizeLinear that writes a graph output, and the QuantizeLinear before it after an op
    that writes no integers (the segmenter's final bilinear Resize runs in float, as ORT's quantize_static
    leaves it; the quantize pass keeps that Resize float): kernels on the cpu (`FusionRules.output_dequantize`),
    free on an int8 npu. After a Gemm (QGemm writes integers) only the DQ."""
    from hwnas.passes.quantize import quantize_model
    from hwnas.targets import get_target
    from hwnas.targets.measure import MeasureSettings, profile_nodes

    segmenter = build("segmenter", resolution=64)
    calibration = {"input": np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)}
    quantized = quantize_model(segmenter, calibration)  # ORT's quantizer as it is, every node it can
    ran = {t.op_type for t in profile_nodes(quantized, {}, MeasureSettings(warmup=0, repeats=1, min_seconds=0),
                                            get_target("cpu").providers)}
    assert {"QuantizeLinear", "DequantizeLinear", "Resize"} <= ran
    tail = [k for k in estimate(quantized, "cpu").kernels if k.kind != "free"][-3:]
    assert [(k.op, k.kind) for k in tail] == [("Resize", "resize"), ("QuantizeLinear", "elementwise"),
                                              ("DequantizeLinear", "elementwise")]
    assert all(k.latency_ms > 0 for k in tail)
    assert not [k for k in estimate(quantized, "npu-32x32").kernels
                if k.op in ("QuantizeLinear", "DequantizeLinear") and k.kind != "free"]
    classifier = [k for k in estimate(models[1], "cpu").kernels if k.kind != "free"][-2:]
    assert [k.op for k in classifier] == ["Gemm", "DequantizeLinear"]


def test_a_quantized_conv_outputs_transpose_to_nhwc_is_free_on_the_cpu():
    """ORT runs int8 convs channels-last: a detector head's conv → Q → DQ → Transpose(0,2,3,1) → Q runs no
    Transpose node (`FusionRules.int8_channels_last`); the npu keeps it a kernel."""
    from hwnas.targets import get_target
    from hwnas.targets.measure import MeasureSettings, profile_nodes

    detector = build("ibn-detector", resolution=128)
    calibration = {"input": np.random.default_rng(0).standard_normal((2, 3, 128, 128)).astype(np.float32)}
    quantized = api.run(detector, "fold-bn,quantize{preset=cpu}", calibration=calibration, allow_drift=1.0).model
    heads = [n.name for n in quantized.graph.node if n.op_type == "Transpose"]
    assert len(heads) >= 4
    ran = [t for t in profile_nodes(quantized, {}, MeasureSettings(warmup=0, repeats=1, min_seconds=0),
                                    get_target("cpu").providers) if t.op_type == "Transpose"]
    assert len(ran) <= 1  # the input's layout transpose only
    on_cpu = {k.name: k.kind for k in estimate(quantized, "cpu").kernels}
    assert all(on_cpu[h] == "free" for h in heads)
    assert all(k.kind != "free" for k in estimate(quantized, "npu-32x32").kernels if k.name in heads)


def test_an_interpolating_resize_between_q_and_dq_is_a_float_kernel_on_the_cpu():
    """ORT runs a linear Resize of a QDQ model in float (DQ → Resize → Q stay nodes) and a nearest one on the
    integers (the Q/DQ dropped): `FusionRules.float_linear_resize` makes only the first a float kernel."""
    from hwnas.passes.quantize import quantize_model
    from hwnas.targets import get_target
    from hwnas.targets.kernels import decompose
    from hwnas.targets.measure import MeasureSettings, profile_nodes

    rng = np.random.default_rng(0)
    cpu, npu = get_target("cpu").rules, get_target("npu-32x32").rules
    for mode, runs_float in (("linear", True), ("nearest", False)):
        blocks = (BlockConfig("conv", 16, 3), BlockConfig("upsample", 16, op=mode), BlockConfig("conv", 16, 1))
        model, _ = build_network(NetworkConfig(3, 32, blocks))
        q = quantize_model(model, {"x": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)})
        nodes = [t.op_type for t in profile_nodes(q, {}, MeasureSettings(warmup=0, repeats=1, min_seconds=0),
                                                  get_target("cpu").providers)]
        assert ("DequantizeLinear" in nodes[:nodes.index("Resize")]) == runs_float
        resize = lambda rules: next(k for k in decompose(q, {}, rules) if k.op == "Resize")  # noqa: E731
        assert resize(cpu).int8 is not runs_float and resize(npu).int8


@pytest.mark.parametrize("same_quantization", [True, False])
def test_a_quantize_after_a_reshape_of_the_same_quantization_is_free_on_the_cpu(same_quantization):
    """DQ → Reshape → Q → DQ to a graph output: ORT drops the DQ and Q around a Reshape of one scale and zero point
    and reshapes the integers (only the last DQ runs); with another scale the Q runs, and is a kernel."""
    from onnx import TensorProto, helper, numpy_helper

    from hwnas.targets import get_target
    from hwnas.targets.kernels import decompose
    from hwnas.targets.measure import MeasureSettings, profile_nodes

    constants = [numpy_helper.from_array(np.array(0.02, np.float32), "s"),
                 numpy_helper.from_array(np.array(128, np.uint8), "z"),
                 numpy_helper.from_array(np.array(0.02 if same_quantization else 0.03, np.float32), "s2"),
                 numpy_helper.from_array(np.array([1, -1, 8], np.int64), "shape")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_in"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_in"),
             helper.make_node("Reshape", ["xd", "shape"], ["r"], name="reshape"),
             helper.make_node("QuantizeLinear", ["r", "s2", "z"], ["rq"], name="q_out"),
             helper.make_node("DequantizeLinear", ["rq", "s2", "z"], ["y"], name="dq_out")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    cpu = get_target("cpu")
    ran = [t.op_type for t in profile_nodes(model, {}, MeasureSettings(warmup=0, repeats=1, min_seconds=0), cpu.providers)]
    assert ran.count("QuantizeLinear") == (1 if same_quantization else 2)  # the input's, and q_out where it runs
    kinds = {k.name: k.kind for k in decompose(model, {}, cpu.rules)}
    assert kinds["q_out"] == ("free" if same_quantization else "elementwise")
    assert kinds["dq_out"] == "elementwise"


def test_the_kernel_after_a_quantize_that_ort_runs_carries_its_elements():
    """ORT runs a free QuantizeLinear as a node of its own where nothing before it writes integers (the graph
    input's, a float HardSigmoid's output), and the in-context profile charges it to the next kernel: that kernel
    records the elements (`Kernel.quantize_elements`); a Q after a QLinearConv runs no node and counts nothing."""
    from hwnas.passes.quantize import quantize_model
    from hwnas.targets import get_target
    from hwnas.targets.kernels import decompose
    from hwnas.targets.measure import MeasureSettings, profile_nodes

    segmenter = build("segmenter", resolution=64)
    calibration = {"input": np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)}
    quantized = quantize_model(segmenter, calibration)
    cpu = get_target("cpu")
    ran = {t.name for t in profile_nodes(quantized, {}, MeasureSettings(warmup=0, repeats=1, min_seconds=0), cpu.providers)
           if t.op_type == "QuantizeLinear"}
    kernels = decompose(quantized, {}, cpu.rules)
    free_quantizes = {k.name: k for k in kernels if k.kind == "free" and k.op == "QuantizeLinear"}
    running = {name for name in free_quantizes if name in ran}
    assert running and len(running) < len(free_quantizes)  # some run (input, after float ops), most are fused away
    assert sum(k.quantize_elements for k in kernels) == sum(free_quantizes[name].output_elements for name in running)
    stem = next(k for k in kernels if k.op == "Conv")
    assert stem.quantize_elements == 3 * 64 * 64  # the input's
    after_hardsigmoid = [k for k in kernels if k.op == "Mul" and k.quantize_elements == k.output_elements]
    assert after_hardsigmoid

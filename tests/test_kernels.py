"""Kernel decomposition: fusion by rules, kinds, features, and full coverage of real models."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hwnas.errors import BadInputError
from hwnas.graph.flops import count_macs
from hwnas.graph.io import load_model
from hwnas.graph.shapes import tensor_shapes, with_static_inputs
from hwnas.targets.fusion_rules import FusionRules, builtin_rules
from hwnas.targets.kernels import GemmShape, decompose, node_keys

NPU = builtin_rules("npu")
RNG = np.random.default_rng(0)


# ---- tiny graphs (also used by test_npu.py and test_scalesim.py) -------------------------------


def make_model(nodes, inputs: dict, weights: dict, outputs: list[str] | None = None) -> onnx.ModelProto:
    """A float model from `nodes`; `inputs`: name → shape, `weights`: name → array (initializers)."""
    outputs = outputs or [nodes[-1].output[0]]
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), n) for n, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def conv(x: str, y: str, c_in: int, c_out: int, k: int = 1, stride: int = 1, groups: int = 1, pad: int | None = None):
    """A Conv node named `y` and its weight."""
    pad = k // 2 if pad is None else pad
    w = RNG.standard_normal((c_out, c_in // groups, k, k)).astype(np.float32)
    node = helper.make_node(
        "Conv", [x, f"{y}.w"], [y], name=y, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=groups
    )
    return node, {f"{y}.w": w}


def conv_model(hw: int, c_in: int, c_out: int, k: int = 1, stride: int = 1, groups: int = 1, pad: int | None = None):
    node, weights = conv("x", "y", c_in, c_out, k, stride, groups, pad)
    return make_model([node], {"x": (1, c_in, hw, hw)}, weights)


def bn(x: str, y: str, c: int):
    params = {f"{y}.{p}": np.full(c, v, np.float32) for p, v in (("s", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0))}
    return helper.make_node("BatchNormalization", [x, *params], [y], name=y), params


def only(kernels, **where):
    """The one kernel that is not free and matches `where`."""
    found = [k for k in kernels if k.kind != "free" and all(getattr(k, a) == v for a, v in where.items())]
    assert len(found) == 1, [(k.name, k.ops) for k in kernels]
    return found[0]


# ---- fusion ------------------------------------------------------------------------------------


def test_conv_bn_relu_is_one_kernel_with_conv_features():
    c, weights = conv("x", "c", 16, 24, k=3, stride=2)
    b, params = bn("c", "b", 24)
    relu = helper.make_node("Relu", ["b"], ["y"], name="r")
    model = make_model([c, b, relu], {"x": (1, 16, 20, 20)}, {**weights, **params})
    (kernel,) = decompose(model, {}, NPU)
    assert (kernel.name, kernel.kind, kernel.nodes) == ("c", "conv", ("c", "b", "r"))
    assert kernel.fused_ops == ("BatchNormalization", "Relu")
    assert (kernel.c_in, kernel.c_out, kernel.kernel_h, kernel.stride_w, kernel.groups) == (16, 24, 3, 2, 1)
    assert kernel.gemm == GemmShape(p=10 * 10, k=3 * 3 * 16, n=24)
    assert kernel.macs == count_macs(model)["c"] == 100 * 9 * 16 * 24
    assert kernel.input_elements == 16 * 20 * 20 and kernel.output_elements == 24 * 10 * 10
    assert kernel.weight_elements == 24 * 16 * 9 + 4 * 24
    assert kernel.bytes_moved(2) == 2 * (16 * 400 + 24 * 16 * 9 + 96 + 2400)


def test_intermediate_with_another_consumer_stops_the_fusion():
    c, weights = conv("x", "c", 8, 8)
    b, params = bn("c", "b", 8)
    skip = helper.make_node("Add", ["b", "c"], ["y"], name="add")  # the conv output is needed twice
    kernels = decompose(make_model([c, b, skip], {"x": (1, 8, 4, 4)}, {**weights, **params}), {}, NPU)
    assert [k.nodes for k in kernels] == [("c",), ("b",), ("add",)]
    assert [k.kind for k in kernels] == ["conv", "elementwise", "elementwise"]


def test_paddle_affine_and_decomposed_hard_swish_ride_in_the_conv():
    c, weights = conv("x", "c", 8, 16)
    consts = {"s": np.float32([0.9]), "t": np.float32([0.5]), "three": np.float32(3), "zero": np.float32(0),
              "six": np.float32(6), "cs": np.ones((1, 16, 1, 1), np.float32)}
    nodes = [
        c,
        helper.make_node("Mul", ["s", "c"], ["a1"], name="scale"),  # constant first, as Paddle writes it
        helper.make_node("Add", ["a1", "t"], ["a2"], name="shift"),
        helper.make_node("Add", ["a2", "three"], ["h1"], name="plus3"),
        helper.make_node("Clip", ["h1", "zero", "six"], ["h2"], name="relu6"),
        helper.make_node("Mul", ["a2", "h2"], ["h3"], name="gate"),
        helper.make_node("Div", ["h3", "six"], ["h4"], name="div6"),
        helper.make_node("Mul", ["h4", "cs"], ["y"], name="per_channel"),
    ]
    (kernel,) = decompose(make_model(nodes, {"x": (1, 8, 6, 6)}, {**weights, **consts}), {}, NPU)
    assert kernel.nodes == ("c", "scale", "shift", "plus3", "relu6", "gate", "div6", "per_channel")
    assert kernel.output_shapes == ((1, 16, 6, 6),)


def test_affine_after_the_activation_runs_alone_under_affine_folds():
    """A learnable affine block (PP-LCNetV3: a · act(x) + b): ORT folds affine ops into the conv only before the
    activation; after it they are nodes of their own, behind a layout copy (its optimized graph, ORT 1.32)."""
    c, weights = conv("x", "c", 8, 16)
    consts = {"s": np.float32([0.9]), "t": np.float32([0.5])}
    nodes = [
        c,
        helper.make_node("Mul", ["c", "s"], ["a1"], name="scale"),
        helper.make_node("Add", ["a1", "t"], ["a2"], name="shift"),
        helper.make_node("HardSwish", ["a2"], ["h"], name="act"),
        helper.make_node("Mul", ["s", "h"], ["a3"], name="scale2"),  # constant first, as Paddle writes it
        helper.make_node("Add", ["a3", "t"], ["y"], name="shift2"),
    ]
    model = make_model(nodes, {"x": (1, 8, 6, 6)}, {**weights, **consts})
    folding = FusionRules.from_dict({**NPU.to_dict(), "epilogue_ops": ["HardSwish"], "affine_folds": True})
    assert [k.nodes for k in decompose(model, {}, folding)] == [("c", "scale", "shift", "act"), ("scale2",), ("shift2",)]
    anywhere = FusionRules.from_dict({**folding.to_dict(), "affine_folds": False})
    assert [k.nodes for k in decompose(model, {}, anywhere)] == [("c", "scale", "shift", "act", "scale2", "shift2")]
    assert builtin_rules("cpu").affine_folds and not NPU.affine_folds


@pytest.mark.parametrize("op, gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_recurrent_layers_are_a_matrix_vector_product_per_step(op, gates):
    """Counted as an elementwise op of 0 MACs before (ddddocr's bidirectional LSTM: 0.37 ms estimated, ~7 ms run)."""
    steps, batch, inputs, hidden = 5, 2, 8, 6
    weights = {"w": np.ones((2, gates * hidden, inputs), np.float32), "r": np.ones((2, gates * hidden, hidden), np.float32)}
    node = helper.make_node(op, ["x", "w", "r"], ["y"], name="rnn", hidden_size=hidden, direction="bidirectional")
    (kernel,) = decompose(make_model([node], {"x": (steps, batch, inputs)}, weights), {}, NPU)
    assert kernel.kind == "gemm" and kernel.output_shapes == ((steps, 2, batch, hidden),)
    assert kernel.gemm == GemmShape(p=batch, k=inputs + hidden, n=gates * hidden, groups=steps * 2)
    assert kernel.macs == steps * 2 * batch * (inputs + hidden) * gates * hidden


def test_swish_is_fused_but_not_without_the_self_gate_rule():
    c, weights = conv("x", "c", 4, 4)
    nodes = [
        c, helper.make_node("Sigmoid", ["c"], ["s"], name="sig"), helper.make_node("Mul", ["s", "c"], ["y"], name="mul")
    ]
    model = make_model(nodes, {"x": (1, 4, 5, 5)}, weights)
    assert [k.nodes for k in decompose(model, {}, NPU)] == [("c", "sig", "mul")]
    no_gate = FusionRules.from_dict({**NPU.to_dict(), "self_gate": False})
    assert [k.nodes for k in decompose(model, {}, no_gate)] == [("c",), ("sig",), ("mul",)]


@pytest.mark.parametrize(
    "op, const_first, const_shape",
    [("Mul", False, (1, 4, 5, 5)), ("Add", False, (4, 1, 1, 1)), ("Div", True, (1,))],
    ids=["full-tensor-constant", "constant-not-on-channels", "c-divided-by-x"],
)
def test_what_is_not_affine_stays_a_kernel_of_its_own(op, const_first, const_shape):
    c, weights = conv("x", "c", 4, 4)
    inputs = ["k", "c"] if const_first else ["c", "k"]
    model = make_model([c, helper.make_node(op, inputs, ["y"], name="op")], {"x": (1, 4, 5, 5)},
                       {**weights, "k": np.ones(const_shape, np.float32)})
    kernels = decompose(model, {}, NPU)
    assert [k.nodes for k in kernels] == [("c",), ("op",)]
    assert kernels[1].kind == "elementwise" and kernels[1].weight_elements == math.prod(const_shape)


def test_residual_add_fuses_only_when_the_rules_say_so():
    c1, w1 = conv("x", "c1", 8, 8)
    c2, w2 = conv("r", "c2", 8, 8)
    relu = helper.make_node("Relu", ["c1"], ["r"], name="relu")
    nodes = [c1, relu, c2, helper.make_node("Add", ["c2", "x"], ["y"], name="add")]
    model = make_model(nodes, {"x": (1, 8, 4, 4)}, {**w1, **w2})
    kernels = decompose(model, {}, NPU)
    assert [k.nodes for k in kernels] == [("c1", "relu"), ("c2", "add")]
    assert kernels[1].residual and kernels[1].input_shapes == ((1, 8, 4, 4), (1, 8, 4, 4))
    plain = FusionRules.from_dict({**NPU.to_dict(), "residual_add": False})
    assert [k.nodes for k in decompose(model, {}, plain)] == [("c1", "relu"), ("c2",), ("add",)]


def test_an_activation_after_the_residual_add_rides_along_only_with_residual_epilogue():
    c1, w1 = conv("x", "c1", 8, 8)
    nodes = [c1, helper.make_node("Add", ["c1", "x"], ["s"], name="add"), helper.make_node("Relu", ["s"], ["y"], name="relu")]
    model = make_model(nodes, {"x": (1, 8, 4, 4)}, w1)
    assert [k.nodes for k in decompose(model, {}, NPU)] == [("c1", "add"), ("relu",)]
    rules = FusionRules.from_dict({**NPU.to_dict(), "residual_epilogue": True})
    kernels = decompose(model, {}, rules)
    assert [k.nodes for k in kernels] == [("c1", "add", "relu")] and kernels[0].residual
    assert rules.to_dict()["residual_epilogue"] and "residual_epilogue" not in NPU.to_dict()  # older files unchanged


def test_no_rules_means_one_node_per_kernel():
    c, weights = conv("x", "c", 4, 4)
    b, params = bn("c", "b", 4)
    relu = helper.make_node("Relu", ["b"], ["y"], name="r")
    model = make_model([c, b, relu], {"x": (1, 4, 3, 3)}, {**weights, **params})
    assert [(k.nodes, k.kind) for k in decompose(model, {}, FusionRules())] == [
        (("c",), "conv"), (("b",), "elementwise"), (("r",), "elementwise")
    ]


# ---- kinds and features ------------------------------------------------------------------------


def test_unknown_op_is_an_other_kernel_never_dropped():
    model = make_model([helper.make_node("Hardmax", ["x"], ["y"], name="hm", axis=1)], {"x": (2, 10)}, {})
    (kernel,) = decompose(model, {}, NPU)
    assert (kernel.kind, kernel.op, kernel.input_elements, kernel.output_elements) == ("other", "Hardmax", 20, 20)


def test_shape_arithmetic_and_reshapes_are_free():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "first"], ["n"], name="batch"),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], name="cat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"], name="reshape"),
        helper.make_node("Relu", ["flat"], ["y"], name="relu"),
    ]
    weights = {"first": np.array(0, np.int64), "axes": np.array([0], np.int64), "minus1": np.array([-1], np.int64)}
    model = make_model(nodes, {"x": (2, 3, 4, 4)}, weights)
    kernels = decompose(model, {}, NPU)
    assert {k.name: k.kind for k in kernels} == {
        "shape": "free", "batch": "free", "unsq": "free", "cat": "free", "reshape": "free", "relu": "elementwise"
    }


def test_depthwise_grouped_and_transposed_convs():
    dw, w1 = conv("x", "dw", 12, 12, k=3, groups=12)
    grouped, w2 = conv("dw", "g", 12, 24, k=1, groups=3)
    up = helper.make_node("ConvTranspose", ["g", "up.w"], ["y"], name="up", kernel_shape=[2, 2], strides=[2, 2])
    weights = {**w1, **w2, "up.w": np.ones((24, 8, 2, 2), np.float32)}
    model = make_model([dw, grouped, up], {"x": (1, 12, 7, 7)}, weights)
    by_name = {k.name: k for k in decompose(model, {}, NPU)}
    assert by_name["dw"].kind == "dwconv" and by_name["dw"].gemm == GemmShape(p=49, k=9, n=1, groups=12)
    assert by_name["g"].kind == "conv" and by_name["g"].gemm == GemmShape(p=49, k=4, n=8, groups=3)
    assert by_name["up"].kind == "deconv" and by_name["up"].gemm == GemmShape(p=14 * 14, k=24 * 4, n=8)
    macs = count_macs(model)
    assert all(by_name[name].macs == macs[name] for name in ("dw", "g", "up"))


def test_gemm_and_matmul_views():
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"], name="fc", transB=1),
        helper.make_node("Reshape", ["h", "shape"], ["q"], name="split_heads"),
        helper.make_node("MatMul", ["q", "kt"], ["y"], name="attn"),
    ]
    weights = {
        "w": np.ones((48, 20), np.float32),
        "shape": np.array([3, 4, 4, 4], np.int64),
        "kt": np.ones((3, 4, 4, 6), np.float32),
    }
    by_name = {k.name: k for k in decompose(make_model(nodes, {"x": (4, 20)}, weights), {}, NPU)}
    assert by_name["fc"].gemm == GemmShape(p=4, k=20, n=48) and by_name["fc"].macs == 4 * 20 * 48
    assert by_name["attn"].gemm == GemmShape(p=4, k=4, n=6, groups=12) and by_name["attn"].macs == 12 * 4 * 6 * 4


@pytest.mark.parametrize("attrs, expected", [
    ({}, "nearest:half_pixel:round_prefer_floor"),
    (dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"), "nearest:asymmetric:floor"),
    (dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"), "linear:pytorch_half_pixel"),
    (dict(mode="cubic"), "cubic:half_pixel"),
])
def test_a_resize_kernel_records_how_outputs_find_their_inputs(attrs, expected):
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", **attrs)
    model = make_model([node], {"x": (1, 8, 10, 10)}, {"scales": np.array([1, 1, 2, 2], np.float32)})
    kernel = only(decompose(model, {"x": (1, 8, 10, 10)}, NPU), op="Resize")
    assert kernel.interpolation == expected and kernel.output_elements == 8 * 20 * 20
    assert only(decompose(conv_model(8, 4, 4), {"x": (1, 4, 8, 8)}, NPU), op="Conv").interpolation == ""


def test_pool_window_counts_what_each_output_reads():
    nodes = [
        helper.make_node("MaxPool", ["x"], ["m"], name="max", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["m"], ["y"], name="gap"),
    ]
    by_name = {k.name: k for k in decompose(make_model(nodes, {"x": (1, 8, 16, 16)}, {}), {}, NPU)}
    assert (by_name["max"].window, by_name["max"].stride_h, by_name["max"].output_elements) == (9, 2, 8 * 8 * 8)
    assert (by_name["gap"].window, by_name["gap"].output_elements) == (64, 8)


def test_unnamed_and_duplicate_nodes_get_unique_keys():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"], name="r"),
             helper.make_node("Relu", ["b"], ["y"], name="r")]
    assert node_keys(nodes) == ("Relu#0", "r", "r#2")


# ---- fusion rules as data ----------------------------------------------------------------------


def test_fusion_rules_round_trip_through_json(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"anchors": ["Conv"], "epilogue_ops": ["Relu"], "residual_add": True}))
    rules = FusionRules.from_json(path)
    assert rules == FusionRules(anchors=frozenset({"Conv"}), epilogue_ops=frozenset({"Relu"}), residual_add=True)
    assert FusionRules.from_dict(rules.to_dict()) == rules
    assert "Conv" in NPU.anchors and NPU.affine and NPU.self_gate and NPU.residual_add


@pytest.mark.parametrize(
    "data, message",
    [
        ({"anchor": ["Conv"]}, "unknown keys"),
        ({"anchors": "Conv"}, "list of op type names"),
        ({"affine": "yes"}, "true or false"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_fusion_rules_are_bad_input(data, message):
    with pytest.raises(BadInputError, match=message):
        FusionRules.from_dict(data)


def test_bad_fusion_rules_files_are_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="cannot read"):
        FusionRules.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(BadInputError, match="not valid JSON"):
        FusionRules.from_json(tmp_path / "bad.json")
    with pytest.raises(BadInputError, match="no built-in fusion rules"):
        builtin_rules("tpu")


# ---- real models -------------------------------------------------------------------------------


def test_real_model_nodes_are_each_in_exactly_one_kernel(real_model):
    path, shapes = real_model
    model = load_model(path)
    kernels = decompose(model, shapes, NPU)
    covered = [name for k in kernels for name in k.nodes]
    assert sorted(covered) == sorted(node_keys(model.graph.node))
    # MACs agree with the flops counter; fusion happened; no kernel reads a tensor produced later.
    assert sum(k.macs for k in kernels) == sum(count_macs(_with_matmul_shapes(model, shapes)).values()) > 0
    assert any(len(k.nodes) > 2 for k in kernels)
    _assert_execution_order(model, kernels)


def _with_matmul_shapes(model: onnx.ModelProto, shapes) -> onnx.ModelProto:
    """Static inputs plus declared MatMul/Gemm shapes: ONNX inference cannot size Paddle's run-time Reshape."""
    static = with_static_inputs(model, shapes)
    known = tensor_shapes(model, shapes)
    for node in static.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            for name in (node.input[0], node.output[0]):
                static.graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, known[name]))
    return static


def _assert_execution_order(model: onnx.ModelProto, kernels) -> None:
    keys = node_keys(model.graph.node)
    outputs_of = {key: [o for o in node.output if o] for key, node in zip(keys, model.graph.node)}
    inputs_of = {key: [i for i in node.input if i] for key, node in zip(keys, model.graph.node)}
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    for kernel in kernels:
        inside = {o for key in kernel.nodes for o in outputs_of[key]}
        needed = {i for key in kernel.nodes for i in inputs_of[key]} - inside
        assert needed <= available, (kernel.name, needed - available)
        available |= inside

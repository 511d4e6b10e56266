"""Control flow is compute: convs inside If branches and Loop bodies count in latency, params and memory."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hwnas.estimator.estimate import estimate
from hwnas.graph.control_flow import flatten_control_flow
from hwnas.graph.session import make_session

SHAPE = [1, 64, 56, 56]


def _conv_graph(name: str, x: str, seed: int) -> onnx.GraphProto:
    """A branch: a 3x3 conv 64->64 reading the outer tensor `x`, then Relu."""
    w = np.random.default_rng(seed).standard_normal((64, 64, 3, 3)).astype(np.float32) * 0.05
    nodes = [helper.make_node("Conv", [x, f"{name}_w"], [f"{name}_c"], name=f"{name}_conv", pads=[1] * 4),
             helper.make_node("Relu", [f"{name}_c"], [f"{name}_y"], name=f"{name}_relu")]
    out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, SHAPE)
    return helper.make_graph(nodes, name, [], [out], [numpy_helper.from_array(w, f"{name}_w")])


def _model(nodes, inputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)],
                              list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)


def inlined() -> onnx.ModelProto:
    branch = _conv_graph("then", "x", 0)
    return _model(list(branch.node) + [helper.make_node("Identity", ["then_y"], ["y"])], [X], branch.initializer)


def with_if(condition: bool | None) -> onnx.ModelProto:
    """The conv in both branches of an If (the else branch cheaper: a 1-wide conv would not type-check,
    so the same conv); condition a constant, or a graph input when None."""
    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=_conv_graph("then", "x", 0),
                            else_branch=_conv_graph("else", "x", 1))
    if condition is None:
        return _model([node], [X, helper.make_tensor_value_info("cond", TensorProto.BOOL, [])])
    return _model([node], [X], [numpy_helper.from_array(np.array(condition), "cond")])


def with_loop(trips: int) -> onnx.ModelProto:
    """A Loop of `trips` iterations whose body applies the conv to the carried tensor."""
    body_conv = _conv_graph("body", "v_in", 0)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"])] + list(body_conv.node),
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("body_y", TensorProto.FLOAT, SHAPE)],
        body_conv.initializer,
    )
    node = helper.make_node("Loop", ["M", "", "x"], ["y"], name="loop", body=body)
    return _model([node], [X], [numpy_helper.from_array(np.array(trips, np.int64), "M")])


@pytest.mark.parametrize("target", ["npu-32x32", "cpu"])
@pytest.mark.parametrize("condition", [True, False, None])
def test_convs_inside_if_branches_cost_what_the_inlined_branch_costs(target, condition):
    reference = estimate(inlined(), target)
    result = estimate(with_if(condition), target)
    assert result.latency_ms == pytest.approx(reference.latency_ms, rel=0.10)
    assert result.params_bytes == pytest.approx(reference.params_bytes, rel=0.10)
    assert result.peak_activation_bytes == pytest.approx(reference.peak_activation_bytes, rel=0.10)
    unknown = [w for w in result.warnings if "not known statically" in w]
    assert bool(unknown) == (condition is None), result.warnings


def test_a_constant_condition_takes_its_branch():
    flat = flatten_control_flow(with_if(False), {"x": tuple(SHAPE)})
    assert [n.name for n in flat.model.graph.node if n.op_type == "Conv"] == ["branch/else_conv"]
    assert not flat.warnings


def test_a_loop_counts_its_body_once_per_iteration():
    once = estimate(inlined(), "npu-32x32").latency_ms
    assert estimate(with_loop(3), "npu-32x32").latency_ms == pytest.approx(3 * once, rel=0.10)
    assert estimate(with_loop(3), "npu-32x32").params_bytes == pytest.approx(estimate(inlined(), "npu-32x32").params_bytes, rel=0.1)


def test_the_flattened_model_computes_what_the_taken_branch_computes():
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    model = with_if(True)
    flat = flatten_control_flow(model, {"x": tuple(SHAPE)}).model
    onnx.checker.check_model(flat)
    want = make_session(model).run(None, {"x": x})[0]
    got = make_session(flat).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

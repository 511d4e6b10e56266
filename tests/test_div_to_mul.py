"""div-to-mul: Div by a float constant -> Mul by its reciprocal, exact; every other Div skipped with a reason."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from hwnas import api
from tests.graphs import make_model

X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])
T = helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4, 5, 5])


def test_div_by_a_float_constant_becomes_a_mul_the_rest_are_skipped_with_reasons():
    nodes = [
        helper.make_node("Div", ["x", "six"], ["a"], name="by_six"),
        helper.make_node("Div", ["a", "t"], ["y"], name="by_input"),
        helper.make_node("Div", ["x", "zero"], ["z"], name="by_zero"),
        helper.make_node("Div", ["n", "two"], ["m"], name="integer"),
    ]
    model = make_model(
        nodes, [X, T, helper.make_tensor_value_info("n", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, 4, 5, 5]) for o in ("y", "z")]
        + [helper.make_tensor_value_info("m", TensorProto.INT64, [3])],
        [numpy_helper.from_array(np.float32(6.0), "six"), numpy_helper.from_array(np.float32(0.0), "zero"),
         numpy_helper.from_array(np.int64(2), "two")])
    result = api.run(model, "div-to-mul", verify=False)
    ops = {n.name: n.op_type for n in result.model.graph.node}
    assert ops == {"by_six": "Mul", "by_input": "Div", "by_zero": "Div", "integer": "Div"}
    reasons = " | ".join(s.reason for s in result.records[0].sites if s.reason)
    assert "computed at run time" in reasons and "zero or non-finite" in reasons and "int64" in reasons
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    mul = next(n for n in result.model.graph.node if n.name == "by_six")
    assert weights[mul.input[1]].dtype == np.float32 and np.isclose(weights[mul.input[1]], 1 / 6)


def test_the_rewrite_is_verified_equivalent():
    per_channel = np.array([0.5, 3.0, -7.0, 1e-3], np.float32).reshape(1, 4, 1, 1)
    model = make_model([helper.make_node("Div", ["x", "c"], ["y"], name="div")], [X],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])],
                       [numpy_helper.from_array(per_channel, "c")])
    result = api.run(model, "div-to-mul")
    assert result.verified and result.verification.equivalent
    assert [n.op_type for n in result.model.graph.node] == ["Mul"]

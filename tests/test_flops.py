"""MAC and parameter counts on tiny hand-checked graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hwnas.graph.flops import count_macs, count_params


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=[numpy_helper.from_array(a, n) for n, a in initializers],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _weight(*shape: int) -> np.ndarray:
    return np.ones(shape, np.float32)


def _conv_macs(x_shape, w_shape, **attrs) -> int:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    return count_macs(_model([node], [("x", x_shape)], ["y"], [("w", _weight(*w_shape))]))["conv"]


def test_conv_3x3() -> None:
    # 16 outputs × 8×8 positions × 3 input channels × 9 taps
    assert _conv_macs([1, 3, 8, 8], [16, 3, 3, 3], pads=[1, 1, 1, 1]) == 16 * 64 * 3 * 9 == 27_648


def test_depthwise_conv() -> None:
    # stride 2 with pad 1 maps 10×10 to 5×5; each output reads one channel × 9 taps
    macs = _conv_macs([1, 8, 10, 10], [8, 1, 3, 3], pads=[1, 1, 1, 1], strides=[2, 2], group=8)
    assert macs == 8 * 25 * 9 == 1_800


def test_grouped_conv() -> None:
    # two groups of 4 input channels, 1×1 kernel
    assert _conv_macs([1, 8, 6, 6], [12, 4, 1, 1], group=2) == 12 * 36 * 4 == 1_728


def test_conv_transpose() -> None:
    # every input element is scattered onto C_out/group × k_h × k_w outputs
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])
    model = _model([node], [("x", [1, 4, 5, 5])], ["y"], [("w", _weight(4, 6, 3, 3))])
    assert count_macs(model) == {"up": 4 * 25 * 6 * 9}


@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm(trans_a: int) -> None:
    a_shape = [5, 2] if trans_a else [2, 5]
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], name="fc", transA=trans_a, transB=1)
    model = _model([node], [("a", a_shape)], ["y"], [("b", _weight(3, 5)), ("c", _weight(3))])
    assert count_macs(model) == {"fc": 2 * 3 * 5}


def test_batched_matmul() -> None:
    node = helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")
    model = _model([node], [("a", [2, 4, 6])], ["y"], [("b", _weight(6, 7))])
    assert count_macs(model) == {"mm": 2 * 4 * 7 * 6}


def test_other_ops_and_unnamed_nodes() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w"], ["y1"]),
        helper.make_node("Conv", ["y1", "w"], ["y2"]),
    ]
    model = _model(nodes, [("x", [1, 2, 3, 3])], ["y2"], [("w", _weight(2, 2, 1, 1))])
    assert count_macs(model) == {"Conv#1": 36, "Conv#2": 36}


def test_dynamic_shape_raises() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    model = _model([node], [("x", ["N", 3, 8, 8])], ["y"], [("w", _weight(4, 3, 1, 1))])
    with pytest.raises(ValueError, match="conv"):
        count_macs(model)


def test_count_params() -> None:
    shared = _weight(4, 3, 1, 1)  # used by two convs: counted once
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"]),
        helper.make_node("Conv", ["x", "w"], ["b"]),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(_weight(2, 5))),
        helper.make_node("Constant", [], ["s"], value_float=1.0),
        helper.make_node("Reshape", ["a", "shape"], ["y"]),
    ]
    initializers = [
        ("w", shared),
        ("shape", np.array([1, -1], np.int64)),  # an integer tensor is no parameter
        ("unused", _weight(100)),  # used by no node
    ]
    model = _model(nodes, [("x", [1, 3, 2, 2])], ["y", "b", "k", "s"], initializers)
    assert count_params(model) == 12 + 10 + 1

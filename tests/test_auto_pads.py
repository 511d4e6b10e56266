"""`hwnas.graph.shapes.auto_pads`: the padding ONNX's auto_pad gives a conv, as ONNX Runtime applies it."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from hwnas.graph.session import make_session, run
from hwnas.graph.shapes import auto_pads


def _conv(attrs: dict, weight: np.ndarray):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 7, 9])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(weight.shape[2:]), **attrs)
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("kernel, stride, dilation", [(4, 2, 1), (3, 1, 1), (2, 3, 1), (5, 2, 1)])  # ORT: no dilation with SAME
def test_explicit_pads_from_auto_pads_give_what_ort_computes_for_auto_pad(mode, kernel, stride, dilation):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3, 2, kernel, kernel)).astype(np.float32)
    x = {"x": rng.standard_normal((1, 2, 7, 9)).astype(np.float32)}
    common = {"strides": [stride] * 2, "dilations": [dilation] * 2}
    (automatic,) = run(make_session(_conv({**common, "auto_pad": mode}, weight), optimized=False), x)
    (top, bottom), (left, right) = (auto_pads(mode, size, kernel, stride, dilation) for size in (7, 9))
    (explicit,) = run(make_session(_conv({**common, "pads": [top, left, bottom, right]}, weight), optimized=False), x)
    assert explicit.shape == automatic.shape and np.allclose(explicit, automatic, atol=1e-5)
    assert auto_pads(mode.encode(), 7, kernel, stride, dilation) == (top, bottom)  # as ONNX attributes store it


def test_notset_leaves_the_pads_attribute_in_charge():
    assert auto_pads("NOTSET", 7, 3) is None and auto_pads(b"NOTSET", 7, 3) is None

"""Kernels outside the profiled range say so: `in_distribution` per kernel and one warning naming them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hwnas.estimator.estimate import estimate
from hwnas.models import build


def _model(nodes, x_shape, y_shape, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def classifier(features: int, classes: int) -> onnx.ModelProto:
    """A pooled feature map into a Gemm of `features` -> `classes`."""
    w = numpy_helper.from_array(np.zeros((classes, features), np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w"], ["y"], name="fc", transB=1)]
    return _model(nodes, [1, features, 7, 7], [1, classes], [w])


@pytest.mark.parametrize("target", ["cpu", "npu-32x32"])
def test_an_oversized_gemm_is_flagged_and_named(target):
    ordinary = estimate(classifier(256, 100), target)
    assert all(k.in_distribution for k in ordinary.kernels)
    assert not any("outside the ops, precisions and sizes" in w for w in ordinary.warnings)
    big = estimate(classifier(2048, 20000), target)
    flags = {k.name: k.in_distribution for k in big.kernels if k.kind != "free"}
    assert flags["fc"] is False
    assert [w for w in big.warnings if "outside the ops, precisions and sizes" in w and "fc" in w]
    assert json.loads(json.dumps(big.to_dict()))["kernels"][-1]["in_distribution"] is False


def test_an_op_never_profiled_is_not_in_distribution():
    model = _model([helper.make_node("Erf", ["x"], ["y"], name="erf")], [1, 64, 56, 56], [1, 64, 56, 56])
    kernel = next(k for k in estimate(model, "cpu").kernels if k.name == "erf")
    assert kernel.fallback or kernel.in_distribution is False


def test_the_zoo_segmenter_lies_inside_the_cpu_profile():
    assert all(k.in_distribution for k in estimate(build("segmenter"), "cpu").kernels)

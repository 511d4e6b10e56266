"""fold-bn: positive cases, the negative cases of issue 2, and every real model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from hwnas import api
from hwnas.errors import CheckFailedError
from tests.graphs import bn_params, const, conv_bn_model, make_model, tensor


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_conv_bn_folds_and_verifies():
    result = api.run(conv_bn_model(), "fold-bn")
    assert ops(result.model) == ["Conv"]
    assert result.verification.equivalent
    assert result.verification.max_abs < 1e-4
    assert [o.name for o in result.model.graph.output] == ["y"]


def test_bn_whose_conv_output_has_second_consumer_is_skipped():
    result = api.run(conv_bn_model(extra_consumer=True), "fold-bn")
    record = result.records[0]
    assert not record.modified
    assert "2 consumers" in record.skipped[0].reason
    assert "BatchNormalization" in ops(result.model)
    assert result.verification.equivalent


def test_conv_output_that_is_a_graph_output_is_skipped():
    result = api.run(conv_bn_model(conv_output_is_graph_output=True), "fold-bn")
    assert "graph output" in result.records[0].skipped[0].reason
    assert result.verification.equivalent


def test_bn_output_that_is_a_graph_output_keeps_its_name():
    result = api.run(conv_bn_model(), "fold-bn")
    assert result.model.graph.node[-1].output[0] == "y"


def test_conv_weight_shared_by_two_convs_is_not_clobbered():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["t", "bn_gamma", "bn_beta", "bn_mean", "bn_var"], ["u"], name="bn"),
        helper.make_node("Conv", ["u", "w"], ["y"], name="conv_b", pads=[1, 1, 1, 1]),
    ]
    model = make_model(nodes, [tensor("x", [1, 4, 8, 8])], [tensor("y", [1, 4, 8, 8])], [const("w", w), *bn_params("bn", 4, rng)])
    result = api.run(model, "fold-bn")
    assert "shared with another node" in result.records[0].skipped[0].reason
    assert result.verification.equivalent


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn_folds(trans_b):
    rng = np.random.default_rng(2)
    b = rng.normal(0, 0.3, (5, 6) if trans_b else (6, 5)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "b", "c"], ["t"], name="gemm", transB=trans_b, alpha=0.5, beta=2.0),
        helper.make_node("BatchNormalization", ["t", "bn_gamma", "bn_beta", "bn_mean", "bn_var"], ["y"], name="bn"),
    ]
    inits = [const("b", b), const("c", rng.normal(0, 1, 5).astype(np.float32)), *bn_params("bn", 5, rng)]
    model = make_model(nodes, [tensor("x", [2, 6])], [tensor("y", [2, 5])], inits)
    result = api.run(model, "fold-bn")
    assert ops(result.model) == ["Gemm"]
    assert result.verification.equivalent


def test_conv_transpose_bn_folds():
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["t"], name="deconv", strides=[2, 2]),
        helper.make_node("BatchNormalization", ["t", "bn_gamma", "bn_beta", "bn_mean", "bn_var"], ["y"], name="bn"),
    ]
    inits = [const("w", rng.normal(0, 0.3, (4, 6, 2, 2)).astype(np.float32)), *bn_params("bn", 6, rng)]
    model = make_model(nodes, [tensor("x", [1, 4, 5, 5])], [tensor("y", [1, 6, 10, 10])], inits)
    result = api.run(model, "fold-bn")
    assert ops(result.model) == ["ConvTranspose"]
    assert result.verification.equivalent


def test_a_wrong_fold_is_caught_and_named(monkeypatch):
    """The verifier is not a rubber stamp: a broken fold fails with the pass named."""
    import hwnas.passes.fold_bn as fold_bn

    real = fold_bn.scale_and_shift
    monkeypatch.setattr(fold_bn, "scale_and_shift", lambda g, n, s, t: real(g, n, s * 1.01, t))
    with pytest.raises(CheckFailedError, match="after pass 'fold-bn'"):
        api.run(conv_bn_model(), "fold-bn")


def test_real_models_fold_bn(real_model):
    path, shapes = real_model
    result = api.run(str(path), "fold-bn", input_shapes=shapes)
    assert result.verification.equivalent
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    left = [n for n in result.model.graph.node if n.op_type == "BatchNormalization" and producers.get(n.input[0]) == "Conv"]
    assert left == []


@pytest.mark.parametrize("name", ["mobilenetv2", "ibn-detector", "segmenter"])
def test_zoo_models_fold_bn(name):
    from hwnas.models import build

    original = build(name)
    result = api.run(original, "fold-bn")
    assert result.verification.equivalent
    assert "BatchNormalization" not in ops(result.model)
    assert result.records[0].stats["folded"] == sum(n.op_type == "BatchNormalization" for n in original.graph.node)

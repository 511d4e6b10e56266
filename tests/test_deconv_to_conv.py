"""deconv-to-conv: a ConvTranspose with kernel = stride -> 1x1 Conv + DepthToSpace, exact; the rest skipped with reasons."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from hwnas import api
from hwnas.estimator.defaults import estimator_for
from hwnas.targets import get_target
from tests.graphs import make_model


def _head(kernel: int = 2, stride: int = 2, pads=(0, 0, 0, 0)):
    """PP-OCR det's head shape: ConvT(8→6)+BN+Relu, ConvT(6→1)+Sigmoid, and a 3×3 stride-2 ConvT beside it."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w0", "b0"], ["t0"], name="up0", kernel_shape=[kernel] * 2,
                         strides=[stride] * 2, pads=list(pads)),
        helper.make_node("BatchNormalization", ["t0", "g", "beta", "mean", "var"], ["n0"], name="bn"),
        helper.make_node("Relu", ["n0"], ["r0"], name="relu"),
        helper.make_node("ConvTranspose", ["r0", "w1", "b1"], ["t1"], name="up1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Sigmoid", ["t1"], ["y"], name="sigmoid"),
        helper.make_node("ConvTranspose", ["x", "w2"], ["z"], name="overlap", kernel_shape=[3, 3], strides=[2, 2]),
    ]
    init = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in {
        "w0": rng.normal(size=(8, 6, kernel, kernel)), "b0": rng.normal(size=6), "g": rng.uniform(0.5, 2, 6),
        "beta": rng.normal(size=6), "mean": rng.normal(size=6), "var": rng.uniform(0.5, 2, 6),
        "w1": rng.normal(size=(6, 1, 2, 2)), "b1": rng.normal(size=1), "w2": rng.normal(size=(8, 3, 3, 3))}.items()]
    side = (4 - 1) * stride + kernel - pads[0] - pads[2]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2 * side, 2 * side]),
                       helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 9, 9])], init)


def test_kernel_equal_to_stride_becomes_a_1x1_conv_and_depth_to_space_verified_equivalent():
    model = _head()
    result = api.run(model, "deconv-to-conv")
    assert result.verified and result.verification.equivalent
    ops = [n.op_type for n in result.model.graph.node]
    # the BN and both activations moved ahead of their DepthToSpace (they stay in the conv's epilogue)
    assert ops.count("ConvTranspose") == 1 and ops.count("DepthToSpace") == 2
    for d2s in (n for n in result.model.graph.node if n.op_type == "DepthToSpace"):
        producer = next(n for n in result.model.graph.node if d2s.input[0] in n.output)
        assert producer.op_type in ("Relu", "Sigmoid")
    record = result.records[0]
    assert record.stats["rewritten"] == 2 and record.stats["ops_moved_ahead"] == 3
    reasons = [s.reason for s in record.sites if s.reason]
    assert len(reasons) == 1 and "differs from stride" in reasons[0]
    # on the npu (a transposed conv runs over its zero-stuffed input) the rewrite is estimated faster
    npu, shapes = estimator_for(get_target("npu-32x32")), {"x": (1, 8, 4, 4)}
    assert npu.estimate(result.model, shapes).latency_ms < npu.estimate(model, shapes).latency_ms


def test_padded_transposed_conv_is_skipped_with_its_reason():
    result = api.run(_head(kernel=2, stride=2, pads=(1, 1, 1, 1)), "deconv-to-conv")
    reasons = {s.nodes[0]: s.reason for s in result.records[0].sites}
    assert "padded" in reasons["up0"] and reasons["up1"] is None


def test_the_search_offers_it_and_seeds_with_the_exact_choices_estimated_fastest_alone():
    from hwnas.graph.gsgraph import to_graph, to_model
    from hwnas.passes.base import PassContext
    from hwnas.search.optimize import expert_seeds
    from hwnas.search.space import SpaceOptions, build_space

    model, shapes = _head(), {"x": (1, 8, 4, 4)}
    npu = estimator_for(get_target("npu-32x32"))
    ctx = PassContext(template=model, input_shapes=shapes)

    def latency(graph):
        return npu.estimate(to_model(graph.copy(), model), shapes).latency_ms

    space = build_space(to_graph(model), ctx, SpaceOptions(32), latency=latency)
    deconv = {d.key: d.choices for d in space.decisions if d.kind == "deconv"}
    assert deconv == {"deconv:up0": ("keep", "conv"), "deconv:up1": ("keep", "conv")}
    assert space.compile({"deconv:up1": "conv"}) == "deconv-to-conv{sites=@up1}"
    # each rewrite is estimated faster alone on the npu: both are in the fastest seed
    assert {k: v for k, v in space.fastest.items() if k.startswith("deconv")} == {"deconv:up0": "conv", "deconv:up1": "conv"}
    assert {**space.baseline(), **space.fastest} in expert_seeds(space)
    # without an estimate there is no such seed
    assert build_space(to_graph(model), ctx, SpaceOptions(32)).fastest == {}

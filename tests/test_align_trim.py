"""align-channels{mode=trim}: groups trimmed down to multiples of N (never to zero), the least useful
channels removed, consumers refitted, drift budgets, and every op kind the channel analysis passes."""

from __future__ import annotations

import onnx
import pytest

from hwnas import api
from hwnas.errors import BadInputError, CheckFailedError
from hwnas.passes import Exactness, get_pass
from hwnas.passes.pipeline import parse_pipeline
from hwnas.verify.calib_data import calibration_sets
from hwnas.verify.fidelity import measure_fidelity
from tests.conftest import REAL_MODELS, real_model_path
from tests.test_align_channels import CASES, misaligned
from tests.test_channels import Net, analyze
from tests.test_scale_depth import calibration, kept_rows, pruned, weight

TRIM8 = "align-channels{multiple=8,mode=trim}"


def test_counts_round_down_to_multiples():
    net = Net()
    a = net.act(net.bn(net.conv("x", 30, name="conv_a")), "Relu")
    b = net.act(net.conv(a, 13, k=3, name="conv_b"), "Relu")
    c = net.act(net.conv(b, 16, name="conv_c"), "Relu")
    result = pruned(net.model(net.conv(c, 3, name="head")), TRIM8)
    out = result.model
    assert [weight(out, n).shape[0] for n in ("conv_a", "conv_b", "conv_c")] == [24, 8, 16]
    assert weight(out, "conv_b").shape[1] == 24 and weight(out, "head").shape[1] == 16
    assert result.records[0].stats["channels_removed"] == 6 + 5
    assert misaligned(out, 8) == []


def test_a_group_smaller_than_the_multiple_is_a_site_with_its_reason():
    net = Net()
    model = net.model(net.conv(net.act(net.conv("x", 5, name="small"), "Relu"), 3))
    record = api.run(model, TRIM8, dry_run=True).records[0]
    reasons = [s.reason for s in record.sites if s.data.group.producers == ("small",)]
    assert reasons == ["has 5 channels, fewer than 8: trimming would remove them all"]


def test_aligned_groups_are_not_sites():
    net = Net()
    model = net.model(net.conv(net.act(net.conv("x", 16), "Relu"), 8))
    assert [s.reason for s in api.run(model, TRIM8, dry_run=True).records[0].sites] == ["holds graph input x"]


def test_the_least_useful_channels_go():
    net = Net()
    model = net.model(net.conv(net.act(net.conv("x", 10, bias=False, name="conv_a"), "Relu"), 3))
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[[2, 7]] = 0  # these channels are always 0: nothing reads anything from them
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, model.graph.initializer[0].name))
    out = pruned(model, TRIM8).model
    assert kept_rows(weight(out, "conv_a"), w) == [0, 1, 3, 4, 5, 6, 8, 9]


def test_concat_segments_are_trimmed_in_the_middle():
    net = Net()
    c = net.node("Concat", [net.conv("x", 10, name="conv_a"), net.conv("x", 9, k=3, name="conv_b")], 19, axis=1)
    model = net.model(net.conv(net.act(net.bn(c, name="bn"), "Relu"), 3, name="conv_c"))
    out = pruned(model, TRIM8).model
    assert weight(out, "conv_a").shape[0] == weight(out, "conv_b").shape[0] == 8
    assert weight(out, "conv_c").shape == (3, 16, 1, 1) and weight(out, "bn", 1).shape == (16,)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_op_kind_trims_to_a_valid_model(case):
    """The pad tests' models: every plain group ends on a multiple of 4 unless it was skipped for a reason
    (too few channels, a consumer that cannot be refitted); concats follow their segments."""
    net = Net()
    model = net.model(CASES[case](net))
    result = pruned(model, "align-channels{multiple=4,mode=trim}")
    record = result.records[0]
    assert record.applied == [s for s in record.sites if s.applicable]
    skipped = [s for s in record.skipped if not s.reason.startswith("holds graph")]
    assert all("fewer than 4" in s.reason or "cannot be refitted" in s.reason for s in skipped), skipped
    groups = [g for g in analyze(result.model) if not g.blocked and not g.concatenated]
    assert sorted(g.channels for g in groups if g.channels % 4) == sorted(s.data.group.channels for s in skipped)


def test_drift_budgets_pass_and_fail():
    net = Net(channels=4, size=8)
    h = net.act(net.conv(net.act(net.conv("x", 15, k=3), "Relu"), 15, k=3), "Relu")
    model = net.model(net.conv(h, 4))
    data = calibration(model, 8)
    assert api.run(model, TRIM8, calibration=data, allow_drift=0.5).verification.cosine < 1 - 1e-6
    with pytest.raises(CheckFailedError, match="cosine"):
        api.run(model, TRIM8, calibration=data, allow_drift=1e-6)


def test_exactness_follows_the_mode():
    cls = get_pass("align-channels")
    assert cls(mode="pad").exactness is Exactness.EXACT
    assert cls(mode="trim").exactness is Exactness.RECONSTRUCTED
    assert str(parse_pipeline(TRIM8)) == TRIM8


def test_real_classifier_trims_to_multiples_of_8_within_drift():
    name = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    path = real_model_path(name)
    pytest.importorskip("PIL")
    data = calibration_sets(name, fit_samples=16, held_out_samples=24)
    shapes = REAL_MODELS[name]
    model = api.run(str(path), "fold-bn,fold-constants", input_shapes=shapes).model
    result = api.run(model, TRIM8, input_shapes=shapes, calibration=data.fit.inputs, allow_drift=0.2)
    assert len(result.records[0].applied) == 7  # 10, 12, 22 ×2, 26, 50 ×2 channels; the SE group of 2 is skipped
    left = [g.channels for g in analyze(result.model, shapes) if not g.blocked and (g.producers or g.consumers)]
    assert all(c % 8 == 0 or c < 8 for c in left), left
    assert measure_fidelity(model, result.model, data.held_out.inputs).cosine > 0.8


def _net_with_shared_weight() -> onnx.ModelProto:
    """conv_c reuses conv_b's weight and bias (an exporter's tied weights)."""
    net = Net(size=8)
    a = net.act(net.conv("x", 10, name="conv_a"), "Relu")
    b = net.act(net.conv(a, 10, name="conv_b"), "Relu")
    c = net.act(net.node("Conv", [b, "conv_b_w", "conv_b_b"], 10, "conv_c", kernel_shape=[1, 1]), "Relu")
    return net.model(net.conv(c, 6, name="head"))


@pytest.mark.parametrize("pipeline", ["align-channels{multiple=8,mode=pad}", TRIM8, "scale-depth{multiplier=0.5}"])
def test_shared_weights_stay_consistent(pipeline):
    model = _net_with_shared_weight()
    exact = "pad" in pipeline
    result = api.run(model, pipeline, allow_drift=None if exact else 0.5, calibration=None if exact else calibration(model))
    assert result.records[0].applied and result.verified
    if exact:
        assert result.verification.equivalent


def test_weight_fed_at_run_time_blocks_padding_and_refuses_calibration():
    model = _net_with_shared_weight()
    w = next(t for t in model.graph.initializer if t.name == "conv_a_w")
    model.graph.initializer.remove(w)
    model.graph.input.append(onnx.helper.make_tensor_value_info("conv_a_w", onnx.TensorProto.FLOAT, list(w.dims)))
    padded = api.run(model, "align-channels{multiple=8,mode=pad}")
    assert any("not a constant" in s.reason for s in padded.records[0].skipped)
    assert padded.verification.equivalent
    with pytest.raises(BadInputError, match="fixed first dimension of 10"):
        api.run(model, TRIM8, allow_drift=0.5)

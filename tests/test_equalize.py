"""equalize: exact cross-layer equalization; ranges meet, Clip gets per-channel bounds, reasons for skips."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from hwnas import api
from tests.conftest import REAL_MODELS, real_model_path
from tests.graphs import const, make_model, tensor

HW = 10


def pair_model(act: str | None = "Relu", second_group: int = 1, channels: int = 8, chain: int = 2,
               shared_weight: bool = False) -> onnx.ModelProto:
    """x → Conv → act → Conv [→ act → Conv ...] → y, channel ranges spread over three decades."""
    rng = np.random.default_rng(channels + chain)
    nodes, inits, current = [], [], "x"
    for k in range(chain):
        c_in = 3 if k == 0 else channels
        group = second_group if k > 0 else 1
        w = rng.normal(0, 1, (channels, c_in // group, 3, 3)) * np.logspace(-1.5, 1.5, channels)[:, None, None, None]
        inits += [const(f"w{k}", w.astype(np.float32)), const(f"b{k}", rng.normal(0, 0.5, channels).astype(np.float32))]
        weight = "w0" if shared_weight and k == 2 else f"w{k}"
        nodes.append(helper.make_node("Conv", [current, weight, f"b{k}"], [f"c{k}"], name=f"conv{k}",
                                      pads=[1, 1, 1, 1], group=group))
        current = f"c{k}"
        if k < chain - 1 and act is not None:
            if act == "Clip":
                inits += [const(f"lo{k}", np.array(0, np.float32)), const(f"hi{k}", np.array(6, np.float32))]
                nodes.append(helper.make_node("Clip", [current, f"lo{k}", f"hi{k}"], [f"a{k}"], name=f"act{k}"))
            elif act == "PRelu":
                inits.append(const(f"slope{k}", rng.uniform(0, 0.3, (channels, 1, 1)).astype(np.float32)))
                nodes.append(helper.make_node("PRelu", [current, f"slope{k}"], [f"a{k}"], name=f"act{k}"))
            else:
                nodes.append(helper.make_node(act, [current], [f"a{k}"], name=f"act{k}"))
            current = f"a{k}"
    nodes[-1].output[0] = "y"
    return make_model(nodes, [tensor("x", [1, 3, HW, HW])], [tensor("y", [1, channels, HW, HW])], inits)


def weights(model: onnx.ModelProto, node: str) -> np.ndarray:
    conv = next(n for n in model.graph.node if n.name == node)
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == conv.input[1])


@pytest.mark.parametrize("act", [None, "Relu", "LeakyRelu", "PRelu", "Clip"])
def test_equalize_is_exact_and_balances_each_pair(act):
    model = pair_model(act)
    result = api.run(model, "equalize")
    assert result.verification.equivalent and len(result.records[0].applied) == 1
    w1, w2 = weights(result.model, "conv0"), weights(result.model, "conv1")
    r1 = np.abs(w1).reshape(8, -1).max(axis=1)
    r2 = np.abs(w2).transpose(1, 0, 2, 3).reshape(8, -1).max(axis=1)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)
    before = np.abs(weights(model, "conv0")).reshape(8, -1).max(axis=1)
    assert before.max() / before.min() > 100 > r1.max() / r1.min()


def test_clip_becomes_relu_and_a_per_channel_min():
    result = api.run(pair_model("Clip"), "equalize")
    ops = [n.op_type for n in result.model.graph.node]
    assert "Clip" not in ops and ops.count("Relu") == 1 and ops.count("Min") == 1
    bound_name = next(n for n in result.model.graph.node if n.op_type == "Min").input[1]
    bound = next(numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name == bound_name)
    assert bound.shape == (8, 1, 1) and len(np.unique(bound)) == 8


def test_depthwise_second_and_chains_converge():
    result = api.run(pair_model("Relu", second_group=8, chain=3), "equalize")
    assert result.verification.equivalent and len(result.records[0].applied) == 2
    assert 1 < result.records[0].stats["rounds"] < 50  # the middle conv moves with both pairs
    w1, w2, w3 = (weights(result.model, f"conv{k}") for k in range(3))
    # converged: each pair's ranges meet (the middle conv is depthwise: its output and input channel coincide)
    np.testing.assert_allclose(np.abs(w1).reshape(8, -1).max(1), np.abs(w2).reshape(8, -1).max(1), rtol=2e-3)
    np.testing.assert_allclose(np.abs(w2).reshape(8, -1).max(1), np.abs(w3).reshape(8, -1).max(1), rtol=2e-3)


def test_sites_it_cannot_equalize_say_why():
    skipped = api.run(pair_model("HardSwish"), "equalize", dry_run=True).records[0].skipped
    assert "hardswish is not positive-homogeneous" in skipped[0].reason
    skipped = api.run(pair_model("Relu", chain=3, shared_weight=True), "equalize", dry_run=True).records[0].skipped
    assert any("shared with another node" in s.reason for s in skipped)


def test_equalize_lowers_per_tensor_int8_drift_through_relu6():
    """Per-tensor weights lose the small channels of a pair whose ranges spread over three decades."""
    model = pair_model("Clip")
    rng = np.random.default_rng(1)
    calib, held = ({"x": rng.normal(size=(8, 3, HW, HW)).astype(np.float32)} for _ in range(2))
    drift = [1 - api.run(model, f"{p}quantize{{per_channel=false}}", calibration=calib, holdout=held,
                         allow_drift=1.0).drift["holdout"].cosine for p in ("", "equalize{balance=weights},")]
    assert drift[1] < 0.5 * drift[0]  # measured 0.0034 → 0.0008


def test_balance_activations_uses_the_calibration_ranges_and_stays_exact():
    model = pair_model("Relu")
    calib = {"x": np.random.default_rng(2).normal(size=(4, 3, HW, HW)).astype(np.float32)}
    plain = api.run(model, "equalize{balance=weights}", calibration=calib)
    aware = api.run(model, "equalize", calibration=calib)  # auto: activations, with calibration
    assert aware.records[0].stats["activations"] and not plain.records[0].stats["activations"]
    assert aware.verification.equivalent
    assert not np.allclose(weights(plain.model, "conv0"), weights(aware.model, "conv0"))
    fallback = api.run(model, "equalize{balance=activations}")
    assert any("no --calib" in w for w in fallback.warnings)
    np.testing.assert_allclose(weights(fallback.model, "conv0"), weights(plain.model, "conv0"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_equalize_is_exact_on_real_models(name):
    result = api.run(str(real_model_path(name)), "fold-bn,fold-affine,equalize", input_shapes=REAL_MODELS[name])
    assert result.verification.equivalent

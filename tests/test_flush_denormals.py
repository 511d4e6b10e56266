"""flush-denormals: denormal float weights -> 0, outputs bitwise equal; uses where 0 and a denormal differ skipped."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hwnas import api
from hwnas.cli import main
from hwnas.graph import io as graph_io
from hwnas.graph.constants import denormal_mask
from hwnas.graph.io import load_model
from hwnas.graph.session import make_session, random_feeds
from tests.conftest import real_model_path
from tests.graphs import conv_bn_model, make_model, tensor

DENORMAL = np.float32(3e-41)
SHAPES = {"x": (1, 4, 8, 8)}


def denormal_model(channels: int = 8) -> onnx.ModelProto:
    """Conv (3 denormal weights) → Mul by m (1 denormal) → Add; Div by c (1 denormal) → Tanh; an int64 shape."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((channels, 4, 3, 3)).astype(np.float32)
    w.flat[[0, 17, 200]] = [DENORMAL, -DENORMAL, DENORMAL]
    m = np.full((1, channels, 1, 1), 0.5, np.float32)
    m[0, 3] = DENORMAL
    c = np.full((1, channels, 1, 1), 2.0, np.float32)
    c[0, 5] = DENORMAL
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["z"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["z", "m"], ["p"], name="mul"),
        helper.make_node("Add", ["z", "p"], ["s"], name="add"),
        helper.make_node("Div", ["z", "c"], ["q"], name="div"),
        helper.make_node("Tanh", ["q"], ["d"], name="bounded"),  # z/denormal overflows: keep outputs finite
        helper.make_node("Reshape", ["s", "shape"], ["y"], name="flatten"),
    ]
    flat = channels * 64
    return make_model(nodes, [tensor("x", [1, 4, 8, 8])], [tensor("y", [1, flat]), tensor("d", [1, channels, 8, 8])],
                      [numpy_helper.from_array(a, n) for a, n in
                       ((w, "w"), (m, "m"), (c, "c"), (np.array([1, flat], np.int64), "shape"))])


def ort_outputs(model: onnx.ModelProto) -> list[np.ndarray]:
    return make_session(model).run(None, random_feeds(model, SHAPES, 0))


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_weights_are_flushed_the_divisor_is_skipped_and_the_outputs_are_bitwise_equal():
    model = denormal_model()
    result = api.run(model, "flush-denormals", input_shapes=SHAPES)
    assert result.verified and result.verification.equivalent
    record = result.records[0]
    sites = {s.description: s.reason for s in record.sites}
    assert sites.keys() == {"w: 3 of 288 float32 values denormal", "m: 1 of 8 float32 values denormal",
                            "c: 1 of 8 float32 values denormal"}  # the int64 shape is no site
    assert sites["w: 3 of 288 float32 values denormal"] is None and sites["m: 1 of 8 float32 values denormal"] is None
    assert "divisor of Div div" in sites["c: 1 of 8 float32 values denormal"]
    assert record.stats == {"flushed": 4, "tensors": 2}
    weights = initializers(result.model)
    assert not denormal_mask(weights["w"]).any() and not denormal_mask(weights["m"]).any()
    assert weights["w"].flat[17] == 0 and weights["w"].flat[1] == initializers(model)["w"].flat[1]
    assert np.array_equal(weights["c"], initializers(model)["c"])
    for before, after in zip(ort_outputs(model), ort_outputs(result.model)):
        assert np.array_equal(before, after)


def test_uses_where_zero_and_a_denormal_differ_are_skipped_with_reasons():
    k = np.array([1.0, DENORMAL, 2.0, 4.0], np.float32)
    nodes = [
        helper.make_node("Reshape", ["k", "shape"], ["k4"], name="to_4d"),
        helper.make_node("Div", ["x", "k4"], ["a"], name="div"),  # k reaches a divisor through a Reshape
        helper.make_node("Log", ["g"], ["b"], name="log"),
        helper.make_node("Cast", ["h"], ["h32"], name="widen", to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "h32"], ["e"], name="add_h"),
        helper.make_node("BatchNormalization", ["x", "one", "zero", "zero", "v"], ["n0"], name="bn_eps0", epsilon=0.0),
        helper.make_node("BatchNormalization", ["x", "one", "zero", "zero", "v"], ["n1"], name="bn"),
    ]
    v = np.array([1.0, DENORMAL, 1.0, 1.0], np.float32)
    model = make_model(
        nodes, [tensor("x", [1, 4, 2, 2])], [tensor("b", [3])] + [tensor(n, [1, 4, 2, 2]) for n in ("e", "n0", "n1")],
        [numpy_helper.from_array(k, "k"), numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "shape"),
         numpy_helper.from_array(np.full(3, DENORMAL), "g"), numpy_helper.from_array(np.float16([1e-6, 1]), "h"),
         numpy_helper.from_array(np.ones(4, np.float32), "one"), numpy_helper.from_array(np.zeros(4, np.float32), "zero"),
         numpy_helper.from_array(v, "v")])
    sites = {s.description.split(":")[0]: s.reason for s in api.run(model, "flush-denormals", dry_run=True).records[0].sites}
    assert "divisor of Div div" in sites["k"] and "through Reshape to_4d" in sites["k"]
    assert "Log log" in sites["g"] and "singular at 0" in sites["g"]
    assert sites["h"].startswith("float16")
    assert "BatchNormalization bn_eps0 with epsilon 0" in sites["v"]  # var + 1e-5 would round the same (bn)
    assert "shape" not in sites and "one" not in sites  # int64 and denormal-free tensors are no sites


def test_a_constant_node_inside_an_if_branch_is_flushed():
    value = numpy_helper.from_array(np.array([DENORMAL, 2.0], np.float32), "kv")
    then = helper.make_graph([helper.make_node("Constant", [], ["k"], name="k_node", value=value),
                              helper.make_node("Mul", ["x", "k"], ["t"], name="scale")], "then", [], [tensor("t", [2])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="keep")], "else", [], [tensor("e", [2])])
    model = make_model([helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other)],
                       [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), tensor("x", [2])],
                       [tensor("y", [2])], [])
    result = api.run(model, "flush-denormals", input_shapes={"cond": (), "x": (2,)})
    assert result.verified and [(s.nodes, s.applicable) for s in result.records[0].sites] == [(("scale",), True)]
    branch = next(a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch")
    assert numpy_helper.to_array(branch.node[0].attribute[0].t).tolist() == [0.0, 2.0]


def test_a_model_without_denormals_has_no_site():
    result = api.run(conv_bn_model(), "flush-denormals")
    assert result.records[0].sites == [] and not result.records[0].modified


def test_cli_run_and_dry_run(capsys, tmp_path):
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save_model(denormal_model(), str(path))
    assert main(["run", str(path), "--passes", "flush-denormals", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "w: 3 of 288 float32 values denormal" in listed and "skipped: divisor of Div div" in listed
    assert not out.exists()
    assert main(["run", str(path), "-o", str(out), "--passes", "flush-denormals", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"]
    assert not denormal_mask(initializers(onnx.load(str(out)))["w"]).any()


def test_weights_kept_on_disk_are_flushed_and_written_back(monkeypatch, tmp_path):
    monkeypatch.setattr(graph_io, "LARGE_MODEL_BYTES", 0)  # the large-model path: weights memory-mapped
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    model = denormal_model(channels=512)  # w: 72 KiB, above INLINE_BYTES, so memory-mapped, not read in
    expected = ort_outputs(model)  # saving with external data turns `model` into references
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert main(["run", str(path), "-o", str(out), "--passes", "flush-denormals"]) == 0
    kept = {t.name: t.data_location for t in onnx.load(str(out), load_external_data=False).graph.initializer}
    assert kept["w"] == TensorProto.EXTERNAL
    written = onnx.load(str(out))
    assert not denormal_mask(initializers(written)["w"]).any() and not denormal_mask(initializers(written)["m"]).any()
    for before, after in zip(expected, ort_outputs(written)):
        assert np.array_equal(before, after)


def test_pp_ocr_v4_det_loses_its_1579_denormal_weights_and_stays_exact():
    name = "ch_PP-OCRv4_det_infer.onnx"
    model = load_model(real_model_path(name))
    shapes = {"x": (1, 3, 160, 160)}  # the rewrite is per weight: a small page checks it as well as 640²
    result = api.run(model, "flush-denormals", input_shapes=shapes)
    assert result.verified and result.verification.equivalent
    record = result.records[0]
    assert len(record.sites) == 4 and all(s.applicable for s in record.sites) and record.stats["flushed"] == 1579
    x = np.random.default_rng(0).standard_normal(shapes["x"]).astype(np.float32)
    before, after = (make_session(m).run(None, {"x": x}) for m in (model, result.model))
    assert all(np.array_equal(b, a) for b, a in zip(before, after))

"""The qnn-htp target: Qualcomm's HTP backend (onnxruntime-qnn) compiles the model; placement, drift, bisection.

Tests that compile need the `qnn` extra and are skipped with the install line without it; the
missing-extra path and the bisection search run everywhere (the extra is hidden, the compiler is faked).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hwnas import api
from hwnas.cli import main
from hwnas.targets import get_target
from hwnas.targets import qnn_htp
from hwnas.targets.qnn_htp import QnnHtpTarget, parse_reasons

HAS_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None
needs_qnn = pytest.mark.skipif(not HAS_QNN, reason='onnxruntime-qnn is not installed: pip install -e ".[qnn]"')


def qdq_model(tail: onnx.NodeProto | None = None, out_scale: float = 0.05) -> onnx.ModelProto:
    """x[1,3,8,8] → Q → DQ → Conv(DQ(w_u8)) → Q → DQ → [tail] → y: a uint8 QDQ conv, as ORT's quantizer writes one."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_in"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["w_q", "ws", "z"], ["wd"], name="dq_w"),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "s2", "z"], ["cq"], name="q_c"),
        helper.make_node("DequantizeLinear", ["cq", "s2", "z"], ["y" if tail is None else "cd"], name="dq_c"),
    ]
    if tail is not None:
        nodes.append(tail)
    inits = [numpy_helper.from_array(rng.integers(0, 255, (4, 3, 3, 3)).astype(np.uint8), "w_q"),
             numpy_helper.from_array(np.float32(0.03), "s"), numpy_helper.from_array(np.uint8(128), "z"),
             numpy_helper.from_array(np.float32(0.002), "ws"), numpy_helper.from_array(np.float32(out_scale), "s2"),
             numpy_helper.from_array(np.float32(3.0), "m")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def mod_model() -> onnx.ModelProto:
    """The QDQ conv followed by Mod(fmod=1), which the HTP does not take."""
    return qdq_model(helper.make_node("Mod", ["cd", "m"], ["y"], name="the_mod", fmod=1))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_estimate_uses_the_int8_npu_estimator_and_says_so(tmp_path):
    target = get_target("qnn-htp")
    assert isinstance(target, QnnHtpTarget) and target.estimator_name == "npu-32x32"
    model = onnx.shape_inference.infer_shapes(qdq_model())
    on_qnn = api.estimate(model, "qnn-htp")
    on_npu = api.estimate(model, "npu-32x32")
    assert on_qnn.latency_ms == on_npu.latency_ms
    assert any("host time" in w and "npu-32x32" in w for w in on_qnn.warnings)


def test_missing_extra_is_exit_2_with_the_install_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # import fails as if not installed
    path = tmp_path / "m.onnx"
    onnx.save(qdq_model(), path)
    code, out, err = run_cli(capsys, "check", str(path), "--target", "qnn-htp", "--require-npu")
    assert code == 2 and out == ""
    assert 'pip install -e ".[qnn]"' in err and len(err.strip().splitlines()) == 1


def test_require_npu_on_another_target_is_bad_input(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(qdq_model(), path)
    code, _, err = run_cli(capsys, "check", str(path), "--target", "npu-32x32", "--require-npu")
    assert code == 2 and "--target qnn-htp" in err


def test_reasons_are_parsed_from_the_eps_log():
    log = ("... LogNodeSupport] Validation FAILED for 1 nodes in OrtNodeUnit (Mod) :\n"
           "\tOperator type: Mod Node name: the_mod Node index: 6\n"
           "\tREASON : QNN Mod Op only support fmod == 0 for now.\n"
           "... LogNodeSupport] Validation PASSED for 4 nodes in OrtNodeUnit (Conv) :\n"
           "\tOperator type: Conv Node name: conv Node index: 3\n")
    assert parse_reasons(log) == {"the_mod": "QNN Mod Op only support fmod == 0 for now."}


def test_bisection_names_the_smallest_failing_run_of_nodes(monkeypatch):
    """The compiler is faked: any model holding node 'conv' fails. Bisection must name exactly that node,
    with its quantized inputs."""
    calls = []

    def fake_compile(model, strict, feeds=None):
        calls.append(len(model.graph.node))
        bad = any(n.name == "conv" for n in model.graph.node)
        return qnn_htp._Compile(not bad, "Failed to finalize QNN graph. Error: QNN_COMMON_ERROR_MEM_ALLOC" if bad else None,
                                [], {})

    monkeypatch.setattr(qnn_htp, "_compile", fake_compile)
    model = qdq_model()
    culprit = qnn_htp.find_culprit(model, {"x": (1, 3, 8, 8)})
    assert culprit.nodes == ["conv"] and culprit.ops == ["Conv"]
    assert "MEM_ALLOC" in culprit.error
    assert culprit.shapes["c"] == [1, 4, 8, 8]
    assert any("input wd: quantized, scale 0.002" in q for q in culprit.quantization)
    assert culprit.compiles_tried == len(calls) < 2 * len(model.graph.node)


@needs_qnn
def test_a_node_the_npu_does_not_take_is_named_with_the_backends_reason(tmp_path, capsys):
    path, junit = tmp_path / "mod.onnx", tmp_path / "check.xml"
    onnx.save(mod_model(), path)
    code, out, _ = run_cli(capsys, "check", str(path), "--target", "qnn-htp", "--require-npu", "--json",
                           "--junit", str(junit))
    assert code == 1
    report = json.loads(out)
    deploy = report["deploy"]
    assert report["failed"] == ["qnn-htp-placement"]
    assert deploy["compiled"] is False and "fallback is disabled" in deploy["error"]
    assert deploy["off_npu"] == [{"node": "the_mod", "op_type": "Mod", "device": "CPUExecutionProvider",
                                  "reason": "QNN Mod Op only support fmod == 0 for now."}]
    assert deploy["nodes_on_npu"] >= 6  # the QDQ conv, graph input quantization included
    case = ET.parse(junit).getroot().find(".//testcase[@name='qnn-htp-placement']")
    assert case is not None and case.find("failure") is not None


@needs_qnn
def test_an_npu_only_model_compiles_and_its_drift_is_measured(tmp_path, capsys):
    model = qdq_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.random.default_rng(1).normal(0, 1, (3, 3, 8, 8)).astype(np.float32))
    code, out, _ = run_cli(capsys, "check", str(path), "--target", "qnn-htp", "--require-npu", "--max-drift", "0.05",
                           "--holdout", str(feeds))
    assert code == 0, out
    assert "all" in out and "nodes on the NPU" in out
    assert "on 3 held-out sample(s)" in out


@needs_qnn
def test_drift_over_budget_fails_the_drift_item(tmp_path, capsys):
    """Against the float conv, a coarse output scale (0.5) drifts far more than a 1e-6 budget allows."""
    quantized = qdq_model(out_scale=0.5)
    float_ref = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(
            ((numpy_helper.to_array(quantized.graph.initializer[0]).astype(np.float32) - 128) * 0.002), "w")]),
        opset_imports=[helper.make_opsetid("", 17)])
    float_ref.ir_version = 8
    result = api.check(quantized, "qnn-htp", require_npu=True, max_drift=1e-6, reference=float_ref)
    placement, drift = result.items
    assert placement.passed and not drift.passed
    assert drift.value > 1e-6 and "EXCEEDS" in drift.message
    assert result.deploy["drift"]["inputs"] == "seeded random"
    assert any("seeded random" in w for w in result.warnings)


@needs_qnn
@pytest.mark.slow
def test_optimize_passes_over_a_winner_that_does_not_compile(monkeypatch, tmp_path):
    """The first candidate to verify is turned down by the (real) deploy check made to fail once; the next
    verified one is written, compiled for real, with the reason for the first in the report."""
    from hwnas.models import build
    from hwnas.verify.calib_data import scene_batch

    real = qnn_htp.deploy_check
    calls = []

    def fail_first(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return qnn_htp.DeployCheck(False, "Failed to finalize QNN graph. Error: QNN_COMMON_ERROR_MEM_ALLOC", [], {})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(qnn_htp, "deploy_check", fail_first)
    model = build("mobilenetv2", resolution=64, width=0.5)
    feeds = {"input": scene_batch(np.random.default_rng(0), 4, (64, 64))[0]}
    result = api.optimize(model, "npu-16x16", quantize="int8", deploy_check="qnn-htp", max_drift=0.1,
                          calibration=feeds, trials=6, seed=0, workers=1, journal=tmp_path / "j.jsonl")
    report = result.to_dict()
    assert report["quantization"]["preset"] == "qnn"  # the backend's form, not the npu target's
    deploy = report["deploy_check"]
    assert len(deploy["rejected"]) == 1 and "MEM_ALLOC" in deploy["rejected"][0]["reason"]
    assert deploy["rejected"][0]["pipeline"] != report["pipeline"]
    assert deploy["chosen"]["compiled"] and deploy["chosen"]["nodes_off_npu"] == 0
    assert 0.9 < deploy["chosen"]["drift"]["cosine"] <= 1.0
    assert "checked at input:1x3x64x64" in deploy["note"]


@pytest.mark.slow
def test_optimize_reports_and_prints_the_deploy_check_with_the_compiler_faked(monkeypatch, tmp_path, capsys):
    """Runs everywhere: the first candidate's (fake) compile fails, the next one's places every node on the
    NPU; the report's fields, its JSON and the CLI's lines say so."""
    from hwnas.models import build

    calls = []

    def fake_compile(model, shapes, feeds, reference, label):
        calls.append(label)
        if len(calls) == 1:
            return qnn_htp.DeployCheck(False, "Failed to finalize QNN graph. Error: QNN_COMMON_ERROR_MEM_ALLOC", [], {})
        drift = qnn_htp.NpuDrift("the input", label, 2, 0.995, 0.99, 0.1, None)
        return qnn_htp.DeployCheck(True, None, [qnn_htp.NodePlacement("conv", "Conv", "npu")], dict(shapes), drift)

    monkeypatch.setattr(qnn_htp, "require_qnn", lambda: None)
    monkeypatch.setattr(qnn_htp, "deploy_check", fake_compile)
    model_path, report_path = tmp_path / "m.onnx", tmp_path / "r.json"
    onnx.save(build("mobilenetv2", resolution=32, width=0.35), model_path)
    code = main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--target", "npu-16x16", "--quantize",
                 "int8", "--deploy-check", "qnn-htp", "--max-drift", "0.2", "--trials", "4", "--workers", "1",
                 "--report", str(report_path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and calls == ["calibration", "calibration"]
    deploy = json.loads(report_path.read_text())["deploy_check"]
    assert list(deploy) == ["target", "rejected", "chosen", "note"]
    assert "MEM_ALLOC" in deploy["rejected"][0]["reason"] and deploy["chosen"]["nodes_on_npu"] == 1
    assert "qnn-htp: passed over " in out and "QNN_COMMON_ERROR_MEM_ALLOC" in out
    assert "the written model compiles with all 1 nodes on the NPU, checked at input:1x3x32x32" in out
    assert "on 2 calibration sample(s): cosine 0.99500" in out


def test_deploy_check_needs_int8(monkeypatch):
    from hwnas.errors import BadInputError
    from hwnas.models import build

    with pytest.raises(BadInputError, match="--quantize int8"):
        api.optimize(build("mobilenetv2", resolution=64, width=0.5), "npu-16x16", deploy_check="qnn-htp",
                     max_drift=0.1, trials=2, workers=1)


@needs_qnn
@pytest.mark.slow
def test_a_float_div_stops_finalize_and_bisection_names_it():
    """PP-OCR cls quantized in the qnn form but without div-to-mul does not finalize on the HTP; the
    bisection names its first hard-swish Div, whose divisor 6 stayed a float constant. With div-to-mul
    (the qnn preset) every node compiles onto the NPU."""
    pytest.importorskip("PIL", reason="rendered text lines need pillow")
    from hwnas.verify.calib_data import calibration_sets
    from tests.conftest import real_model_path

    path = real_model_path("ch_ppocr_mobile_v2.0_cls_infer.onnx")
    calib = calibration_sets(path, fit_samples=4, held_out_samples=1).fit.inputs
    shapes = {"x": (1, 3, 48, 192)}
    # the qnn preset's settings (uint8 activations, uint8 weights per tensor), spelled without the preset
    plain = api.run(str(path), "quantize{preset=cpu,weights=uint8,per_channel=false}", input_shapes=shapes,
                    calibration=calib, allow_drift=1.0, verify=False).model
    result = qnn_htp.deploy_check(plain, shapes, drift=False)
    assert not result.compiled and "QNN_COMMON_ERROR_MEM_ALLOC" in result.error
    culprit = result.culprit
    assert culprit is not None and "Div" in culprit.ops and len(culprit.nodes) <= 8
    assert any("(Div) input" in q and "float constant = 6" in q and "NOT quantized" in q for q in culprit.quantization)
    fixed = api.run(str(path), "quantize{preset=qnn}", input_shapes=shapes, calibration=calib, allow_drift=1.0,
                    verify=False).model
    good = qnn_htp.deploy_check(fixed, shapes, drift=False)
    assert good.compiled and not good.off_npu and good.on_npu > 500

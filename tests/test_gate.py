"""The CI gate (`hwnas.gate.check`) and its JUnit XML: one verdict per budget, the failing one named."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import helper

from hwnas import api
from hwnas.errors import BadInputError
from hwnas.gate import (LATENCY, MULTIPLE, PARAMS, PEAK_ACT, REGRESSION, Budgets, CheckItem, CheckResult, check,
                        conv_channels, parse_size)
from hwnas.report.junit import SUITE_NAME, junit_xml, write_junit
from tests.conftest import real_model_path
from tests.graphs import const, conv_bn_model, make_model, tensor

TARGET = "npu-32x32"


def chain_model(mid: int = 12, weights_in_constant_nodes: bool = False) -> onnx.ModelProto:
    """x[1,8,8,8] → conv1 1×1 (8→mid) → Relu → depthwise 3×3 (mid, group=mid) → conv2 1×1 (mid→8) → y."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.normal(0, 0.3, (mid, 8, 1, 1)).astype(np.float32),
        "wd": rng.normal(0, 0.3, (mid, 1, 3, 3)).astype(np.float32),
        "w2": rng.normal(0, 0.3, (8, mid, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Conv", ["b", "wd"], ["c"], name="dw", group=mid, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c", "w2"], ["y"], name="conv2"),
    ]
    inits = [const(k, v) for k, v in weights.items()]
    if weights_in_constant_nodes:  # as Paddle exports have them
        nodes = [helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}") for t in inits] + nodes
        inits = []
    return make_model(nodes, [tensor("x", [1, 8, 8, 8])], [tensor("y", [1, 8, 8, 8])], inits)


def item(result: CheckResult, name: str) -> CheckItem:
    return next(i for i in result.items if i.name == name)


# ---------------------------------------------------------------------------------------- parse_size

@pytest.mark.parametrize("text, expected", [
    ("1000", 1000), (1000, 1000), ("0", 0), ("512KB", 512_000), ("4MB", 4_000_000), ("2GB", 2_000_000_000),
    ("3.5MiB", int(3.5 * 2**20)), ("1KiB", 1024), ("1 GiB", 2**30), ("4mb", 4_000_000), ("12B", 12), (".5KiB", 512),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "4 TB", "4XB", "-1", "1e3", "MB", "1.2.3KB", -5, True, "nan"])
def test_parse_size_rejects_bad_sizes(text):
    with pytest.raises(BadInputError, match="size"):
        parse_size(text)


# ---------------------------------------------------------------------------------------- budgets

def test_budgets_parse_sizes_and_list_what_is_requested():
    b = Budgets(max_params_bytes="4MB", max_peak_act_bytes="1MiB", require_multiple=8)
    assert (b.max_params_bytes, b.max_peak_act_bytes) == (4_000_000, 2**20)
    assert b.requested == [PARAMS, PEAK_ACT, MULTIPLE]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"baseline": "ref.onnx"}, "--baseline"),
    ({"max_regression_pct": 5.0}, "--baseline"),
    ({"max_latency_ms": 0}, LATENCY),
    ({"max_latency_ms": float("nan")}, LATENCY),
    ({"require_multiple": 0}, MULTIPLE),
    ({"require_multiple": 2.5}, MULTIPLE),
    ({"max_params_bytes": "lots"}, "size"),
])
def test_bad_budgets_are_bad_input(kwargs, fragment):
    with pytest.raises(BadInputError, match=fragment):
        Budgets(**kwargs)


def test_no_budget_is_bad_input():
    with pytest.raises(BadInputError, match="at least one budget"):
        check(conv_bn_model(), TARGET, Budgets())


def test_unreadable_model_is_bad_input(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(BadInputError):
        check(bad, TARGET, Budgets(max_params_bytes=10))


# ---------------------------------------------------------------------------------------- check

def test_model_within_every_budget_passes(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_bn_model(), str(path))
    result = check(path, TARGET, Budgets(max_latency_ms=10.0, max_params_bytes="1MB", max_peak_act_bytes="1MB",
                                         require_multiple=8, baseline=path, max_regression_pct=1.0))
    assert result.passed and result.failed == []
    assert [i.name for i in result.items] == [LATENCY, PARAMS, PEAK_ACT, MULTIPLE, REGRESSION]
    assert item(result, REGRESSION).value == pytest.approx(0.0)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["passed"] is True and data["target"] == TARGET and len(data["checks"]) == 5


def test_latency_budget_uses_the_estimator_and_says_so():
    model = conv_bn_model()
    estimated = api.estimate(model, TARGET).latency_ms
    ok = check(model, TARGET, Budgets(max_latency_ms=estimated * 1.01))
    bad = check(model, TARGET, Budgets(max_latency_ms=estimated * 0.99))
    assert ok.passed and not bad.passed
    failed = item(bad, LATENCY)
    assert failed.value == pytest.approx(estimated) and failed.unit == "ms"
    assert failed.message.startswith(LATENCY) and "EXCEEDS" in failed.message
    assert "estimat" in failed.message and TARGET in failed.message and "not measured" in failed.message


def test_params_budget():
    model = conv_bn_model()  # 8·3·3·3 weights + 4·8 BN values, float32
    expected = (8 * 3 * 3 * 3 + 4 * 8) * 4
    ok = check(model, TARGET, Budgets(max_params_bytes=expected))
    bad = check(model, TARGET, Budgets(max_params_bytes=expected - 1))
    assert ok.passed and item(ok, PARAMS).value == expected
    assert not bad.passed and bad.failed[0].name == PARAMS and f"{expected:,} B" in bad.failed[0].message


def test_peak_activation_budget():
    model = conv_bn_model()
    peak = api.estimate(model, TARGET).peak_activation_bytes
    assert check(model, TARGET, Budgets(max_peak_act_bytes=peak)).passed
    bad = check(model, TARGET, Budgets(max_peak_act_bytes=peak // 2))
    assert [i.name for i in bad.failed] == [PEAK_ACT]
    assert "peak activations" in bad.failed[0].message and "EXCEEDS" in bad.failed[0].message


def test_memory_budgets_need_no_latency_estimator():
    # no estimator ships for the cpu target's latency; params and peak activations do not need one
    result = check(conv_bn_model(), "cpu", Budgets(max_params_bytes="1MB", max_peak_act_bytes="1MB"))
    assert result.passed and result.target == "cpu"


def test_require_multiple_lists_offenders_depthwise_by_its_channel_count():
    model = chain_model(mid=12)
    assert check(model, TARGET, Budgets(require_multiple=4)).passed
    bad = item(check(model, TARGET, Budgets(require_multiple=8)), MULTIPLE)
    assert not bad.passed and bad.value == 3 and bad.limit == 8
    assert bad.details == (
        "conv conv1: 12 output channels",
        "depthwise conv dw: 12 input and 12 output channels",
        "conv conv2: 12 input channels",
    )
    assert "3 of 3 Convs" in bad.message and "not multiples of 8" in bad.message and "dw" in bad.message


def test_require_multiple_exempts_channels_fixed_by_the_signature():
    model = conv_bn_model(channels_in=3, channels_out=8)  # 3 RGB input channels: no rewrite can change them
    result = item(check(model, TARGET, Budgets(require_multiple=8)), MULTIPLE)
    assert result.passed and "exempt" in result.message


def test_require_multiple_reads_weights_in_constant_nodes_without_shapes():
    channels = conv_channels(chain_model(mid=12, weights_in_constant_nodes=True), None)
    assert [(c.node, c.inputs, c.outputs, c.groups) for c in channels] == [
        ("conv1", 8, 12, 1), ("dw", 12, 12, 12), ("conv2", 12, 8, 1)]


def test_require_multiple_on_a_real_model_with_unaligned_channels():
    path = real_model_path("ch_ppocr_mobile_v2.0_cls_infer.onnx")  # MobileNetV3-small style: 10, 22, 50 channels
    result = item(check(path, TARGET, Budgets(require_multiple=8)), MULTIPLE)
    assert not result.passed
    assert any("22" in d for d in result.details)


def test_regression_against_a_baseline(tmp_path):
    ref, slower = tmp_path / "ref.onnx", tmp_path / "in.onnx"
    onnx.save_model(conv_bn_model(channels_out=8), str(ref))
    onnx.save_model(conv_bn_model(channels_out=40), str(slower))  # 40 > 32 columns: a second fold on the array
    est_in, est_ref = api.estimate(slower, TARGET).latency_ms, api.estimate(ref, TARGET).latency_ms
    pct = (est_in - est_ref) / est_ref * 100
    assert pct > 1
    bad = item(check(slower, TARGET, Budgets(baseline=ref, max_regression_pct=1.0)), REGRESSION)
    assert not bad.passed and bad.value == pytest.approx(pct) and bad.unit == "%"
    assert str(ref) in bad.message and "EXCEEDS" in bad.message and "estimat" in bad.message
    assert check(slower, TARGET, Budgets(baseline=ref, max_regression_pct=pct + 1)).passed
    # faster than the baseline is never a regression
    assert check(ref, TARGET, Budgets(baseline=slower, max_regression_pct=0.0)).passed


def test_missing_baseline_is_bad_input_naming_it(tmp_path):
    with pytest.raises(BadInputError, match="--baseline .*missing.onnx"):
        check(conv_bn_model(), TARGET, Budgets(baseline=tmp_path / "missing.onnx", max_regression_pct=5))


def test_one_failure_among_passes_names_only_that_budget():
    result = check(conv_bn_model(), TARGET, Budgets(max_latency_ms=100.0, max_params_bytes=10, require_multiple=8))
    assert not result.passed
    assert [i.name for i in result.failed] == [PARAMS]
    assert result.to_dict()["failed"] == [PARAMS]


# ---------------------------------------------------------------------------------------- JUnit

def test_junit_has_one_testcase_per_budget_and_names_the_failure(tmp_path):
    result = check(conv_bn_model(), TARGET, Budgets(max_latency_ms=100.0, max_params_bytes=10, require_multiple=16))
    path = write_junit(tmp_path / "check.xml", result, model="m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["check.xml"]  # no temporary file left behind
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    assert suite.get("name") == SUITE_NAME == "hwnas check"
    assert (suite.get("tests"), suite.get("failures")) == ("3", "2")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert list(cases) == [LATENCY, PARAMS, MULTIPLE]
    assert cases[LATENCY].find("failure") is None
    for name in (PARAMS, MULTIPLE):
        failure = cases[name].find("failure")
        assert failure is not None and failure.get("message").startswith(name)
    assert "conv conv: 8 output channels" in cases[MULTIPLE].find("failure").text
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["target"] == TARGET and props["model"] == "m.onnx"


def test_junit_escapes_odd_characters():
    result = CheckResult(TARGET, [CheckItem("max-params", False, 2, 1, 'node "a<b>&c" \u00e9', "bytes", ("x<y",))])
    root = ET.fromstring(junit_xml(result).encode("utf-8"))
    failure = root.find("testsuite/testcase/failure")
    assert failure.get("message") == 'node "a<b>&c" \u00e9'
    assert failure.text.endswith("x<y")


def test_junit_all_pass_has_no_failures(tmp_path):
    result = check(conv_bn_model(), TARGET, Budgets(max_params_bytes="1MB"))
    root = ET.parse(write_junit(tmp_path / "ok.xml", result)).getroot()
    assert root.get("failures") == "0" and root.find("testsuite/testcase/failure") is None


def test_junit_unwritable_path_is_bad_input(tmp_path):
    result = CheckResult(TARGET, [])
    with pytest.raises(BadInputError):
        write_junit(tmp_path / "missing-dir" / "x.xml", result)


def test_require_multiple_fails_a_channel_count_it_cannot_read():
    """A conv whose weight is not constant has no readable output count without shapes: it used to pass
    unchecked ("unknown (not checked)") although the gate had not checked it."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv_dyn"),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2")]
    model = make_model(nodes, [tensor("x", ["N", 8, "H", "W"]), tensor("w", ["M", 8, 1, 1])],
                       [tensor("y", ["N", 8, "H", "W"])], [const("w2", rng.normal(0, 0.3, (8, 16, 1, 1)).astype(np.float32))])
    result = item(check(model, TARGET, Budgets(require_multiple=8)), MULTIPLE)
    assert not result.passed and result.value == 1
    assert result.details == ("conv conv_dyn: unknown output channels",)
    assert "unknown" in result.message and "--input-shape" in result.message

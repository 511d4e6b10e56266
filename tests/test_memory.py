"""Memory footprint against independent computations, and the schedule-memory pass."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from hwnas import api
from hwnas.estimator.memory import footprint
from hwnas.graph.io import load_model
from hwnas.graph.shapes import resolve_input_shapes, tensor_shapes
from hwnas.models import build
from tests.graphs import const, make_model, tensor


def weight_bytes_independently(model: onnx.ModelProto) -> int:
    """Sum of every weight tensor's bytes: initializers plus Constant-node values, each name once."""
    seen = {}
    for t in model.graph.initializer:
        seen[t.name] = numpy_helper.to_array(t).nbytes
    for n in model.graph.node:
        if n.op_type == "Constant":
            attr = n.attribute[0]
            if attr.name == "value":
                seen[n.output[0]] = numpy_helper.to_array(attr.t).nbytes
            elif attr.name in ("value_float", "value_int"):
                seen[n.output[0]] = 4 if attr.name == "value_float" else 8
            elif attr.name in ("value_floats", "value_ints"):
                seen[n.output[0]] = (4 if attr.name == "value_floats" else 8) * len(helper.get_attribute_value(attr))
    return sum(seen.values())


def peak_independently(model: onnx.ModelProto, shapes) -> int:
    """Plain liveness: at every step, sum the tensors produced so far and still needed (or outputs)."""
    all_shapes = tensor_shapes(model, shapes)
    constants = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    nodes = model.graph.node
    outputs = {o.name for o in model.graph.output}
    produced_at = {i.name: 0 for i in model.graph.input if i.name not in constants}
    for i, n in enumerate(nodes):
        for o in n.output:
            produced_at.setdefault(o, i)
    last_use = {}
    for j, n in enumerate(nodes):
        for t in n.input:
            last_use[t] = j
    peak = 0
    for step in range(len(nodes)):
        total = 0
        for name, born in produced_at.items():
            if name in constants or born > step:
                continue
            if last_use.get(name, -1) >= step or name in outputs or born == step:
                total += int(np.prod(all_shapes[name])) * 4
        peak = max(peak, total)
    return peak


MODELS = [
    ("mobilenetv2", None),
    ("ibn-detector", None),
    ("segmenter", None),
]


@pytest.mark.parametrize("name", [m for m, _ in MODELS])
def test_zoo_footprint_matches_independent_computation(name):
    model = build(name, resolution=96)
    shapes = resolve_input_shapes(model)
    fp = footprint(model, shapes)
    assert fp.params_bytes == weight_bytes_independently(model)
    assert fp.peak_activation_bytes == peak_independently(model, shapes)


def test_real_model_footprint_matches_independent_computation(real_model):
    path, shapes = real_model
    model = load_model(path)
    fp = footprint(model, resolve_input_shapes(model, shapes))
    assert fp.params_bytes == weight_bytes_independently(model)
    assert fp.peak_activation_bytes == peak_independently(model, resolve_input_shapes(model, shapes))
    assert fp.peak.lower_bound <= fp.peak_activation_bytes


def test_shared_weight_counted_once():
    w = np.ones((4, 4, 1, 1), np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"]), helper.make_node("Conv", ["a", "w"], ["y"])]
    model = make_model(nodes, [tensor("x", [1, 4, 2, 2])], [tensor("y", [1, 4, 2, 2])], [const("w", w)])
    assert footprint(model, {"x": (1, 4, 2, 2)}).params_bytes == w.nbytes


def branchy_model() -> onnx.ModelProto:
    """x → a (small, kept for the end) and x → b → c (wide) → d; y = a + d, in a wasteful order."""
    rng = np.random.default_rng(0)
    inits = [
        const("wa", rng.normal(size=(4, 4, 1, 1)).astype(np.float32)),
        const("wb", rng.normal(size=(32, 4, 1, 1)).astype(np.float32)),
        const("wc", rng.normal(size=(32, 32, 1, 1)).astype(np.float32)),
        const("wd", rng.normal(size=(4, 32, 1, 1)).astype(np.float32)),
        const("we", rng.normal(size=(32, 4, 1, 1)).astype(np.float32)),
        const("wf", rng.normal(size=(4, 32, 1, 1)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wb"], ["b"], name="wide_b"),
        helper.make_node("Conv", ["x", "we"], ["e"], name="wide_e"),  # second wide branch started early
        helper.make_node("Conv", ["b", "wc"], ["c"], name="wide_c"),
        helper.make_node("Conv", ["c", "wd"], ["d"], name="narrow_d"),
        helper.make_node("Conv", ["e", "wf"], ["f"], name="narrow_f"),
        helper.make_node("Add", ["d", "f"], ["y"], name="join"),
    ]
    return make_model(nodes, [tensor("x", [1, 4, 16, 16])], [tensor("y", [1, 4, 16, 16])], inits)


def test_schedule_memory_lowers_peak_and_is_exact():
    model = branchy_model()
    shapes = {"x": (1, 4, 16, 16)}
    before = footprint(model, shapes).peak_activation_bytes
    result = api.run(model, "schedule-memory")
    after = footprint(result.model, shapes).peak_activation_bytes
    assert result.verification.equivalent
    assert after < before
    assert after == peak_independently(result.model, shapes)
    assert result.records[0].stats == {"peak_before": before, "peak_after": after}


def test_schedule_memory_keeps_an_optimal_order():
    model = build("mobilenetv2", resolution=64)
    result = api.run(model, "schedule-memory")
    assert not result.records[0].modified
    assert "lower bound" in result.records[0].skipped[0].reason
    assert [n.name for n in result.model.graph.node] == [n.name for n in model.graph.node]


def test_quantized_model_activations_count_in_their_stored_type():
    """A QDQ model's float tensors around each quantized kernel never exist at run time: its peak is the
    float model's in uint8 (a quarter), not the float peak plus the int8 copies and the weights' float
    DequantizeLinear outputs (15.0 MB, 8.5x the float peak, before)."""
    from hwnas.passes.quantize import quantize_model

    model = build("mobilenetv2", resolution=96)
    name = model.graph.input[0].name
    calibration = {name: np.random.default_rng(0).standard_normal((4, 3, 96, 96)).astype(np.float32)}
    shapes = {name: (1, 3, 96, 96)}
    float_peak = footprint(model, shapes).peak_activation_bytes
    int8 = footprint(quantize_model(model, calibration), shapes)
    assert int8.peak_activation_bytes == float_peak // 4

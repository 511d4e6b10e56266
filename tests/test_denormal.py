"""Denormal weights: counted per kernel as the vector reads ORT's CPU kernels make of them, priced by the
profiled machine's assist time, and left out where ORT never reads them (padding taps, batch norm folding)."""

import copy

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from hwnas.estimator.defaults import estimator_for
from hwnas.estimator.denormal import measure_assist_ns
from hwnas.targets import get_target
from hwnas.targets.kernels import decompose, denormal_uses

DENORMAL = np.float32(1e-40)


def _conv(weight: np.ndarray, side: tuple[int, int], pads: int = 0, bn_scale: float | None = None) -> onnx.ModelProto:
    c_out, c_in, kh, kw = weight.shape
    out = (side[0] + 2 * pads - kh + 1, side[1] + 2 * pads - kw + 1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c" if bn_scale else "y"], name="conv", pads=[pads] * 4)]
    inits = [numpy_helper.from_array(weight, "w")]
    if bn_scale is not None:
        nodes.append(helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn"))
        inits += [numpy_helper.from_array(np.full(c_out, value, np.float32), name)
                  for name, value in (("g", bn_scale), ("b", 0.0), ("m", 0.0), ("v", 1.0))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c_in, *side])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, c_out, *out])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _uses(model: onnx.ModelProto) -> dict[str, int]:
    shapes = {"x": tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)}
    return denormal_uses(model, decompose(model, shapes, get_target("cpu").rules), lanes=16)


def test_a_denormal_weight_costs_one_read_of_its_vector_of_16_output_channels_at_every_output():
    weight = np.ones((32, 8, 1, 1), np.float32)
    weight[3, 0, 0, 0] = weight[5, 0, 0, 0] = DENORMAL  # one vector (channels 0-15 at input channel 0)
    weight[20, 7, 0, 0] = -DENORMAL  # another (channels 16-31 at input channel 7)
    assert _uses(_conv(weight, (10, 12))) == {"conv": 2 * 10 * 12}
    assert _uses(_conv(np.ones((32, 8, 1, 1), np.float32), (10, 12))) == {}


def test_taps_that_only_meet_padding_are_never_read():
    weight = np.ones((16, 4, 3, 3), np.float32)
    weight[:, :, 0, :] = weight[:, :, 2, :] = DENORMAL  # the window's top and bottom rows
    # one input row, padded by 1: the top and bottom taps land in the padding at every output
    assert _uses(_conv(weight, (1, 20), pads=1)) == {}
    weight[0, 0, 1, 0] = DENORMAL  # the middle row's left tap reads inside at 19 of 20 outputs
    assert _uses(_conv(weight, (1, 20), pads=1)) == {"conv": 19}


def test_a_batch_norm_that_scales_the_denormals_normal_removes_them():
    weight = np.ones((16, 4, 1, 1), np.float32)
    weight[0, 0, 0, 0] = DENORMAL
    assert _uses(_conv(weight, (4, 4), bn_scale=1.0)) == {"conv": 16}
    assert _uses(_conv(weight, (4, 4), bn_scale=1e6)) == {}  # 1e-34 after folding: a normal float


def test_the_estimate_adds_the_profiled_assist_time_and_says_where():
    weight = np.ones((32, 16, 1, 1), np.float32)
    weight[::16, :, 0, 0] = DENORMAL  # every vector of both blocks: 2 x 16 vectors
    model = _conv(weight, (28, 28))
    shipped = estimator_for(get_target("cpu"))
    priced = copy.copy(shipped)
    priced.target_config = {**shipped.target_config, "profiling": {**shipped.target_config["profiling"], "denormal_assist_ns": 50.0}}
    unpriced = copy.copy(shipped)
    unpriced.target_config = {**shipped.target_config, "profiling": {k: v for k, v in shipped.target_config["profiling"].items()
                                                                     if k != "denormal_assist_ns"}}
    base, with_assists = unpriced.estimate(model, {"x": (1, 16, 28, 28)}), priced.estimate(model, {"x": (1, 16, 28, 28)})
    assert with_assists.latency_ms - base.latency_ms == pytest.approx(32 * 28 * 28 * 50e-6, rel=1e-6)
    assert any("denormal weights" in w and "flush-denormals" in w for w in with_assists.warnings)
    assert not any("denormal" in w for w in base.warnings)


def test_the_probe_prices_an_assist_or_says_the_machine_has_none():
    assist_ns = measure_assist_ns(get_target("cpu"))
    assert assist_ns == 0.0 or 1.0 < assist_ns < 1000.0  # Intel Xeon 2026-12-06: ~46 ns; AMD EPYC: none

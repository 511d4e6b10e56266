"""The npu counts bytes per element from each tensor's type: int8 1, uint16 2, float32 the config's size."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hwnas import api, models
from hwnas.targets import get_target
from hwnas.targets.kernels import decompose
from hwnas.targets.npu import NpuConfig, NpuTarget
from tests.test_quantize import HW, calibration, conv_relu_conv

SHAPES = {"x": (1, 3, HW, HW)}


def second_conv(model):
    return [k for k in decompose(model, SHAPES, get_target("npu-32x32").rules) if k.kind == "conv"][1]


def test_int8_tensors_cost_one_byte_and_uint16_two_whatever_the_float_size():
    float_conv = second_conv(conv_relu_conv())
    elements = float_conv.input_elements + float_conv.weight_elements + float_conv.output_elements
    assert float_conv.bytes_moved(4) == 4 * elements  # a float model: every tensor at the target's size
    # conv2 reads u (8×12×12) and w2 (4×8), adds the bias (int32, 4), writes 4×12×12: all through Q/DQ
    q8 = second_conv(api.run(conv_relu_conv(), "quantize{preset=npu}", calibration=calibration(),
                             allow_drift=0.1).model)
    assert q8.bytes_moved(4) == q8.bytes_moved(1) == 8 * HW * HW + 4 * 8 + 4 * 4 + 4 * HW * HW
    q16 = second_conv(api.run(conv_relu_conv(), "quantize{preset=qnn,activations=uint16}",
                              calibration=calibration(), allow_drift=0.1).model)
    assert q16.bytes_moved(4) == 2 * 8 * HW * HW + 4 * 8 + 4 * 4 + 2 * 4 * HW * HW  # u16 activations, u8 weights


def test_a_float32_sized_config_makes_the_int8_model_cheaper_to_move():
    target = NpuTarget(dataclasses.replace(NpuConfig(), bytes_per_element=4, dram_bytes_per_cycle=1))  # memory-bound
    model = models.build("mobilenetv2", width=0.35, resolution=96)
    name = model.graph.input[0].name
    images = np.random.default_rng(0).normal(size=(4, 3, 96, 96)).astype(np.float32)
    q = api.run(model, "quantize{preset=npu}", calibration={name: images}, allow_drift=1.0, verify=False).model
    shapes = {name: (1, 3, 96, 96)}
    float_ms, int8_ms = target.measure(model, shapes).latency_ms, target.measure(q, shapes).latency_ms
    assert int8_ms < 0.4 * float_ms  # a quarter of the bytes (plus int32 biases), where memory bounds the kernel
    # 1 byte per float element: the float model is costed as int8 already, within the int32 biases and the
    # activations QDQ keeps apart from their conv
    shipped = get_target("npu-32x32")
    assert shipped.measure(q, shapes).latency_ms == pytest.approx(shipped.measure(model, shapes).latency_ms, rel=0.05)

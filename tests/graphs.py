"""Tiny inline ONNX graphs for unit tests, built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(
    nodes, inputs, outputs, initializers, opset: int = 17, ir_version: int = 8, custom_domains: tuple[str, ...] = ()
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in custom_domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def tensor(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def bn_params(prefix: str, channels: int, rng: np.random.Generator) -> list[onnx.TensorProto]:
    return [
        const(f"{prefix}_gamma", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
        const(f"{prefix}_beta", rng.normal(0, 0.5, channels).astype(np.float32)),
        const(f"{prefix}_mean", rng.normal(0, 0.5, channels).astype(np.float32)),
        const(f"{prefix}_var", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
    ]


def conv_bn_model(
    channels_in: int = 3,
    channels_out: int = 8,
    extra_consumer: bool = False,
    conv_output_is_graph_output: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """x → Conv(3×3) → t → BatchNormalization → y [, t → Relu → z]."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (channels_out, channels_in, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["t", "bn_gamma", "bn_beta", "bn_mean", "bn_var"], ["y"], name="bn"),
    ]
    outputs = [tensor("y", [1, channels_out, 8, 8])]
    if extra_consumer:
        nodes.append(helper.make_node("Relu", ["t"], ["z"], name="relu"))
        outputs.append(tensor("z", [1, channels_out, 8, 8]))
    if conv_output_is_graph_output:
        outputs.append(tensor("t", [1, channels_out, 8, 8]))
    return make_model(nodes, [tensor("x", [1, channels_in, 8, 8])], outputs, [const("w", w), *bn_params("bn", channels_out, rng)])

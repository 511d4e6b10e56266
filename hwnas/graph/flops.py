"""Multiply-accumulate and parameter counts of an ONNX model.

MACs are counted for the layers that dominate CNN cost: Conv (grouped and depthwise included),
ConvTranspose, Gemm and MatMul; bias adds, normalisation, activations and pooling count nothing.
Each count is "every output element costs one MAC per weight that reaches it":

    Conv           |Y| · (C_in / group) · k_h · k_w          = |Y| · |W[1:]|
    ConvTranspose  |X| · (C_out / group) · k_h · k_w         = |X| · |W[1:]|
    Gemm, MatMul   |Y| · K

The counts need static shapes, which ONNX shape inference supplies. This module depends on onnx
and numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import onnx
from onnx import TensorProto

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Every tensor's shape after inference; unknown dims are None."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    shapes: dict[str, tuple[int | None, ...]] = {init.name: tuple(init.dims) for init in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            dims = tensor_type.shape.dim
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return shapes


def _shape(shapes: dict[str, tuple[int | None, ...]], tensor: str, node: onnx.NodeProto) -> tuple[int, ...]:
    shape = shapes.get(tensor)
    if shape is None or None in shape:
        raise ValueError(f"node {node.name or node.op_type!r}: tensor {tensor!r} has no static shape")
    return shape  # type: ignore[return-value]


def _node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int | None, ...]]) -> int:
    if node.op_type == "Conv":
        weight = _shape(shapes, node.input[1], node)
        return math.prod(_shape(shapes, node.output[0], node)) * math.prod(weight[1:])
    if node.op_type == "ConvTranspose":
        weight = _shape(shapes, node.input[1], node)
        return math.prod(_shape(shapes, node.input[0], node)) * math.prod(weight[1:])
    if node.op_type == "Gemm":
        trans_a = any(a.name == "transA" and a.i for a in node.attribute)
        a = _shape(shapes, node.input[0], node)
        return math.prod(_shape(shapes, node.output[0], node)) * (a[0] if trans_a else a[1])
    if node.op_type == "MatMul":
        # The reduced dim is A's last one, also for 1-D A.
        return math.prod(_shape(shapes, node.output[0], node)) * _shape(shapes, node.input[0], node)[-1]
    return 0


def count_macs(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, int]:
    """MACs per Conv/ConvTranspose/Gemm/MatMul node, keyed by node name.

    `shapes` maps tensor names to static shapes (`hwnas.graph.shapes.tensor_shapes` gives them for
    models whose shapes ONNX inference cannot resolve); without it ONNX shape inference is used.
    A node without a (unique) name is keyed `<name or op_type>#<index in graph>`. Raises ValueError
    when a shape the count needs is not static.
    """
    shapes = dict(shapes) if shapes is not None else _static_shapes(model)
    macs: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            key = node.name if node.name and node.name not in macs else f"{node.name or node.op_type}#{index}"
            macs[key] = _node_macs(node, shapes)
    return macs


def _constant_elements(node: onnx.NodeProto) -> int:
    for attr in node.attribute:
        if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES:
            return math.prod(attr.t.dims)
        if attr.name == "value_float":
            return 1
        if attr.name == "value_floats":
            return len(attr.floats)
    return 0


def count_params(model: onnx.ModelProto) -> int:
    """Elements of the float initializers that nodes use, plus float Constant-node tensors, plus the
    quantized weights of a QDQ model (the integer initializers DequantizeLinear reads).

    A tensor shared by several nodes counts once. Other integer tensors (shapes, sizes, indices) and
    quantization scales and zero points are not parameters. Only the top-level graph is inspected.
    """
    graph = model.graph
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    quant_params = {name for n in qdq for name in n.input[1:]}
    quantized = {n.input[0] for n in qdq if n.op_type == "DequantizeLinear"}
    used = {name for node in graph.node for name in node.input} - quant_params
    weights = [init for init in graph.initializer
               if init.name in used and (init.data_type in _FLOAT_TYPES or init.name in quantized)]
    constants = [node for node in graph.node if node.op_type == "Constant"]
    return sum(math.prod(init.dims) for init in weights) + sum(map(_constant_elements, constants))

"""Weights in `Constant` nodes become initializers, so every later layer sees one kind of weight.

Paddle exports (both PP-OCR models in the test corpus) keep all weights in `Constant` nodes and have no
initializers at all. Lifting them is exact: a Constant node's output *is* its value, and an initializer of
the same name is the same tensor to every consumer. Only top-level nodes are lifted; subgraphs of
If/Loop are left as they are.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_SCALAR_ATTRS = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


def denormal_mask(values: np.ndarray) -> np.ndarray:
    """Where `values` (a float array) is denormal: non-zero and smaller in magnitude than its dtype's tiny."""
    return (values != 0) & (np.abs(values) < np.finfo(values.dtype).tiny)


def constant_node_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a Constant node produces, or None for forms we do not lift (sparse, strings)."""
    for attr in node.attribute:
        if attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
            return tensor
        if attr.name in _SCALAR_ATTRS:
            value = np.array(helper.get_attribute_value(attr), dtype=_SCALAR_ATTRS[attr.name])
            return numpy_helper.from_array(value, node.output[0])
    return None


def constant_node_signature(node: onnx.NodeProto) -> tuple[int, tuple[int, ...]] | None:
    """(element type, dims) of what `constant_node_value` would return, without copying the tensor."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t.data_type, tuple(attr.t.dims)
        if attr.name in _SCALAR_ATTRS:
            dtype = np.dtype(_SCALAR_ATTRS[attr.name])
            shape = np.shape(helper.get_attribute_value(attr))
            return helper.np_dtype_to_tensor_dtype(dtype), tuple(shape)
    return None


def is_liftable(node: onnx.NodeProto) -> bool:
    """A top-level node that `lift_constants` turns into an initializer."""
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx") and constant_node_signature(node) is not None


def lift_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of `model` whose top-level Constant nodes are initializers.

    The copy holds copies of the weights held in memory; a lazily loaded model's big weights are
    references to its data file (hwnas.graph.io), so copying it costs little.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept, lifted = [], []
    for node in out.graph.node:
        value = constant_node_value(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if value is None:
            kept.append(node)
        else:
            lifted.append(value)
    if lifted:
        del out.graph.node[:]
        out.graph.node.extend(kept)
        out.graph.initializer.extend(lifted)
    return out

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


def lift_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of `model` whose top-level Constant nodes are initializers."""
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

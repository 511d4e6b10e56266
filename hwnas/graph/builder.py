"""The one graph-building vocabulary: an ONNX graph under construction, every tensor's shape tracked.

The model zoo (`hwnas.models._builder.ZooBuilder`) and the estimator's profiling networks
(`hwnas.estimator.networks.NetworkBuilder`) add their own layers on top: the zoo names every node and
tracks activation power for trained-looking BN statistics, the profiling networks name nodes by scope
and count MACs. Both draw weights from the builder's one seeded Generator in construction order, so a
model is a pure function of its options and seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


class GraphBuilder:
    """Appends graph inputs, initializers and single-output nodes; `model()` returns the ModelProto."""

    producer = ""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.scope = "n"  # the prefix of automatic node names

    def input(self, name: str, shape: Sequence[int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        self.shapes[name] = tuple(shape)
        return name

    def initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: Sequence[str], shape: Sequence[int], name: str | None = None, **attrs) -> str:
        """One node whose output tensor carries the node's name (`scope/op<index>` when none is given)."""
        name = name or f"{self.scope}/{op.lower()}{len(self.nodes)}"
        if name in self.shapes:
            raise ValueError(f"duplicate tensor name {name!r}")
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        self.shapes[name] = tuple(shape)
        return name

    def model(self, outputs: Sequence[str], graph_name: str = "network") -> onnx.ModelProto:
        values = [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(self.shapes[o])) for o in outputs]
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, values, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        if self.producer:
            model.producer_name = self.producer
        return model

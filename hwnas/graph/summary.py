"""Numbers for a before/after table: nodes, parameters and MACs of a model at given input shapes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from hwnas.graph.flops import count_macs, count_params
from hwnas.graph.shapes import Shape, tensor_shapes


@dataclass(frozen=True)
class ModelSummary:
    nodes: int
    params: int
    macs: int | None  # None when some shape is not static even at the given input shapes
    op_counts: dict[str, int]

    def to_dict(self) -> dict:
        return {"nodes": self.nodes, "params": self.params, "macs": self.macs, "op_counts": self.op_counts}


def summarize(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> ModelSummary:
    ops = Counter(n.op_type for n in model.graph.node if n.op_type != "Constant")
    try:
        macs = sum(count_macs(model, tensor_shapes(model, shapes)).values())
    except ValueError:
        macs = None
    return ModelSummary(sum(ops.values()), count_params(model), macs, dict(sorted(ops.items())))

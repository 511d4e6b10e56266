"""Memory footprint: parameter bytes and peak activation bytes over the execution order.

Parameters are every constant tensor the graph reads (initializers and `Constant`-node values alike,
since the graph layer lifts the latter), each counted once however many nodes share it, by dtype.

Activations: ONNX Runtime runs nodes in graph order, so a tensor is alive from the step of the node
that produces it to the step of its last consumer; graph inputs are alive from the first step, graph
outputs to the last. At step i the live set is every tensor whose interval contains i (the node's
inputs and outputs included: a kernel reads and writes at the same time). The peak is the largest live
set. This is the conservative figure: runtimes may run some elementwise ops in place (Relu, Clip,
Add, Mul, BatchNormalization... reuse an input buffer whose last use they are) and so can need less;
we do not assume it, because whether they do depends on the runtime and the execution provider.

A lower bound for any order is the largest single step: a node's inputs and outputs must coexist.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from hwnas.graph.constants import constant_node_signature, is_liftable
from hwnas.graph.io import graph_inputs
from hwnas.graph.shapes import Shape, infer_tensors

_DEFAULT_ITEMSIZE = 4  # tensors whose type inference cannot name are assumed float32


@dataclass(frozen=True)
class Step:
    """One node of an execution order, by tensor names."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class ActivationPeak:
    bytes: int
    step: int  # index in the execution order
    node: str
    alive: tuple[tuple[str, int], ...]  # (tensor, bytes) alive at the peak, largest first
    lower_bound: int  # no order can do better than this


@dataclass(frozen=True)
class MemoryFootprint:
    params_bytes: int
    params_bytes_by_dtype: dict[str, int]
    peak: ActivationPeak

    @property
    def peak_activation_bytes(self) -> int:
        return self.peak.bytes

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.peak.bytes

    def to_dict(self) -> dict:
        return {
            "params_bytes": self.params_bytes,
            "params_bytes_by_dtype": self.params_bytes_by_dtype,
            "peak_activation_bytes": self.peak.bytes,
            "peak_node": self.peak.node,
            "peak_tensors": [{"name": n, "bytes": b} for n, b in self.peak.alive],
        }


def peak_activation(
    steps: Sequence[Step], sizes: Mapping[str, int], inputs: Sequence[str], outputs: Sequence[str]
) -> ActivationPeak:
    """Peak live bytes of executing `steps` in order (tensors missing from `sizes` are weights: 0)."""
    last = len(steps) - 1
    start: dict[str, int] = {name: 0 for name in inputs}
    end: dict[str, int] = {}
    for i, step in enumerate(steps):
        for name in step.outputs:
            start.setdefault(name, i)
            end.setdefault(name, i)
        for name in step.inputs:
            if name in start:
                end[name] = i
    for name in list(inputs) + list(outputs):
        if name in start:
            end[name] = last if name in outputs else end.get(name, 0)
    delta = np.zeros(len(steps) + 1, dtype=np.int64)
    for name, s in start.items():
        b = sizes.get(name, 0)
        delta[s] += b
        delta[end.get(name, s) + 1] -= b
    live = np.cumsum(delta[:-1])
    i = int(np.argmax(live)) if len(live) else 0
    alive = sorted(
        ((n, sizes.get(n, 0)) for n, s in start.items() if s <= i <= end.get(n, s) and sizes.get(n, 0)),
        key=lambda item: -item[1],
    )
    bound = max((sum(sizes.get(t, 0) for t in set(st.inputs) | set(st.outputs)) for st in steps), default=0)
    return ActivationPeak(int(live[i]) if len(live) else 0, i, steps[i].name if steps else "", tuple(alive), bound)


def steps_of(model: onnx.ModelProto) -> list[Step]:
    """The execution order of a model's top-level graph; If/Loop bodies' outer reads count as inputs."""
    steps = []
    for i, node in enumerate(model.graph.node):
        reads = [t for t in node.input if t] + sorted(_outer_reads(node))
        steps.append(Step(node.name or f"{node.op_type}#{i}", tuple(reads), tuple(t for t in node.output if t)))
    return steps


def _outer_reads(node: onnx.NodeProto) -> set[str]:
    reads: set[str] = set()
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            local = {t.name for t in sub.initializer} | {i.name for i in sub.input}
            local |= {o for n in sub.node for o in n.output}
            for n in sub.node:
                reads |= {t for t in n.input if t and t not in local} | (_outer_reads(n) - local)
            reads |= {o.name for o in sub.output if o.name not in local}
    return reads


def activation_sizes(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> dict[str, int]:
    """Bytes of every non-constant tensor at the given input shapes, in the type it is stored in.

    In a QDQ model the float tensors around a quantized kernel never exist at run time (ORT fuses
    DQ → Conv → Q into QLinearConv; an int8 NPU reads and writes int8), as `hwnas.targets.kernels`
    costs them: a DequantizeLinear's output counts in its input's type (nothing for a weight's, which is
    folded into its kernel), a tensor read only by QuantizeLinear nodes in their output's type."""
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in graph.output}
    all_shapes, types = infer_tensors(model, shapes)

    def stored_type(name: str) -> int | None:
        node = producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            return types.get(node.input[0])
        users = readers.get(name, ())
        if users and name not in outputs and all(u.op_type == "QuantizeLinear" for u in users):
            return types.get(users[0].output[0])
        return types.get(name)

    weights = constants | {
        n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants
    }
    return {
        name: int(np.prod(shape, dtype=np.int64)) * _itemsize(stored_type(name))
        for name, shape in all_shapes.items()
        if name not in weights
    }


def _itemsize(elem_type: int | None) -> int:
    if not elem_type:
        return _DEFAULT_ITEMSIZE
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


def params_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of the constant tensors the graph reads, by dtype name; shared tensors count once.

    Initializers and liftable Constant-node values (what `lift_constants` would lift), counted from
    their declared type and dims: no weight is read or copied.
    """
    graph = model.graph
    used = {t for n in graph.node for t in n.input} | {t for n in graph.node for t in _outer_reads(n)}
    weights = [(t.name, t.data_type, tuple(t.dims)) for t in graph.initializer]
    weights += [(n.output[0], *constant_node_signature(n)) for n in graph.node if is_liftable(n)]
    by_dtype: dict[str, int] = defaultdict(int)
    for name, data_type, dims in weights:
        if name in used:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
            by_dtype[dtype.name] += int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    return dict(sorted(by_dtype.items()))


def footprint(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> MemoryFootprint:
    by_dtype = params_bytes(model)
    peak = peak_activation(
        steps_of(model),
        activation_sizes(model, shapes),
        [i.name for i in graph_inputs(model)],
        [o.name for o in model.graph.output],
    )
    return MemoryFootprint(sum(by_dtype.values()), by_dtype, peak)

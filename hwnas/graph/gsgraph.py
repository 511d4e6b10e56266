"""Between ONNX protobufs and onnx-graphsurgeon graphs, the representation passes work on.

`to_graph` lifts Constant-node weights to initializers first, so a weight is always a `gs.Constant`
whatever the exporter did. `to_model` restores what a drop-in replacement must keep: the original's IR
version, opset imports, metadata and the exact input/output declarations (dynamic dims included).
Stale `value_info` is dropped because rewrites change channel counts.
"""

from __future__ import annotations

import heapq
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from hwnas.graph.constants import lift_constants


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    graph = gs.import_onnx(lift_constants(model))
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in graph.inputs and tensor not in graph.outputs:
            tensor.shape = None  # recomputed on demand; a pass must never trust a stale shape
    return graph


def stable_toposort(graph: gs.Graph) -> gs.Graph:
    """Order nodes topologically, keeping the current order wherever it is already valid.

    onnx-graphsurgeon's own toposort sorts by depth level, which interleaves branches and can raise
    peak activation memory (ORT runs nodes in this order); here a node only moves when one of its
    inputs is produced later (Kahn's algorithm with the current position as priority).
    """
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    producers = {id(n): {id(t.inputs[0]) for t in n.inputs if t.inputs and id(t.inputs[0]) in position} for n in graph.nodes}
    for n in graph.nodes:  # an If/Loop body may read outer tensors: they are inputs of the node too
        for sub in n.attrs.values():
            if isinstance(sub, gs.Graph):
                for t in sub._foreign_tensors().values():
                    if t.inputs and id(t.inputs[0]) in position:
                        producers[id(n)].add(id(t.inputs[0]))
    users: dict[int, list] = {id(n): [] for n in graph.nodes}
    for n in graph.nodes:
        for p in producers[id(n)]:
            users[p].append(n)
    waiting = {id(n): len(producers[id(n)]) for n in graph.nodes}
    ready = [(position[id(n)], n) for n in graph.nodes if waiting[id(n)] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, node = heapq.heappop(ready)
        order.append(node)
        for user in users[id(node)]:
            waiting[id(user)] -= 1
            if waiting[id(user)] == 0:
                heapq.heappush(ready, (position[id(user)], user))
    if len(order) != len(graph.nodes):
        raise ValueError("graph has a cycle")
    graph.nodes = order
    return graph


def to_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    stable_toposort(graph.cleanup(remove_unused_graph_inputs=False))
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = template.ir_version
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(template, field))
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    declared = {v.name: v for v in list(template.graph.input) + list(template.graph.output)}
    for values in (model.graph.input, model.graph.output):
        for value in values:
            if value.name in declared:
                value.CopyFrom(declared[value.name])
    del model.graph.value_info[:]
    return model


def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a weight tensor, or None when it is computed at run time."""
    return tensor.values if isinstance(tensor, gs.Constant) else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def unique_name(graph: gs.Graph, base: str) -> str:
    taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"

"""Control flow as compute: If and Loop bodies inlined into the top-level graph for estimation.

Kernels, parameters and activation memory are counted on a model's top-level graph; the work inside an
If branch or a Loop body would count as nothing ("0 ms, 1 B of params"). `flatten_control_flow` returns
an equivalent-for-costing model without control flow:

- If: the branch the model takes when the condition is a constant (an initializer or a Constant node);
  otherwise the costliest branch by `cost` (MACs by default), with a warning.
- Loop: the body inlined once, its nodes marked to repeat by the trip count when it is a constant
  (`repeats`: estimators multiply those kernels' latency); otherwise once, with a warning. The
  iteration number is 0 and the condition true; scan outputs get their leading axis (of length 1).
- Scan is left as it is, with a warning: its work is not counted.

Branch-local tensors and nodes are renamed `<control node>/<name>` so that they cannot collide with the
outer graph's; reads of outer tensors keep their names. The result is for costing only, never written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hwnas.graph.flops import count_macs
from hwnas.graph.shapes import Shape, tensor_shapes

CONTROL_FLOW = ("If", "Loop", "Scan")
_MAX_ROUNDS = 32  # nesting depth it will unfold; deeper models keep the rest with a warning


@dataclass
class FlatModel:
    model: onnx.ModelProto
    repeats: dict[str, int] = field(default_factory=dict)  # node name -> times it runs per inference
    warnings: list[str] = field(default_factory=list)


def has_control_flow(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("If", "Loop") for n in model.graph.node)


def flatten_control_flow(
    model: onnx.ModelProto,
    shapes: Mapping[str, Shape],
    cost: Callable[[onnx.ModelProto], float] | None = None,
) -> FlatModel:
    """`model` with its If/Loop nodes inlined (see the module docstring); `model` itself is not changed."""
    warnings = [f"Scan {n.name or '?'}: its body is not counted (latency, params, memory)"
                for n in model.graph.node if n.op_type == "Scan"]
    if not has_control_flow(model):
        return FlatModel(model, {}, warnings)
    cost = cost or (lambda m: float(sum(count_macs(m, tensor_shapes(m, shapes)).values())))
    flat = onnx.ModelProto()
    flat.CopyFrom(model)
    repeats: dict[str, int] = {}
    for _ in range(_MAX_ROUNDS):
        index = next((i for i, n in enumerate(flat.graph.node) if n.op_type in ("If", "Loop")), None)
        if index is None:
            break
        node = flat.graph.node[index]
        times = repeats.pop(node.name, 1)
        if node.op_type == "If":
            flat, inlined = _inline_if(flat, index, cost, warnings)
        else:
            flat, inlined, trips = _inline_loop(flat, index, warnings)
            times *= trips
        for name in inlined:
            repeats[name] = repeats.get(name, 1) * times
    else:
        warnings.append(f"control flow nested deeper than {_MAX_ROUNDS} levels: the rest is not counted")
    return FlatModel(flat, {k: v for k, v in repeats.items() if v != 1}, warnings)


def _constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output and n.output[0] == name:
            for attr in n.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0]})"


def _inline_if(model, index, cost, warnings):
    node = model.graph.node[index]
    branches = {a.name: a.g for a in node.attribute if a.name in ("then_branch", "else_branch")}
    condition = _constant_value(model, node.input[0])
    if condition is not None:
        taken = "then_branch" if bool(np.asarray(condition).reshape(-1)[0]) else "else_branch"
        return _splice(model, index, branches[taken], {})
    candidates = {key: _splice(model, index, g, {}) for key, g in branches.items()}
    costs = {key: cost(m) for key, (m, _) in candidates.items()}
    taken = max(costs, key=costs.get)
    warnings.append(f"If {_label(node)}: the condition is not known statically; counted its costlier branch "
                    f"({taken.split('_')[0]})")
    return candidates[taken]


def _inline_loop(model, index, warnings):
    node = model.graph.node[index]
    body = next(a.g for a in node.attribute if a.name == "body")
    trips = _constant_value(model, node.input[0]) if node.input and node.input[0] else None
    if trips is None:
        warnings.append(f"Loop {_label(node)}: the trip count is not known statically; counted once")
        count = 1
    else:
        count = max(int(np.asarray(trips).reshape(-1)[0]), 0)
    prefix = _prefix(node)
    iteration = helper.make_tensor(f"{prefix}/iteration", onnx.TensorProto.INT64, [], [0])
    proceed = helper.make_tensor(f"{prefix}/condition", onnx.TensorProto.BOOL, [], [True])
    carried = list(node.input[2:])
    bound = {body.input[0].name: iteration.name, body.input[1].name: proceed.name}
    bound.update({b.name: outer for b, outer in zip(body.input[2:], carried)})
    model, inlined = _splice(model, index, body, bound, skip_outputs=1, extra=[iteration, proceed],
                             scan_outputs=len(body.output) - 1 - len(carried))
    return model, inlined, count


def _prefix(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type.lower()}_{node.output[0]}"


def _splice(model, index, body: onnx.GraphProto, bound: Mapping[str, str], skip_outputs: int = 0,
            extra: Sequence[onnx.TensorProto] = (), scan_outputs: int = 0):
    """`model` with node `index` replaced by `body`'s nodes; `bound` maps body inputs to outer tensors."""
    node = model.graph.node[index]
    prefix = _prefix(node)
    local = {t.name for t in body.initializer} | {o for n in body.node for o in n.output if o}
    rename = {name: f"{prefix}/{name}" for name in local}
    rename.update(bound)
    nodes = [_renamed(n, rename, prefix) for n in body.node]
    outputs = [rename.get(o.name, o.name) for o in body.output[skip_outputs:]]
    carried = len(outputs) - scan_outputs
    for i, (inner, outer) in enumerate(zip(outputs, node.output)):
        if not outer:
            continue
        if i < carried:
            nodes.append(helper.make_node("Identity", [inner], [outer], name=f"{prefix}/out{i}"))
        else:  # a scan output stacks the iterations along a new leading axis
            axes = f"{prefix}/out{i}_axes"
            extra = [*extra, numpy_helper.from_array(np.array([0], np.int64), axes)]
            nodes.append(helper.make_node("Unsqueeze", [inner, axes], [outer], name=f"{prefix}/out{i}"))
    initializers = [_renamed_tensor(t, rename[t.name]) for t in body.initializer] + list(extra)
    flat = onnx.ModelProto()
    flat.CopyFrom(model)
    del flat.graph.node[:]
    flat.graph.node.extend([*model.graph.node[:index], *nodes, *model.graph.node[index + 1:]])
    flat.graph.initializer.extend(initializers)
    return flat, [n.name for n in nodes]


def _renamed_tensor(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    out = onnx.TensorProto()
    out.CopyFrom(tensor)
    out.name = name
    return out


def _renamed(node: onnx.NodeProto, rename: Mapping[str, str], prefix: str) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    out.name = f"{prefix}/{node.name or node.op_type + '_' + node.output[0]}"
    out.input[:] = [rename.get(t, t) if t else t for t in node.input]
    out.output[:] = [rename.get(t, t) if t else t for t in node.output]
    for attr in out.attribute:  # a nested body may read this body's tensors by name
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            _rename_reads(sub, rename)
    return out


def _rename_reads(graph: onnx.GraphProto, rename: Mapping[str, str]) -> None:
    local = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {
        o for n in graph.node for o in n.output}
    for n in graph.node:
        n.input[:] = [rename.get(t, t) if t and t not in local else t for t in n.input]
        for attr in n.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _rename_reads(sub, {k: v for k, v in rename.items() if k not in local})
    for o in graph.output:
        if o.name not in local and o.name in rename:
            o.name = rename[o.name]

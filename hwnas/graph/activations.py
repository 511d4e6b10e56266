"""Recognising an activation function in an exported graph, whatever nodes the exporter wrote for it.

One function can reach ONNX in several forms, and the pattern matchers must see them all as "an
activation":

    relu                  Relu(x)
    relu6 / clip          Clip(x, 0, 6) / other bounds: attributes before opset 11, constant inputs since
    hardswish             HardSwish(x)
    hardsigmoid_mul       Mul(x, HardSigmoid(x))
    silu                  Mul(x, Sigmoid(x))                       (SiLU, Swish)
    hardswish_decomposed  x · Clip(x + 3, 0, 6) / 6                (Paddle: Add, Clip, Mul, Div; the
                          division may come first, or be a Mul by 1/6, and operands in either order)
    <op in snake case>    any other one-node pointwise non-linearity (sigmoid, leaky_relu, gelu, ...)

A multi-node form is accepted only when it is self-contained: none of its intermediate tensors is a graph
output or feeds a node outside it, so replacing the nodes by one activation cannot change anything else.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from hwnas.graph.gsgraph import const_value, is_graph_output

# One-node element-wise non-linearities, by op type. Relu6 and Clip are handled apart (bounds).
_SINGLE_NODE = {
    "Relu": "relu",
    "HardSwish": "hardswish",
    "HardSigmoid": "hardsigmoid",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "LeakyRelu": "leaky_relu",
    "PRelu": "prelu",
    "Elu": "elu",
    "Selu": "selu",
    "Celu": "celu",
    "Softplus": "softplus",
    "Gelu": "gelu",
    "Mish": "mish",
}
# x · gate(x) forms, by the gate's op type.
_GATED = {"Sigmoid": "silu", "HardSigmoid": "hardsigmoid_mul"}


@dataclass(frozen=True)
class ActivationMatch:
    """An activation spanning `nodes` (names, in execution order) from tensor `input` to tensor `output`."""

    kind: str
    nodes: tuple[str, ...]
    input: str
    output: str
    graph_nodes: tuple[gs.Node, ...] = field(compare=False, repr=False)  # the nodes, for passes that rewrite them

    @property
    def output_tensor(self) -> gs.Tensor:
        return self.graph_nodes[-1].outputs[0]


def match_activation(graph: gs.Graph, tensor: gs.Tensor) -> ActivationMatch | None:
    """The activation that `tensor` feeds, or None. Multi-node forms are tried before their parts."""
    for nodes, kind in _candidates(tensor):
        if self_contained(graph, nodes):
            names = tuple(n.name for n in nodes)
            return ActivationMatch(kind, names, tensor.name, nodes[-1].outputs[0].name, tuple(nodes))
    return None


def _candidates(x: gs.Tensor) -> Iterator[tuple[list[gs.Node], str]]:
    yield from _decomposed_hardswish(x)
    yield from _gated(x)
    for node in x.outputs:
        kind = _single_node_kind(node)
        if kind is not None and node.inputs[0] is x:
            yield [node], kind


def _single_node_kind(node: gs.Node) -> str | None:
    if node.op == "Clip":
        bounds = clip_bounds(node)
        if bounds is None:
            return None
        return "relu6" if bounds == (0.0, 6.0) else "clip"
    return _SINGLE_NODE.get(node.op)


def clip_bounds(node: gs.Node) -> tuple[float | None, float | None] | None:
    """(min, max) of a Clip, None for a missing side; None when a bound is computed at run time."""
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return node.attrs.get("min"), node.attrs.get("max")
    bounds: list[float | None] = []
    for i in (1, 2):
        if i >= len(node.inputs) or not node.inputs[i].name:  # omitted optional input
            bounds.append(None)
            continue
        value = _scalar(node.inputs[i])
        if value is None:
            return None
        bounds.append(value)
    return bounds[0], bounds[1]


def _scalar(tensor: gs.Tensor) -> float | None:
    """The value of a one-element constant, else None."""
    value = const_value(tensor)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _gated(x: gs.Tensor) -> Iterator[tuple[list[gs.Node], str]]:
    for gate in x.outputs:
        if gate.op in _GATED and gate.inputs[0] is x:
            for mul in _muls_of(x, gate.outputs[0]):
                yield [gate, mul], _GATED[gate.op]


def _decomposed_hardswish(x: gs.Tensor) -> Iterator[tuple[list[gs.Node], str]]:
    """x · Clip(x + 3, 0, 6) / 6, with the /6 (a Div or a Mul by 1/6) before or after the Mul by x."""
    for add in x.outputs:
        if add.op != "Add" or _other_scalar(add, x) != 3.0:
            continue
        for clip in add.outputs[0].outputs:
            if clip.op != "Clip" or clip.inputs[0] is not add.outputs[0] or clip_bounds(clip) != (0.0, 6.0):
                continue
            relu6 = clip.outputs[0]
            for mul in _muls_of(x, relu6):
                for scale in mul.outputs[0].outputs:
                    if _divides_by_six(scale, mul.outputs[0]):
                        yield [add, clip, mul, scale], "hardswish_decomposed"
            for scale in relu6.outputs:
                if _divides_by_six(scale, relu6):
                    for mul in _muls_of(x, scale.outputs[0]):
                        yield [add, clip, scale, mul], "hardswish_decomposed"


def _muls_of(a: gs.Tensor, b: gs.Tensor) -> Iterator[gs.Node]:
    """Mul nodes computing a · b, in either operand order."""
    for node in b.outputs:
        if node.op == "Mul" and len(node.inputs) == 2 and {id(t) for t in node.inputs} == {id(a), id(b)} and a is not b:
            yield node


def _other_scalar(node: gs.Node, x: gs.Tensor) -> float | None:
    """For a binary node with `x` as one operand, the value of the other if it is a scalar constant."""
    if len(node.inputs) != 2:
        return None
    if node.inputs[0] is x:
        return _scalar(node.inputs[1])
    return _scalar(node.inputs[0]) if node.inputs[1] is x else None


def _divides_by_six(node: gs.Node, x: gs.Tensor) -> bool:
    if node.op == "Div":
        return node.inputs[0] is x and _scalar(node.inputs[1]) == 6.0
    if node.op == "Mul":
        value = _other_scalar(node, x)
        return value is not None and bool(np.isclose(value, 1.0 / 6.0, rtol=1e-6))
    return False


def self_contained(graph: gs.Graph, nodes: list[gs.Node]) -> bool:
    """No intermediate tensor of `nodes` (all outputs but the last node's) is seen outside them."""
    inside = {id(n) for n in nodes}
    for node in nodes[:-1]:
        for out in node.outputs:
            if is_graph_output(graph, out) or any(id(user) not in inside for user in out.outputs):
                return False
    return True

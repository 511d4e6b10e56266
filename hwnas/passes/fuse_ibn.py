"""fuse-ibn: merge two convs with nothing non-linear between them into one conv (mode=linear, exact).

Before → After::

    (a)  x ─► Conv 1×1 (W₁, b₁) ─► Conv 1×1 (P, b₂) ─► y      a block's linear project and the next
         x ─► Conv 1×1 (P·W₁, P·b₁ + b₂) ──────────► y      block's expand, when no residual joins them
    (b)  x ─► Conv K×K depthwise (D, b₁) ─► Conv 1×1 (P, b₂) ─► y
         x ─► Conv K×K (W, P·b₁ + b₂) ─────────────────────► y   W[o, c] = P[o, c]·D[c]

The math: the second conv is a matrix P (N × M) applied at every pixel, so
y = P·(W₁∗x + b₁) + b₂ = (P·W₁)∗x + (P·b₁ + b₂), where P·W₁ contracts P with the first conv's weight
written densely (`regroup_weight` to one group: a depthwise D becomes a diagonal, so (P·W₁)[o, c] =
P[o, c]·D[c]). The fused conv keeps the first conv's kernel, pads, strides and dilations: its padding
zeros pass through the linear map unchanged, and a 1×1 stride only subsamples.

Skipped, with the reason: something between the convs (an activation is not linear; a
BatchNormalization or Mul/Add affine is, but must be folded first: run fold-bn / fold-affine before),
the first conv's output with another consumer (a residual Add) or being a graph output, a weight not
constant or shared with another node, a second conv that is not 1×1 with group 1, stride 1 and no
pads, and a first conv that is neither 1×1 with group 1 nor depthwise.

A 1×1 conv is looked at when its input comes from a conv directly or through one node with a single
non-constant input (an activation, a BN, an affine); other 1×1 convs (after an Add, a Concat, a graph
input) are not listed. Sites may chain (1×1 → 1×1 → 1×1): each fusion reads the first conv of its pair
from the graph as it is when it applies, so any subset of sites fuses correctly.

mode=mbconv (Fused-MBConv, reconstructed) is planned; a mode is a matcher, a rewrite and an exactness
class in `_MODES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from hwnas.graph.gsgraph import const_value, producer, unique_name
from hwnas.passes.base import Exactness, Pass, PassContext, PassResult, Site, option
from hwnas.passes.fold_bn import absorb_output, check_linear_producer, private_constant
from hwnas.passes.registry import register_pass
from hwnas.passes.replace_conv import is_depthwise, regroup_weight

_FOLD_FIRST = {"BatchNormalization": "fold-bn", "Mul": "fold-affine", "Add": "fold-affine"}


def _kernel(node: gs.Node) -> tuple[int, ...] | None:
    """The conv's kernel size from its attribute or its constant weight; None when neither says."""
    if "kernel_shape" in node.attrs:
        return tuple(node.attrs["kernel_shape"])
    weight = const_value(node.inputs[1])
    return tuple(weight.shape[2:]) if weight is not None else None


def _is_1x1(node: gs.Node) -> bool:
    kernel = _kernel(node)
    return kernel is not None and all(k == 1 for k in kernel)


def _is_plain_pointwise(node: gs.Node) -> bool:
    """A 1×1 conv that is one matrix applied at every pixel: group 1, stride 1, no pads."""
    return (
        node.attrs.get("group", 1) == 1
        and _is_1x1(node)
        and all(s == 1 for s in node.attrs.get("strides", []))
        and not any(node.attrs.get("pads", []))
    )


def _single_variable_input(node: gs.Node) -> gs.Tensor | None:
    variables = [t for t in node.inputs if t.name and const_value(t) is None]
    return variables[0] if len(variables) == 1 else None


def _between(second: gs.Node) -> tuple[gs.Node | None, gs.Node | None]:
    """(the conv before `second`, the one node between them or None), or (None, None) when no conv is near."""
    before = producer(second.inputs[0])
    if before is None or before.op == "Conv":
        return before, None
    tensor = _single_variable_input(before)
    first = producer(tensor) if tensor is not None else None
    return (first, before) if first is not None and first.op == "Conv" else (None, None)


def _check_second(graph: gs.Graph, second: gs.Node) -> str | None:
    for weight in second.inputs[1:]:
        reason = private_constant(graph, weight, second)
        if reason:
            return reason
    if not _is_plain_pointwise(second):
        return f"{second.name} is not a 1×1 conv with group 1, stride 1 and no pads"
    return None


def _check_first(first: gs.Node) -> str | None:
    weight = const_value(first.inputs[1])
    if is_depthwise(first, weight) or (first.attrs.get("group", 1) == 1 and _is_1x1(first)):
        return None
    kernel, group = "×".join(map(str, _kernel(first))), first.attrs.get("group", 1)
    return f"{first.name} is a {kernel} conv with group {group}: only a 1×1 conv with group 1 or a depthwise conv fuses"


def _reason_linear(graph: gs.Graph, first: gs.Node, middle: gs.Node | None, second: gs.Node) -> str | None:
    if middle is not None:
        if middle.op in _FOLD_FIRST:
            return f"{middle.op} {middle.name} between the convs: run {_FOLD_FIRST[middle.op]} first"
        return f"{middle.op} {middle.name} between the convs (only a conv feeding a conv directly fuses)"
    return _check_second(graph, second) or check_linear_producer(graph, first, second) or _check_first(first)


def _describe(first: gs.Node, second: gs.Node) -> str:
    weight = const_value(first.inputs[1])
    kind = "depthwise " if weight is not None and is_depthwise(first, weight) else ""
    kernel = "×".join(map(str, _kernel(first) or ("?",)))
    return f"{kind}{kernel} Conv {first.name} → 1×1 Conv {second.name}"


def match_linear(graph: gs.Graph, ctx: PassContext) -> list[Site]:
    sites = []
    for second in graph.nodes:
        if second.op != "Conv" or not _is_1x1(second):
            continue
        first, middle = _between(second)
        if first is None:
            continue
        reason = _reason_linear(graph, first, middle, second)
        sites.append(Site((first.name, second.name), _describe(first, second), reason, second))
    return sites


def _bias(node: gs.Node, channels: int) -> np.ndarray:
    return const_value(node.inputs[2]).astype(np.float64) if len(node.inputs) > 2 else np.zeros(channels)


def fuse_linear(graph: gs.Graph, first: gs.Node, second: gs.Node) -> None:
    """`first` becomes the fused conv and takes over `second`'s output."""
    w1 = const_value(first.inputs[1])
    dense = regroup_weight(w1, first.attrs.get("group", 1), 1).astype(np.float64)
    p = const_value(second.inputs[1]).astype(np.float64)
    p = p.reshape(p.shape[:2])
    weight = np.tensordot(p, dense, axes=(1, 0)).astype(w1.dtype)
    bias = (p @ _bias(first, p.shape[1]) + _bias(second, p.shape[0])).astype(w1.dtype)
    fused_inputs = [
        first.inputs[0],
        gs.Constant(unique_name(graph, f"{first.name}_{second.name}_fused_weight"), weight),
    ]
    if len(first.inputs) > 2 or len(second.inputs) > 2:
        fused_inputs.append(gs.Constant(unique_name(graph, f"{first.name}_{second.name}_fused_bias"), bias))
    first.inputs.clear()
    first.inputs.extend(fused_inputs)
    first.attrs["group"] = 1
    absorb_output(first, second)


def apply_linear(graph: gs.Graph, sites: list[Site], ctx: PassContext) -> dict[str, float]:
    for site in sites:
        second = site.data
        # read the first conv now: an earlier site of a chain may have fused it already
        fuse_linear(graph, producer(second.inputs[0]), second)
    return {"fused": len(sites)}


class _Mode(NamedTuple):
    """What a mode is; the context carries the calibration data a reconstructed mode fits on."""

    match: Callable[[gs.Graph, PassContext], list[Site]]
    apply: Callable[[gs.Graph, list[Site], PassContext], dict[str, float]]  # returns statistics
    exactness: Exactness


_MODES = {"linear": _Mode(match_linear, apply_linear, Exactness.EXACT)}


@dataclass(frozen=True)
class FuseIbnOptions:
    mode: str = option("linear", "linear: exact fusion of convs with nothing non-linear between them", tuple(_MODES))


@register_pass
class FuseIbn(Pass):
    name = "fuse-ibn"
    summary = "fuse two convs with nothing non-linear between them (1×1 → 1×1, depthwise → 1×1) into one conv"
    Options = FuseIbnOptions

    @property
    def exactness(self) -> Exactness:
        return _MODES[self.options.mode].exactness

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        return _MODES[self.options.mode].match(graph, ctx)

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        stats = _MODES[self.options.mode].apply(graph, sites, ctx)
        return PassResult(graph, bool(sites), stats)

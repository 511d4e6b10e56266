"""replace-conv: depthwise conv → grouped conv with G channels per group, or → dense conv (exact).

Before → After (C = 32, G = 16)::

    x ─► Conv(W: [32, 1, K, K], group=32) ─► y
    x ─► Conv(W': [32, 16, K, K], group=2) ─► y           (mode=dense: W': [32, 32, K, K], group=1)

The math: a conv with `group` = g splits its C input channels into g consecutive blocks of C/g and its
M output channels into g blocks of M/g; output o sees only the inputs of its block. Regrouping to
g' | g (fewer, wider groups) keeps each output's weights at the same input channels and puts zeros at
the inputs its old group did not see: W'[o, j] = W[o, j − d(o)] for d(o) ≤ j < d(o) + C/g, else 0,
where d(o) = (start of o's old input block) − (start of o's new input block). For a depthwise conv
(W: [C, 1, K, K]) with G channels per group this is W'[o, j] = W[o, 0] if j = o mod G, else 0: a
block-diagonal weight, and for mode=dense a diagonal one. The zeros add exact zero terms, so the output
is the same up to float re-association. Bias, pads, strides, dilations and auto_pad are kept.

Options: `mode=grouped` (default) with `group_size=G`, the input channels per group; G must divide C
(the site is skipped otherwise: "C=30 not divisible by group_size=16"). `group_size=0` (default) picks,
per site, the largest divisor of C not above 16 (the parallelism factor of the smallest simulated
array, npu-16x16), and skips a site whose C has no divisor between 2 and 16. A depthwise conv with a
depth multiplier m (M = m·C outputs) is handled too: each group then has G inputs and m·G outputs.
`mode=dense` makes one group and takes no group_size.

Choosing G per site: a pipeline may hold the pass several times, each step restricted by the `sites=`
selector, best by the depthwise conv's name, which later steps do not shift:
`replace-conv{group_size=8,sites=@b1/dw;@b3/dw},replace-conv{group_size=16}`. (Indices count the sites
applicable for that step's options in graph order; a conv rewritten by an earlier step is no longer
depthwise and drops out of later steps' lists.)

Skipped, with the reason: the weight not constant (its channel counts are unknown), a grouped conv that
is not depthwise (more than one input channel per group) and a group size that does not divide C.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from hwnas.errors import BadInputError
from hwnas.graph.gsgraph import const_value, unique_name
from hwnas.passes.base import Pass, PassContext, PassResult, Site, option
from hwnas.passes.registry import register_pass

AUTO_MAX_GROUP_SIZE = 16


def regroup_weight(weight: np.ndarray, group: int, new_group: int) -> np.ndarray:
    """The weight of a conv with `new_group` groups computing what `weight` computes with `group`.

    `new_group` must divide `group`; the result has group/new_group times as many input channels per
    group, zero where an output's old group did not reach.
    """
    out_channels, in_per_group = weight.shape[:2]
    new_in_per_group = in_per_group * group // new_group
    regrouped = np.zeros((out_channels, new_in_per_group, *weight.shape[2:]), weight.dtype)
    o = np.arange(out_channels)
    old_start = o // (out_channels // group) * in_per_group
    new_start = o // (out_channels // new_group) * new_in_per_group
    for j in range(in_per_group):
        regrouped[o, old_start - new_start + j] = weight[:, j]
    return regrouped


def is_depthwise(node: gs.Node, weight: np.ndarray) -> bool:
    """One input channel per group (any depth multiplier), more than one group."""
    return node.op == "Conv" and node.attrs.get("group", 1) > 1 and weight.shape[1] == 1


def auto_group_size(channels: int) -> int | None:
    """The largest divisor of `channels` in 2..AUTO_MAX_GROUP_SIZE, or None."""
    return next((g for g in range(min(channels, AUTO_MAX_GROUP_SIZE), 1, -1) if channels % g == 0), None)


@dataclass(frozen=True)
class ReplaceConvOptions:
    mode: str = option("grouped", "grouped: groups of group_size channels; dense: one group", ("grouped", "dense"))
    group_size: int = option(
        0, f"input channels per group (mode=grouped); 0: the largest divisor of C up to {AUTO_MAX_GROUP_SIZE}"
    )

    def __post_init__(self):
        if self.group_size < 0 or self.group_size == 1:
            raise BadInputError(f"pass 'replace-conv': group_size={self.group_size}; use 0 (auto) or a size >= 2")
        if self.mode == "dense" and self.group_size:
            raise BadInputError("pass 'replace-conv': group_size applies to mode=grouped only")


@register_pass
class ReplaceConv(Pass):
    name = "replace-conv"
    summary = "depthwise conv → grouped conv with group_size channels per group (block-diagonal) or → dense conv"
    Options = ReplaceConvOptions

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        sites = []
        for node in graph.nodes:
            if node.op != "Conv" or node.attrs.get("group", 1) == 1:
                continue
            new_group, reason = self._new_group(node)
            target = f" → group={new_group}" if new_group else ""
            description = f"Conv {node.name} (group={node.attrs['group']}){target}"
            sites.append(Site((node.name,), description, reason, (node, new_group)))
        return sites

    def _new_group(self, node: gs.Node) -> tuple[int | None, str | None]:
        weight = const_value(node.inputs[1])
        if weight is None:
            return None, f"weight {node.inputs[1].name} is not a constant (channel counts unknown)"
        if not is_depthwise(node, weight):
            return None, f"grouped conv with {weight.shape[1]} input channels per group is not depthwise"
        channels = node.attrs["group"]
        if self.options.mode == "dense":
            return 1, None
        size = self.options.group_size or auto_group_size(channels)
        if size is None:
            return None, f"C={channels} has no divisor between 2 and {AUTO_MAX_GROUP_SIZE}"
        if channels % size:
            return None, f"C={channels} not divisible by group_size={size}"
        return channels // size, None

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        for site in sites:
            node, new_group = site.data
            weight = regroup_weight(const_value(node.inputs[1]), node.attrs["group"], new_group)
            node.inputs[1] = gs.Constant(unique_name(graph, node.inputs[1].name + "_regrouped"), weight)
            node.attrs["group"] = new_group
        return PassResult(graph, bool(sites), {"replaced": len(sites)})

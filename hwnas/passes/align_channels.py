"""align-channels{multiple=N,mode=pad}: every channel group to a multiple of N channels, by adding
channels that change nothing (exact).

Before → After (N = 8; one group of 30 channels, see hwnas/graph/channels.py)::

    x ─► Conv_a(W_a[30,K]) ─► BN(30) ─► HardSwish ─┬─► Conv_b(W_b[M,30]) ─► y
                                                   └─► Conv_c(W_c[L,30]) ─► z
    x ─► Conv_a(W_a[32,K]) ─► BN(32) ─► HardSwish ─┬─► Conv_b(W_b[M,32]) ─► y
                                                   └─► Conv_c(W_c[L,32]) ─► z

The whole group is padded together: its producers' weights get new output rows and their biases new
entries, its consumers' weights new input columns, its pass-through ops' per-channel constants new
entries (BN, affine Mul/Add, depthwise weight and bias; a depthwise Conv's `group` becomes the new
count; a Reshape target or Resize sizes that name the count name the new one).

The math. Let p be a new channel. (1) Pass-through ops compute channel c from channel c alone (and
per-channel constants at c), so every original channel of every tensor is computed from original
entries only. (2) Only consumers mix channels: Σ_c W[o, c]·x[c] gains W[o, p]·x[p] = 0·x[p] = 0, as long
as x[p] is finite. So the outputs are unchanged exactly when every new channel stays finite, which the
fills guarantee: producers' new rows and biases are 0, so x[p] = 0 after a producer; BN gets γ = 0,
β = 0, mean 0, var 1, so its new channels are 0 whatever comes in; a per-channel Mul constant gets 0,
Add/Sub 0, a Div divisor 1 (never 0); a depthwise conv's new weights and bias are 0. Activations map
finite to finite; those with f(0) ≠ 0 (HardSigmoid, Sigmoid: 0.5) or an Add of a scalar c make a new
channel non-zero but finite, which (2) allows: an SE block's x[p]·gate[p] is finite, and the next
depthwise conv or BN resets it to 0 anyway. A Div by an activation could divide a new channel by 0,
so the analysis blocks it.

Concatenated groups (a Concat along channels and what follows it) are padded per segment: an input
group that gets k new channels gets them at the end of its segment, in the middle of the concat output,
and the concat's consumers get zero input columns at those positions.

Sites are the plain groups whose count is not a multiple of N; blocked groups are sites with their
reason. Groups already aligned are not sites, nor groups that no weight reads or writes (the axis-1
"channels" after a Transpose), nor concatenated groups (they follow their segments).

`mode` has one value, `pad`: trimming the least important channels and refitting the consumers
(`mode=trim`, reconstructed) is not implemented.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from hwnas.errors import BadInputError
from hwnas.graph.channels import ChannelGroup, ChannelParam, Segment, analyze_channel_groups, node_labels
from hwnas.graph.gsgraph import const_value, to_model, unique_name
from hwnas.graph.shapes import tensor_shapes
from hwnas.passes.base import Pass, PassContext, PassResult, Site, option
from hwnas.passes.registry import register_pass


@dataclass(frozen=True)
class AlignOptions:
    multiple: int = option(8, "channel counts become multiples of this")
    mode: str = option("pad", "pad: add zero channels (exact)", choices=("pad",))


@dataclass(frozen=True)
class Padding:
    """What a site pads: a plain group, and the concatenated groups it is a segment of."""

    group: ChannelGroup
    widens: tuple[ChannelGroup, ...]


def aligned(channels: int, multiple: int) -> int:
    return -(-channels // multiple) * multiple


def channel_groups(graph: gs.Graph, ctx: PassContext) -> list[ChannelGroup]:
    """The channel groups of `graph` at the context's analysis input shapes."""
    shapes = tensor_shapes(to_model(graph.copy(), ctx.template), ctx.input_shapes)
    return analyze_channel_groups(graph, shapes)


def describe(group: ChannelGroup, target: int, widens: tuple[ChannelGroup, ...]) -> str:
    tensors = f"{len(group.members)} tensor{'s' if len(group.members) != 1 else ''}"
    text = f"group of {tensors}, {group.channels} channels → {target}"
    text += f" (producers {', '.join(group.producers) or 'none'}; consumers {', '.join(group.consumers) or 'none'})"
    if widens:
        plural = "s" if len(widens) > 1 else ""
        text += f"; widens the concat group{plural} of {', '.join(g.members[0] for g in widens)}"
    return text


def padded(
    value: np.ndarray, param: ChannelParam, segments: tuple[Segment, ...], pads: Mapping[int, int]
) -> np.ndarray:
    """`value` with `pads[g]` entries of `param.fill` after segment g along `param.axis`."""
    bounds = np.cumsum([s.channels for s in segments])[:-1]
    pieces = []
    for s, piece in zip(segments, np.split(value, bounds, axis=param.axis)):
        pieces.append(piece)
        if pads.get(s.group):
            shape = list(value.shape)
            shape[param.axis] = pads[s.group]
            pieces.append(np.full(shape, param.fill, value.dtype))
    return np.concatenate(pieces, axis=param.axis)


def pad_group(graph: gs.Graph, nodes: Mapping[str, gs.Node], group: ChannelGroup, pads: Mapping[int, int]) -> None:
    """Rewrite every constant indexed by `group`'s channels (new constants; the old are not touched)."""
    count = sum(s.channels + pads.get(s.group, 0) for s in group.segments)
    for param in group.params:
        node = nodes[param.node]
        old = node.inputs[param.input]
        value = const_value(old)
        if param.shape_vector:
            new = value.copy()
            new[param.axis] = count
        else:
            new = padded(value, param, group.segments, pads)
        node.inputs[param.input] = gs.Constant(unique_name(graph, f"{old.name}_aligned"), new)
    for label in group.passthrough:
        if nodes[label].op == "Conv":  # a pass-through Conv is depthwise: one group per channel
            nodes[label].attrs["group"] = count


@register_pass
class AlignChannels(Pass):
    name = "align-channels"
    summary = "channel counts to multiples of N by zero-padding whole channel groups"
    Options = AlignOptions

    def __init__(self, **options):
        super().__init__(**options)
        if self.options.multiple < 1:
            raise BadInputError(f"pass {self.name!r}: option multiple={self.options.multiple} must be at least 1")

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        groups = channel_groups(graph, ctx)
        sites = []
        for group in groups:
            if group.concatenated or group.channels % self.options.multiple == 0:
                continue
            if not (group.producers or group.consumers):
                continue  # no weight is indexed by these channels: nothing to align (e.g. after a Transpose)
            widens = tuple(g for g in groups if g.concatenated and any(s.group == group.id for s in g.segments))
            target = aligned(group.channels, self.options.multiple)
            nodes = tuple(dict.fromkeys(group.producers + group.passthrough + group.consumers))
            sites.append(Site(nodes, describe(group, target, widens), group.blocked_reason, Padding(group, widens)))
        return sites

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        plain = [site.data.group for site in sites]
        pads = {g.id: aligned(g.channels, self.options.multiple) - g.channels for g in plain}
        touched = {g.id: g for site in sites for g in (site.data.group, *site.data.widens)}
        nodes = node_labels(graph)
        for group in touched.values():
            pad_group(graph, nodes, group, pads)
        return PassResult(graph, bool(sites), {"groups_padded": len(sites), "channels_added": sum(pads.values())})

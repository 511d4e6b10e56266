"""align-channels{multiple=N,mode=pad|trim}: every channel group to a multiple of N channels, by adding
channels that change nothing (mode=pad, exact) or by removing the least useful ones and refitting
the consumers (mode=trim, reconstructed).

Before → After (N = 8; one group of 30 channels, see hwnas/graph/channels.py)::

    x ─► Conv_a(W_a[30,K]) ─► BN(30) ─► HardSwish ─┬─► Conv_b(W_b[M,30]) ─► y
                                                   └─► Conv_c(W_c[L,30]) ─► z
    pad:  x ─► Conv_a(W_a[32,K]) ─► BN(32) ─► HardSwish ─┬─► Conv_b(W_b[M,32]) ─► y
                                                         └─► Conv_c(W_c[L,32]) ─► z
    trim: x ─► Conv_a(W_a[S,K]) ─► BN(S) ─► HardSwish ─┬─► Conv_b(W_b'[M,24]) ─► y    S: 24 kept channels
                                                       └─► Conv_c(W_c'[L,24]) ─► z    W_b', W_c' refitted

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

mode=trim: a group of C channels keeps the ⌊C/N⌋·N channels from which its consumers' outputs can best
be rebuilt and loses the others everywhere they are indexed; the consumers are then refitted by ridge
least squares on calibration data so that their outputs match the original's (`hwnas.passes._pruning`:
the channel selection, the refit, the calibration; scale-depth does the same with another count). A
group of fewer than N channels would lose them all: it is a site with that reason.

Sites are the plain groups whose count is not a multiple of N; blocked groups are sites with their
reason. Groups already aligned are not sites, nor groups that no weight reads or writes (the axis-1
"channels" after a Transpose), nor concatenated groups (they follow their segments).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx_graphsurgeon as gs

from hwnas.errors import BadInputError
from hwnas.graph.channels import ChannelGroup, ChannelParam, Segment, analyze_channel_groups, node_labels
from hwnas.graph.gsgraph import to_model
from hwnas.graph.shapes import tensor_shapes
from hwnas.passes import _pruning
from hwnas.passes._reconstruct import POSITIONS_DOC, check_positions
from hwnas.passes.base import Exactness, Pass, PassContext, PassResult, Site, option
from hwnas.passes.registry import register_pass


@dataclass(frozen=True)
class AlignOptions:
    multiple: int = option(8, "channel counts become multiples of this")
    mode: str = option(
        "pad",
        "pad: add zero channels (exact); trim: remove the least useful channels and refit the consumers "
        "on calibration data (reconstructed)",
        choices=("pad", "trim"),
    )
    positions: int = option(0, f"mode=trim: {POSITIONS_DOC}")

    def __post_init__(self):
        if self.positions and self.mode != "trim":
            raise BadInputError("pass 'align-channels': option positions applies to mode=trim only")
        check_positions("align-channels", self.positions)


@dataclass(frozen=True)
class Padding:
    """What a site pads: a plain group, and the concatenated groups it is a segment of."""

    group: ChannelGroup
    widens: tuple[ChannelGroup, ...]


def aligned(channels: int, multiple: int) -> int:
    return -(-channels // multiple) * multiple


def trimmed(channels: int, multiple: int) -> int:
    return channels // multiple * multiple


def channel_groups(graph: gs.Graph, ctx: PassContext) -> list[ChannelGroup]:
    """The channel groups of `graph` at the context's analysis input shapes."""
    shapes = tensor_shapes(to_model(graph.copy(), ctx.template), ctx.input_shapes)
    return analyze_channel_groups(graph, shapes)


def padded(
    value: np.ndarray, param: ChannelParam, segments: tuple[Segment, ...], pads: Mapping[int, int]
) -> np.ndarray:
    """`value` with `pads[g]` entries of `param.fill` after segment g along `param.axis`."""
    pieces = []
    for s, piece in zip(segments, np.split(value, _pruning.segment_bounds(segments), axis=param.axis)):
        pieces.append(piece)
        if pads.get(s.group):
            shape = list(value.shape)
            shape[param.axis] = pads[s.group]
            pieces.append(np.full(shape, param.fill, value.dtype))
    return np.concatenate(pieces, axis=param.axis)


def pad_group(graph: gs.Graph, nodes: Mapping[str, gs.Node], group: ChannelGroup, pads: Mapping[int, int]) -> None:
    """Rewrite every constant indexed by `group`'s channels (new constants; the old are not touched)."""
    count = sum(s.channels + pads.get(s.group, 0) for s in group.segments)
    widen = partial(padded, segments=group.segments, pads=pads)
    _pruning.rewrite_group(graph, nodes, group, count, widen, "aligned")


@register_pass
class AlignChannels(Pass):
    name = "align-channels"
    summary = "channel counts to multiples of N: zero-pad whole channel groups, or trim them and refit the consumers"
    Options = AlignOptions

    def __init__(self, **options):
        super().__init__(**options)
        if self.options.multiple < 1:
            raise BadInputError(f"pass {self.name!r}: option multiple={self.options.multiple} must be at least 1")

    @property
    def exactness(self) -> Exactness:
        return Exactness.EXACT if self.options.mode == "pad" else Exactness.RECONSTRUCTED

    @classmethod
    def exactness_doc(cls) -> str:
        return "exact (mode=pad) / reconstructed (mode=trim)"

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        groups = channel_groups(graph, ctx)
        if self.options.mode == "trim":
            return _pruning.pruning_sites(graph, groups, self._trim_target, refit=True)
        concats = _pruning.concatenations(groups)
        sites = []
        for group in groups:
            if group.concatenated or group.channels % self.options.multiple == 0:
                continue
            if not (group.producers or group.consumers):
                continue  # no weight is indexed by these channels: nothing to align (e.g. after a Transpose)
            widens = concats.get(group.id, ())
            target = aligned(group.channels, self.options.multiple)
            description = _pruning.describe(group, target, widens)
            sites.append(Site(_pruning.site_nodes(group), description, group.blocked_reason, Padding(group, widens)))
        return sites

    def _trim_target(self, group: ChannelGroup) -> tuple[int, str | None] | None:
        multiple = self.options.multiple
        if group.channels % multiple == 0:
            return None
        target = trimmed(group.channels, multiple)
        if target == 0:
            return 0, f"has {group.channels} channels, fewer than {multiple}: trimming would remove them all"
        return target, None

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        if self.options.mode == "trim":
            settings = _pruning.PruneSettings(owner=f"{self.name}{{mode=trim}}", positions=self.options.positions)
            stats = _pruning.prune(graph, [site.data for site in sites], ctx, settings)
            return PassResult(graph, bool(sites), stats)
        plain = [site.data.group for site in sites]
        pads = {g.id: aligned(g.channels, self.options.multiple) - g.channels for g in plain}
        touched = {g.id: g for site in sites for g in (site.data.group, *site.data.widens)}
        nodes = node_labels(graph)
        for group in touched.values():
            pad_group(graph, nodes, group, pads)
        return PassResult(graph, bool(sites), {"groups_padded": len(sites), "channels_added": sum(pads.values())})

"""scale-depth{multiplier=m,round_to=N}: the depth multiplier applied to a trained model: every channel
group keeps its m·C most useful channels (rounded to N) and the consumers are refitted
(post-training channel pruning, reconstructed).

Before → After (m = 0.5, N = 8; an IBN block whose expand group has 48 channels)::

    x ─► 1×1 (E[48,16]) ─► BN(48) ─► Relu6 ─► dw 3×3 (D[48]) ─► BN(48) ─► Relu6 ─► 1×1 (P[16,48]) ─► y
    x ─► 1×1 (E[S,16]) ──► BN(S) ──► Relu6 ─► dw 3×3 (D[S]) ──► BN(S) ──► Relu6 ─► 1×1 (P'[16,24]) ─► y

S is the 24 kept channels; P' is refitted by least squares so that it produces, from the pruned block,
what P produced from the full one. Every unblocked channel group of the model (hwnas/graph/channels.py)
is scaled this way at once; the graph's inputs and outputs and the blocked groups keep their channels,
so the model stays a drop-in replacement. Coupled channels (residual Adds, Concat segments, depthwise
chains, SE gates) are one group and change together.

The new count of a group of C channels is

    C' = min(C, max(N, ⌊m·C/N + ½⌋·N))

the nearest multiple of N to m·C (halves up, as MobileNet's `_make_divisible` rounds), at least N so
that no group disappears, and never more than C: a group of N channels or fewer is not touched (a site
with that reason), and with m = 1 nothing changes. Which channels stay (`importance=activation`: those
from which the consumers' outputs can best be rebuilt, chosen greedily on calibration data;
`importance=weight`: by weight norms, no data), how they leave every producer, pass-through op and
consumer, and the refit are `hwnas.passes._pruning`'s.
`refit=false` removes the same channels without refitting (plain truncation: lossy, the naive
baseline). Groups are pruned together and the consumers refitted in graph order, each against the
original model's output and reading the pruned model's input, so errors do not compound.
`positions=N` samples N output positions per calibration image for each conv refit instead of the
default rows (`hwnas.passes._reconstruct`): faster, and the same drift while N·samples stays near the
default's 4·F rows (measured in the `positions` note of docs/design.md).

Sites are the plain channel groups (concatenated groups follow their segments) in graph order; blocked
groups and groups whose consumers cannot be refitted are sites with their reason. `sites=` selects
groups. Statistics: groups pruned, channels removed, consumers refitted, and the worst consumer's
relative residual ‖fit − y‖²/‖y‖² with the refit and with plain truncation on the rows fitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from hwnas.errors import BadInputError
from hwnas.graph.channels import ChannelGroup
from hwnas.passes import _pruning
from hwnas.passes._reconstruct import POSITIONS_DOC, check_positions
from hwnas.passes.align_channels import channel_groups
from hwnas.passes.base import Exactness, Pass, PassContext, PassResult, Site, option
from hwnas.passes.registry import register_pass


def scaled_count(channels: int, multiplier: float, round_to: int) -> int:
    """C' = min(C, max(N, ⌊m·C/N + ½⌋·N)) (module docstring)."""
    nearest = math.floor(multiplier * channels / round_to + 0.5) * round_to
    return min(channels, max(round_to, nearest))


@dataclass(frozen=True)
class ScaleDepthOptions:
    multiplier: float = option(0.75, "channel counts are scaled by this (0 < m ≤ 1)")
    round_to: int = option(8, "new counts are multiples of this (at least this, never more than before)")
    importance: str = option(
        "activation",
        "activation: keep the channels the consumers' outputs are best rebuilt from, on calibration data; "
        "weight: by producer and consumer weight norms (no data)",
        _pruning.IMPORTANCE,
    )
    refit: bool = option(True, "refit the consumers by least squares (false: plain truncation, lossy)")
    positions: int = option(0, POSITIONS_DOC)

    def __post_init__(self):
        if not 0 < self.multiplier <= 1:
            raise BadInputError(f"pass 'scale-depth': option multiplier={self.multiplier} must be in (0, 1]")
        if self.round_to < 1:
            raise BadInputError(f"pass 'scale-depth': option round_to={self.round_to} must be at least 1")
        check_positions("scale-depth", self.positions)


@register_pass
class ScaleDepth(Pass):
    name = "scale-depth"
    summary = "depth multiplier on a trained model: keep the m·C most useful channels of every group, refit consumers"
    Options = ScaleDepthOptions
    default_exactness = Exactness.RECONSTRUCTED

    @property
    def exactness(self) -> Exactness:
        return Exactness.RECONSTRUCTED if self.options.refit else Exactness.LOSSY

    @classmethod
    def exactness_doc(cls) -> str:
        return "reconstructed (refit=true) / lossy (refit=false)"

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        return _pruning.pruning_sites(graph, channel_groups(graph, ctx), self._target, self.options.refit)

    def _target(self, group: ChannelGroup) -> tuple[int, str | None]:
        m, n = self.options.multiplier, self.options.round_to
        target = scaled_count(group.channels, m, n)
        if target < group.channels:
            return target, None
        return target, f"{m} × {group.channels} channels rounds to {target} (round_to={n}): nothing to remove"

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        o = self.options
        owner = f"{self.name}{{multiplier={o.multiplier},round_to={o.round_to}}}"
        settings = _pruning.PruneSettings(owner, o.importance, o.refit, o.positions)
        stats = _pruning.prune(graph, [site.data for site in sites], ctx, settings)
        return PassResult(graph, bool(sites), stats)

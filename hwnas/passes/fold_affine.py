"""fold-affine: per-channel or scalar Mul/Add by constants right after a Conv into its weights (exact).

Before → After::

    x ─► Conv(W, b) ─► t ─► Mul(γ) ─► Add(β) ─► y        (PP-LCNetV3's "learnable affine block")
    x ─► Conv(W', b') ─────────────────────────► y

The math: a chain of Mul(γᵢ) and Add(βᵢ), in any order and with the constant as either input, is one
affine map y = s·t + h per output channel c (Mul: s ← γ·s, h ← γ·h; Add: h ← h + β). With
t = W∗x + b this is y = (s·W)∗x + (s·b + h), so W'[c] = s[c]·W[c] and b' = s·b + h, exact up to float
rounding. The same holds after a ConvTranspose (group 1) or a Gemm, whose output channels are axis 1.

A constant is per-channel when, right-aligned against the conv's output (N, C, *spatial), every dim is
1 except the channel dim, which is 1 or C: shapes (), (1,), (C,1,1), (1,C,1,1). A (C,) constant on a
4-D output varies along W, not C, and anything of another shape varies over space or batch: the site
is skipped with the reason. The chain is the longest run of such nodes whose intermediate outputs have
one consumer and are not graph outputs; it stops, without a reason, at the first node that is not one.

Skipped, with the reason (besides the constant's shape): the conv weight not constant (its channels are
unknown) or shared with another node, and a conv output with another consumer or that is a graph
output. Only Mul/Add nodes with exactly one constant input whose other input a Conv/ConvTranspose/Gemm
produces are looked at; run fold-bn first when a BatchNormalization sits between them.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from hwnas.graph.gsgraph import const_value, is_graph_output, producer
from hwnas.passes.base import Pass, PassContext, PassResult, Site
from hwnas.passes.fold_bn import FOLDABLE, absorb_output, check_linear_producer, output_channel_axis, scale_and_shift
from hwnas.passes.registry import register_pass

_AFFINE = ("Mul", "Add")


def split_constant(node: gs.Node) -> tuple[gs.Tensor, np.ndarray] | None:
    """(the variable input, the constant) of a Mul/Add by exactly one constant, else None."""
    if node.op not in _AFFINE or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    ca, cb = const_value(a), const_value(b)
    if (ca is None) == (cb is None):
        return None
    return (b, ca) if ca is not None else (a, cb)


def per_channel(const: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """`const` as a vector of length 1 or `channels`, or None when it broadcasts over other axes too.

    Axis 1 of a rank-`rank` output is the channel axis; numpy aligns shapes from the right.
    """
    if const.ndim > rank:
        return None
    shape = (1,) * (rank - const.ndim) + const.shape
    if any(d != 1 for axis, d in enumerate(shape) if axis != 1) or shape[1] not in (1, channels):
        return None
    return const.reshape(-1).astype(np.float64)


def _output_geometry(node: gs.Node) -> tuple[int, int]:
    """(rank, channels) of the output of a Conv/ConvTranspose/Gemm with a constant weight."""
    weight = const_value(node.inputs[1])
    rank = 2 if node.op == "Gemm" else weight.ndim
    return rank, weight.shape[output_channel_axis(node)]


def _affine_follower(graph: gs.Graph, tensor: gs.Tensor, rank: int, channels: int) -> gs.Node | None:
    """The sole consumer of `tensor` when it is a per-channel Mul/Add that can join the chain."""
    if is_graph_output(graph, tensor) or len(tensor.outputs) != 1:
        return None
    node = tensor.outputs[0]
    split = split_constant(node)
    return node if split and per_channel(split[1], rank, channels) is not None else None


def affine_chain(graph: gs.Graph, head: gs.Node, rank: int, channels: int) -> list[gs.Node]:
    chain = [head]
    while (follower := _affine_follower(graph, chain[-1].outputs[0], rank, channels)) is not None:
        chain.append(follower)
    return chain


def compose(chain: list[gs.Node], rank: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel of the whole chain: y = scale·t + shift."""
    scale, shift = np.ones(channels), np.zeros(channels)
    for node in chain:
        value = per_channel(split_constant(node)[1], rank, channels)
        if node.op == "Mul":
            scale, shift = scale * value, shift * value
        else:
            shift = shift + value
    return scale, shift


@register_pass
class FoldAffine(Pass):
    name = "fold-affine"
    summary = "per-channel or scalar Mul/Add by constants right after a Conv/ConvTranspose/Gemm into its weights"

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        sites = []
        for node in graph.nodes:
            split = split_constant(node)
            conv = producer(split[0]) if split else None
            if conv is None or conv.op not in FOLDABLE:
                continue
            reason = check_linear_producer(graph, conv, node)
            chain = [node]
            if reason is None:
                rank, channels = _output_geometry(conv)
                if per_channel(split[1], rank, channels) is None:
                    reason = (
                        f"constant of shape {split[1].shape} is not per-channel "
                        f"for a {rank}-D output of {channels} channels"
                    )
                else:
                    chain = affine_chain(graph, node, rank, channels)
            description = f"{conv.op} {conv.name} → " + " → ".join(f"{n.op} {n.name}" for n in chain)
            sites.append(Site((conv.name, *(n.name for n in chain)), description, reason, (conv, chain)))
        return sites

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        for site in sites:
            conv, chain = site.data
            rank, channels = _output_geometry(conv)
            scale_and_shift(graph, conv, *compose(chain, rank, channels))
            absorb_output(conv, chain[-1])
        return PassResult(graph, bool(sites), {"folded": sum(len(s.data[1]) for s in sites)})

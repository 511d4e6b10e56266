"""fold-bn: BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it (exact).

Before → After::

    x ─► Conv(W, b) ─► t ─► BatchNormalization(γ, β, μ, σ², ε) ─► y
    x ─► Conv(W', b') ─────────────────────────────────────────► y

The math: BN computes y = γ·(t − μ)/√(σ² + ε) + β per channel c. With t = W∗x + b and
s = γ/√(σ² + ε) this is y = (s·W)∗x + (s·(b − μ) + β), so W'[c] = s[c]·W[c] and b' = s·(b − μ) + β,
exact up to float rounding. The output channel is axis 0 of a Conv weight, axis 1 of a ConvTranspose
weight (group 1) and the output column of a Gemm's B.

Skipped, with the reason: BN in training mode, BN parameters or the conv weight not constant, a conv
weight or bias shared with another node (rewriting it would change that node too), a conv output that
has another consumer or is a graph output (it must keep its value), and a BN with no conv before it.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from hwnas.graph.gsgraph import const_value, is_graph_output, private_constant, producer, unique_name
from hwnas.passes.base import Pass, PassContext, PassResult, Site
from hwnas.passes.registry import register_pass

FOLDABLE = ("Conv", "ConvTranspose", "Gemm")


def batchnorm_affine(bn: gs.Node, channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) of an inference BatchNormalization with constant parameters, bn(x) = scale·x + shift per
    channel: scale = γ/√(σ² + ε), shift = β − μ·scale, in float64 (parameters of one value broadcast to `channels`)."""
    gamma, beta, mean, var = (const_value(t).astype(np.float64).reshape(-1) for t in bn.inputs[1:5])
    if channels is not None:
        gamma, beta, mean, var = (np.broadcast_to(v if v.size == channels else v[:1], (channels,)) for v in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    return scale, beta - mean * scale


def output_channel_axis(node: gs.Node) -> int | None:
    """Axis of the weight that indexes output channels, or None when scaling it is not per-channel."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1 if node.attrs.get("group", 1) == 1 else None
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return None


def check_linear_producer(graph: gs.Graph, node: gs.Node | None, consumer: gs.Node) -> str | None:
    """Why the per-channel affine after `node` cannot be folded into it, or None when it can."""
    if node is None or node.op not in FOLDABLE:
        return f"not preceded by {'/'.join(FOLDABLE)}"
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "Gemm with transA"
    if output_channel_axis(node) is None:
        return f"{node.op} with group > 1"
    out = node.outputs[0]
    if is_graph_output(graph, out):
        return f"{node.name} output {out.name} is a graph output"
    if len(out.outputs) != 1:
        return f"{node.name} output {out.name} has {len(out.outputs)} consumers"
    for weight in node.inputs[1:]:
        reason = private_constant(graph, weight, node)
        if reason:
            return reason
    if node.op == "Gemm" and len(node.inputs) > 2:
        if const_value(node.inputs[2]).size not in (1, const_value(node.inputs[1]).shape[output_channel_axis(node)]):
            return "Gemm bias is not per output column"
    return None


def scale_and_shift(graph: gs.Graph, node: gs.Node, scale: np.ndarray, shift: np.ndarray) -> None:
    """Rewrite `node` (Conv/ConvTranspose/Gemm) so that it outputs scale[c]·out + shift[c].

    Gemm's alpha and beta are folded in too, so the rewritten Gemm has alpha = beta = 1.
    """
    w = const_value(node.inputs[1]).astype(np.float64)
    axis = output_channel_axis(node)
    channels = w.shape[axis]
    bcast = [1] * w.ndim
    bcast[axis] = channels
    scale = np.broadcast_to(scale, (channels,)).astype(np.float64)
    bias = const_value(node.inputs[2]).astype(np.float64).reshape(-1) if len(node.inputs) > 2 else np.zeros(channels)
    if node.op == "Gemm":
        w = w * node.attrs.get("alpha", 1.0)
        bias = bias * node.attrs.get("beta", 1.0)
        node.attrs["alpha"], node.attrs["beta"] = 1.0, 1.0
    dtype = node.inputs[1].values.dtype
    new_w = gs.Constant(unique_name(graph, node.inputs[1].name + "_scaled"), (w * scale.reshape(bcast)).astype(dtype))
    new_b = gs.Constant(unique_name(graph, node.name + "_bias"), (bias * scale + shift).astype(dtype))
    node.inputs[1] = new_w
    if len(node.inputs) > 2:
        node.inputs[2] = new_b
    else:
        node.inputs.append(new_b)


def absorb_output(node: gs.Node, follower: gs.Node) -> None:
    """`node` takes over `follower`'s output tensor (keeping its name), so `follower` becomes dead."""
    out = follower.outputs[0]
    follower.outputs.clear()
    node.outputs[0] = out


@register_pass
class FoldBatchNorm(Pass):
    name = "fold-bn"
    summary = "BatchNormalization into the preceding Conv/ConvTranspose/Gemm"

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        sites = []
        for bn in graph.nodes:
            if bn.op != "BatchNormalization":
                continue
            conv = producer(bn.inputs[0])
            names = ((conv.name,) if conv else ()) + (bn.name,)
            reason = self._check(graph, conv, bn)
            sites.append(Site(names, f"{conv.op if conv else 'input'} → BatchNormalization {bn.name}", reason, (conv, bn)))
        return sites

    def _check(self, graph: gs.Graph, conv: gs.Node | None, bn: gs.Node) -> str | None:
        if bn.attrs.get("training_mode", 0) or len([o for o in bn.outputs if o.name]) > 1:
            return "BatchNormalization in training mode"
        if any(const_value(t) is None for t in bn.inputs[1:5]):
            return "BatchNormalization parameters are not constants"
        return check_linear_producer(graph, conv, bn)

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        for site in sites:
            conv, bn = site.data
            scale_and_shift(graph, conv, *batchnorm_affine(bn))
            absorb_output(conv, bn)
        return PassResult(graph, bool(sites), {"folded": len(sites)})

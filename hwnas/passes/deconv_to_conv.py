"""deconv-to-conv: a ConvTranspose whose kernel equals its stride → a 1×1 Conv and a DepthToSpace (exact).

Before → After (stride s = kernel k = 2, C_in = 24, C_out = 1; the activation after it moves ahead)::

    x[24, H, W] ─► ConvTranspose(W: [24, 1, 2, 2], b[1], stride 2) ─► Sigmoid ─► y[1, 2H, 2W]
    x[24, H, W] ─► Conv 1×1 (W': [4, 24, 1, 1], b'[4]) ─► Sigmoid ─► DepthToSpace(2, CRD) ─► y[1, 2H, 2W]

The math: with k = s and no padding the kernel windows do not overlap, so every output pixel
(i·s + a, j·s + b) reads exactly one input pixel (i, j):

    y[co, i·s + a, j·s + b] = Σ_ci x[ci, i, j] · W[ci, co, a, b] + b[co]

which is a 1×1 conv with C_out·s² outputs, W'[co·s² + a·s + b, ci] = W[ci, co, a, b] and b'[co·s² + a·s + b] =
b[co], followed by DepthToSpace in CRD mode (out[c, h·s + a, w·s + b] = in[c·s² + a·s + b, h, w]): the same
sums in the same order. A channel-wise op right after it (BatchNormalization, an activation) commutes with the
DepthToSpace, a pure permutation of pixels within each channel, and moves ahead of it (BatchNormalization's
per-channel parameters repeated s² times), so that it stays in the conv's epilogue where the target fuses it.

Why: an accelerator that runs a transposed conv as a stride-1 conv over its zero-stuffed input (the npu
targets, as SCALE-Sim does) pays for the zeros: a GEMM of the *output's* pixels by K = k²·C_in. The 1×1
conv is a GEMM of the input's pixels (s² fewer) by K = C_in, with s² times the columns: on PP-OCRv4 det
at 640² the head's last 2×2 ConvTranspose (24 → 1) is 10 % of the npu-32x32 estimate, its rewrite 1 %.
On a CPU the DepthToSpace is a copy, so the search takes it only where the target's estimate says so.

Sites are the ConvTranspose nodes; skipped with a reason: the weight is not a constant, groups, a
dilation, padding, an output padding or an explicit output shape, a kernel other than the stride, or
a stride that differs between height and width (DepthToSpace has one block size), or not a 2-D conv.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from hwnas.graph.gsgraph import const_value, unique_name
from hwnas.passes.base import Pass, PassContext, PassResult, Site
from hwnas.passes.registry import register_pass

# ops that act on each element alone (no per-channel constant): they commute with DepthToSpace as they are
_ELEMENTWISE = frozenset({"Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Clip"})


def _skip_reason(node: gs.Node) -> str | None:
    weight = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return f"the weight of {node.name} is not a constant"
    if weight.ndim != 4:
        return f"{node.name} is not a 2-D transposed conv (weight rank {weight.ndim})"
    if len(node.inputs) > 2 and const_value(node.inputs[2]) is None:
        return f"the bias of {node.name} is not a constant"
    a = node.attrs
    kernel = list(a.get("kernel_shape", weight.shape[2:]))
    strides = list(a.get("strides", [1, 1]))
    if a.get("group", 1) != 1:
        return f"{node.name} has {a['group']} groups"
    if any(d != 1 for d in a.get("dilations", [1, 1])):
        return f"{node.name} is dilated"
    if any(p != 0 for p in a.get("pads", [0] * 4)) or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"{node.name} is padded"
    if any(p != 0 for p in a.get("output_padding", [0, 0])) or "output_shape" in a:
        return f"{node.name} has an output padding or an explicit output shape"
    if kernel != strides:
        return f"kernel {kernel} differs from stride {strides}: the windows overlap or leave gaps"
    if strides[0] != strides[1] or strides[0] < 2:
        return f"stride {strides}: DepthToSpace needs one block size of at least 2"
    return None


@register_pass
class DeconvToConv(Pass):
    name = "deconv-to-conv"
    summary = "ConvTranspose with kernel = stride -> 1x1 Conv + DepthToSpace (no zero-stuffed GEMM)"

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        return [Site((node.name,), f"ConvTranspose {node.name}", _skip_reason(node), node)
                for node in graph.nodes if node.op == "ConvTranspose" and node.domain in ("", "ai.onnx", None)]

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        moved = 0
        for site in sites:
            moved += _rewrite(graph, site.data)
        graph.cleanup().toposort()
        return PassResult(graph, bool(sites), {"rewritten": len(sites), "ops_moved_ahead": moved})


def _rewrite(graph: gs.Graph, node: gs.Node) -> int:
    """Turn `node` into the 1×1 Conv, move the channel-wise ops after it ahead, add the DepthToSpace;
    returns how many ops moved."""
    weight = const_value(node.inputs[1])  # [C_in, C_out, s, s]
    c_in, c_out, s = weight.shape[0], weight.shape[1], weight.shape[2]
    dense = np.ascontiguousarray(weight.transpose(1, 2, 3, 0).reshape(c_out * s * s, c_in, 1, 1))
    inputs = [node.inputs[0], gs.Constant(unique_name(graph, f"{node.name}_w1x1"), dense)]
    if len(node.inputs) > 2:
        bias = np.repeat(const_value(node.inputs[2]), s * s).astype(dense.dtype)
        inputs.append(gs.Constant(unique_name(graph, f"{node.name}_b1x1"), bias))
    node.op = "Conv"
    node.inputs.clear()
    node.inputs.extend(inputs)
    node.attrs = {"kernel_shape": [1, 1], "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1}
    last, moved = node, 0
    while (follower := _channel_wise_follower(graph, last.outputs[0])) is not None:
        if follower.op == "BatchNormalization":
            for i in range(1, 5):
                p = follower.inputs[i]
                follower.inputs[i] = gs.Constant(unique_name(graph, f"{p.name}_x{s * s}"), np.repeat(const_value(p), s * s))
        last, moved = follower, moved + 1
    out = last.outputs[0]
    shuffled = gs.Variable(unique_name(graph, f"{node.name}_channels"), dtype=out.dtype)
    last.outputs[0] = shuffled
    graph.nodes.append(gs.Node("DepthToSpace", unique_name(graph, f"{node.name}_to_space"),
                               {"blocksize": int(s), "mode": "CRD"}, inputs=[shuffled], outputs=[out]))
    return moved


def _channel_wise_follower(graph: gs.Graph, tensor: gs.Variable) -> gs.Node | None:
    """The one consumer of `tensor` that may move ahead of the DepthToSpace: an elementwise activation or
    an inference BatchNormalization with constant parameters; None when `tensor` is read elsewhere too."""
    if len(tensor.outputs) != 1 or tensor in graph.outputs:
        return None
    follower = tensor.outputs[0]
    if follower.op in _ELEMENTWISE and all(isinstance(t, gs.Constant) for t in follower.inputs[1:]):
        return follower if len(follower.outputs) == 1 else None
    if (follower.op == "BatchNormalization" and len(follower.outputs) == 1 and len(follower.inputs) == 5
            and all(const_value(p) is not None and const_value(p).ndim == 1 for p in follower.inputs[1:])):
        return follower
    return None

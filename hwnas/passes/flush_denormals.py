"""flush-denormals: denormal (subnormal) values of float weights become 0 (exact).

Before → After::

    x ─► Conv(W = [0.031, 3.6e-41, −0.2, ...]) ─► y          x ─► Conv(W = [0.031, 0, −0.2, ...]) ─► y

Why: on Intel CPUs every vector multiply-add that reads a denormal operand takes a microcode assist
(~46 ns on a Xeon with AVX-512/AMX), and ONNX Runtime runs a 1-thread session on the caller's thread,
where its `session.set_denormal_as_zero` option does not apply. Paddle-trained PP-OCR models carry such
weights (ch_PP-OCRv4_det: 1,579 in 4 conv weights); zeroing them kept the outputs bitwise equal and
made PP-OCRv6 det small 418 → 121 ms, PP-OCRv5 det 544 → 369 ms, ch_PP-OCRv4_det 155 → 144 ms (Intel
Xeon, 1 thread). AMD EPYC runs denormals at full speed: nothing to win there, nothing lost either.

The math: a denormal w has 0 < |w| < tiny = np.finfo(dtype).tiny (float32: 1.2e-38, float64:
2.2e-308). Replacing it by 0 changes a product w·x by less than tiny·|x| and a sum w + x by less
than tiny: under 1e-8 for any activation below 1e30, far inside the verifier's atol 1e-4, and in
practice below half an ulp of the sums the term goes into, so the outputs stay bitwise equal. The sign
is not kept (+0 for −3e-41): −0 and +0 differ only as a divisor, and divisors are not rewritten. (An
infinite activation makes 0·inf = NaN where w·inf was ±inf, in an output that was not finite already.)

Sites are the float constants (initializers; Constant nodes inside If/Loop bodies) holding at least one
denormal; the description counts them. Skipped, with the reason:
- a use where 0 and a denormal are far apart: a divisor (x/denormal is finite, x/0 is ±inf), the input
  of Reciprocal, Log or Pow, and any op or input not on the list where the value only enters products
  and sums (`_ARITHMETIC`: Conv, ConvTranspose, Gemm, MatMul, Mul, Add, Sub, Sum, PRelu's slope, the
  normalizations' scale and bias, BatchNormalization's mean, and its variance where epsilon is large
  enough that var + epsilon rounds the same) or copies it unchanged to outputs that are used so in
  turn (`_DATA_MOVEMENT`: Reshape, Transpose, Concat, Where's data, Slice, Gather, ...);
- float16: a half denormal is as large as 6.1e-5, the verifier's atol for an activation of 1, so zeroing
  it is not exact; and ORT's CPU kernels mostly run half models widened to float, where a half denormal
  is a normal float, so there is nothing to win.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from hwnas.graph.constants import denormal_mask
from hwnas.graph.gsgraph import const_value, constant_holders
from hwnas.passes.base import Pass, PassContext, PassResult, Site
from hwnas.passes.registry import register_pass

FLUSHED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# input positions (None: all) where a value only enters products and sums
_ARITHMETIC = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "Mul": None, "Add": None,
    "Sub": None, "Sum": None, "PRelu": (1,), "BatchNormalization": (1, 2, 3), "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
}  # fmt: skip
# input positions whose values the op copies unchanged to its outputs
_DATA_MOVEMENT = {
    "Identity": (0,), "Reshape": (0,), "Flatten": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Transpose": (0,),
    "Expand": (0,), "Tile": (0,), "Slice": (0,), "Gather": (0,), "Split": (0,), "Pad": (0, 2), "Concat": None,
    "Where": (1, 2),
}  # fmt: skip
_SINGULAR_AT_ZERO = ("Reciprocal", "Log", "Pow")


def _takes(table: dict[str, tuple[int, ...] | None], node: gs.Node, index: int) -> bool:
    positions = table.get(node.op, ())
    return positions is None or index in positions


def _use_reason(node: gs.Node, index: int, finfo: np.finfo, seen: set[int]) -> str | None:
    """Why input `index` of `node` could tell a denormal from 0, or None when it cannot."""
    if node.domain not in ("", "ai.onnx", None):
        return f"read by {node.op} {node.name} of domain {node.domain}"
    if node.op == "BatchNormalization" and index == 4:
        epsilon = node.attrs.get("epsilon", 1e-5)
        # a change below tiny is under one rounding unit of var + epsilon when epsilon·eps ≥ tiny
        if epsilon * finfo.eps < finfo.tiny:
            return f"variance of BatchNormalization {node.name} with epsilon {epsilon:g}: var + epsilon may change"
        return None
    if _takes(_ARITHMETIC, node, index):
        return None
    if _takes(_DATA_MOVEMENT, node, index):
        if id(node) in seen:
            return None
        seen.add(id(node))
        for out in node.outputs:
            reason = _unsafe_use(out, finfo, seen)
            if reason:
                return f"{reason} (through {node.op} {node.name})"
        return None
    if node.op == "Div" and index == 1:
        return f"divisor of Div {node.name}: x/denormal is finite, x/0 is ±inf"
    if node.op in _SINGULAR_AT_ZERO:
        return f"read by {node.op} {node.name}, which is singular at 0"
    return f"input {index} of {node.op} {node.name}, not a product or sum where flushing is known exact"


def _unsafe_use(tensor: gs.Tensor, finfo: np.finfo, seen: set[int]) -> str | None:
    for node in tensor.outputs:
        for index, value in enumerate(node.inputs):
            if value is tensor and (reason := _use_reason(node, index, finfo, seen)):
                return reason
    return None


@register_pass
class FlushDenormals(Pass):
    name = "flush-denormals"
    summary = "denormal float32/float64 weight values -> 0 (Intel CPUs take a microcode assist per denormal read)"

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        sites = []
        for constant, holder in constant_holders(graph):
            if holder is not None and holder.op != "Constant":
                continue
            if not np.issubdtype(constant.dtype, np.floating):
                continue
            values = const_value(constant)
            count = int(np.count_nonzero(denormal_mask(values)))
            if not count:
                continue
            read = constant if holder is None else holder.outputs[0]
            if values.dtype in FLUSHED_DTYPES:
                reason = _unsafe_use(read, np.finfo(values.dtype), set())
            else:
                reason = f"{values.dtype}: a denormal is not negligible at this precision"
            users = tuple(dict.fromkeys(node.name for node in read.outputs))
            description = f"{read.name}: {count:,} of {values.size:,} {values.dtype} values denormal"
            sites.append(Site(users, description, reason, (constant, holder, count)))
        return sites

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        for site in sites:
            constant, holder, _ = site.data
            values = const_value(constant)
            flushed = np.where(denormal_mask(values), values.dtype.type(0), values)
            if holder is None:
                # in place keeps the name and every reader (subgraph nodes, graph outputs); a graph copy has
                # Constants of its own, so no other copy sees it
                constant.values = flushed
                constant.data_location = None  # in memory now (a large one goes back to disk by release_weights)
            else:
                # attribute values are shared between graph copies
                holder.attrs["value"] = gs.Constant(constant.name, flushed, export_dtype=constant.export_dtype)
        return PassResult(graph, bool(sites), {"flushed": sum(site.data[2] for site in sites), "tensors": len(sites)})

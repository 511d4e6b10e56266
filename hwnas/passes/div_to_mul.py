"""div-to-mul: a division by a float constant becomes a multiplication by its reciprocal (exact).

Before → After::

    x ─► Div(c) ─► y          x ─► Mul(1/c) ─► y

Math: x / c = x · (1/c) for every finite non-zero c; in float32 the two differ by at most the rounding
of 1/c (one unit in the last place, nothing at all for powers of two), well within the verifier's
tolerance.

Why: ONNX Runtime's quantizer has no QDQ form for Div by a constant, so it leaves such a Div float
between a DequantizeLinear and a QuantizeLinear; Qualcomm's HTP backend then fails to finalize the
graph (PP-OCRv4 det, whose decomposed hard-swish divides by 6: "Failed to finalize QNN graph. Error:
QNN_COMMON_ERROR_MEM_ALLOC", found by bisection with `hwnas check --target qnn-htp --require-npu`).
A Mul by a constant is quantized like any other, and the graph compiles with every node on the NPU.
The `qnn` preset of `quantize` runs this pass first.

Sites are the Div nodes; skipped with a reason: the divisor is not a constant, is not a float tensor,
has a zero or a non-finite element, or the dividend is the constant (c / x is not a product).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from hwnas.graph.gsgraph import unique_name
from hwnas.passes.base import Pass, PassContext, PassResult, Site
from hwnas.passes.registry import register_pass


def _skip_reason(node: gs.Node) -> str | None:
    if len(node.inputs) != 2:
        return f"Div {node.name} has {len(node.inputs)} inputs"
    divisor = node.inputs[1]
    if not isinstance(divisor, gs.Constant):
        return f"the divisor {divisor.name} is computed at run time, not a constant"
    value = divisor.values
    if not np.issubdtype(value.dtype, np.floating):
        return f"the divisor {divisor.name} is {value.dtype} (integer division rounds; not a product)"
    if value.size == 0 or not np.all(np.isfinite(value)) or np.any(value == 0):
        return f"the divisor {divisor.name} has a zero or non-finite element"
    return None


@register_pass
class DivToMul(Pass):
    name = "div-to-mul"
    summary = "Div by a float constant -> Mul by its reciprocal (the form quantizers and NPUs take)"

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        return [Site((node.name,), f"Div {node.name}", _skip_reason(node), node)
                for node in graph.nodes if node.op == "Div" and node.domain in ("", "ai.onnx", None)]

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        for site in sites:
            node = site.data
            divisor = node.inputs[1]
            reciprocal = np.asarray(np.ones((), divisor.values.dtype) / divisor.values, divisor.values.dtype)
            node.op = "Mul"
            node.inputs[1] = gs.Constant(unique_name(graph, f"{divisor.name}_reciprocal"), reciprocal)
        return PassResult(graph, bool(sites), {"rewritten": len(sites)})

"""fold-constants: evaluate subgraphs whose inputs are all constants (exact).

Before → After::

    Constant ─► Reshape(shape=Constant) ─► Conv      becomes      Constant' ─► Conv

onnx-graphsurgeon evaluates the constant subgraphs with ONNX Runtime and replaces them with their
values; the result is the same tensor the runtime would compute. Shape computations on dynamic dims are
left alone (they are not constant), so the model keeps its dynamic signature. A subgraph that cannot be
evaluated (one that asks for more memory than there is) stays as it is, silently: the sessions that
verify the model report such a model as one line.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from hwnas.graph.session import quiet_ort
from hwnas.passes.base import Pass, PassContext, PassResult, Site
from hwnas.passes.registry import register_pass


@register_pass
class FoldConstants(Pass):
    name = "fold-constants"
    summary = "evaluate constant subgraphs (onnx-graphsurgeon + ONNX Runtime)"

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        return [Site((), "the whole graph")]

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        before = len(graph.nodes)
        quiet_ort()
        with G_LOGGER.suppress(G_LOGGER.CRITICAL):  # its warnings are about subgraphs it leaves alone
            graph.fold_constants(error_ok=True, fold_shapes=False).cleanup()
        return PassResult(graph, len(graph.nodes) != before, {"nodes_removed": before - len(graph.nodes)})

"""eliminate-identity: remove Identity nodes (and Dropout in inference form) (exact).

Before → After::

    a ─► Identity ─► b ─► Conv          a ─► Conv   (Conv now reads a)

Consumers of the Identity's output read its input instead. When the output is a graph output, the
Identity is kept unless its input can take the output's name (it is produced by a node, is not itself a
graph input or output, and has no other consumer), so graph output names never change.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from hwnas.graph.gsgraph import is_graph_output, producer
from hwnas.passes.base import Pass, PassContext, PassResult, Site
from hwnas.passes.registry import register_pass


def _is_identity(node: gs.Node) -> bool:
    if node.op == "Identity":
        return True
    # Dropout with no mask output and no training flag is the identity at inference
    return node.op == "Dropout" and len(node.outputs) == 1 and len(node.inputs) < 3


@register_pass
class EliminateIdentity(Pass):
    name = "eliminate-identity"
    summary = "remove Identity (and inference-mode Dropout) nodes"

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        sites = []
        for node in graph.nodes:
            if not _is_identity(node):
                continue
            src, dst = node.inputs[0], node.outputs[0]
            reason = None
            if is_graph_output(graph, dst):
                if producer(src) is None or is_graph_output(graph, src) or src in graph.inputs:
                    reason = f"{dst.name} is a graph output fed directly by {src.name}"
                elif len(src.outputs) > 1:
                    reason = f"{dst.name} is a graph output and {src.name} has other consumers"
            sites.append(Site((node.name,), f"{node.op} {node.name}", reason, node))
        return sites

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        for site in sites:
            node = site.data
            src, dst = node.inputs[0], node.outputs[0]
            if is_graph_output(graph, dst):
                # the producer of src writes dst directly, so the graph output keeps its name
                prod = producer(src)
                node.outputs.clear()
                prod.outputs[prod.outputs.index(src)] = dst
            else:
                for consumer in list(dst.outputs):
                    consumer.inputs[consumer.inputs.index(dst)] = src
                node.outputs.clear()
            node.inputs.clear()
        return PassResult(graph, bool(sites), {"removed": len(sites)})

"""schedule-memory: reorder nodes to lower peak activation memory (exact).

Before → After (a residual block with a wide side branch)::

    a = conv1(x); b = conv2(x); c = big(b); d = small(c); y = add(a, d)       peak: x, a, b, c alive
    b = conv2(x); c = big(b); d = small(c); a = conv1(x); y = add(a, d)       peak: x, b, c (a not yet)

ONNX Runtime executes nodes in graph order, so the order decides which tensors coexist (see
`hwnas.estimator.memory` for the liveness model). Any topological order computes the same function;
only which buffers are alive together changes. Finding the optimal order is NP-hard in general, so
several orders are scored and the best kept: the current one, two greedy list schedules (among ready
nodes take the one that adds the fewest net bytes, or the one with the smallest step peak) and a
depth-first one (finish the branch that needs more memory first). The pass only rewrites when an order
is strictly better; otherwise its site says the current order is already the best found, and whether
it meets the lower bound (the largest single node's inputs + outputs), which no order can beat.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import onnx_graphsurgeon as gs

from hwnas.estimator.memory import Step, activation_sizes, peak_activation
from hwnas.graph.gsgraph import to_model
from hwnas.graph.io import graph_inputs
from hwnas.passes.base import Pass, PassContext, PassResult, Site
from hwnas.passes.registry import register_pass

Order = list[int]


def _dependencies(steps: Sequence[Step]) -> tuple[list[set[int]], list[set[int]]]:
    producer = {t: i for i, s in enumerate(steps) for t in s.outputs}
    preds = [{producer[t] for t in s.inputs if t in producer} for s in steps]
    succs: list[set[int]] = [set() for _ in steps]
    for i, ps in enumerate(preds):
        for p in ps:
            succs[p].add(i)
    return preds, succs


def _greedy(steps: Sequence[Step], sizes: Mapping[str, int], keep: set[str], key: str) -> Order:
    """List scheduling: repeatedly run the ready node that is cheapest by `key` (net bytes or step peak)."""
    preds, succs = _dependencies(steps)
    remaining_uses: dict[str, int] = {}
    for s in steps:
        for t in set(s.inputs):
            remaining_uses[t] = remaining_uses.get(t, 0) + 1
    waiting = [len(p) for p in preds]
    ready = {i for i, w in enumerate(waiting) if w == 0}
    live = sum(sizes.get(t, 0) for t in keep if t in remaining_uses)
    order: Order = []
    while ready:
        def cost(i: int) -> tuple:
            alloc = sum(sizes.get(t, 0) for t in steps[i].outputs)
            freed = sum(sizes.get(t, 0) for t in set(steps[i].inputs) if remaining_uses[t] == 1 and t not in keep)
            return ((alloc - freed, live + alloc) if key == "net" else (live + alloc, alloc - freed)) + (i,)

        best = min(ready, key=cost)
        ready.remove(best)
        order.append(best)
        live += sum(sizes.get(t, 0) for t in steps[best].outputs)
        for t in set(steps[best].inputs):
            remaining_uses[t] -= 1
            if remaining_uses[t] == 0 and t not in keep:
                live -= sizes.get(t, 0)
        for s in succs[best]:
            waiting[s] -= 1
            if waiting[s] == 0:
                ready.add(s)
    return order


def _depth_first(steps: Sequence[Step], sizes: Mapping[str, int]) -> Order:
    """Post-order from the outputs, visiting the predecessor subtree with the largest output first."""
    preds, succs = _dependencies(steps)
    heavy = [sum(sizes.get(t, 0) for t in s.outputs) for s in steps]
    done: set[int] = set()
    order: Order = []
    sinks = [i for i in range(len(steps)) if not succs[i]]
    stack: list[tuple[int, bool]] = [(i, False) for i in reversed(sinks)]
    while stack:
        i, expanded = stack.pop()
        if i in done:
            continue
        if expanded:
            done.add(i)
            order.append(i)
            continue
        stack.append((i, True))
        for p in sorted(preds[i] - done, key=lambda p: heavy[p]):  # heaviest popped first
            stack.append((p, False))
    return order


def best_order(steps: Sequence[Step], sizes: Mapping[str, int], inputs: Sequence[str], outputs: Sequence[str]):
    """(order, peak) of the best schedule found, the current order first so that ties keep it."""
    keep = set(inputs) | set(outputs)
    candidates: list[Callable[[], Order]] = [
        lambda: list(range(len(steps))),
        lambda: _greedy(steps, sizes, keep, "net"),
        lambda: _greedy(steps, sizes, keep, "peak"),
        lambda: _depth_first(steps, sizes),
    ]
    best = None
    for make in candidates:
        order = make()
        if len(order) != len(steps):
            continue
        peak = peak_activation([steps[i] for i in order], sizes, inputs, outputs)
        if best is None or peak.bytes < best[1].bytes:
            best = (order, peak)
    return best


@register_pass
class ScheduleMemory(Pass):
    name = "schedule-memory"
    summary = "reorder nodes (a valid topological order) to lower peak activation memory"

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        model = to_model(graph.copy(), ctx.template)
        steps = [
            Step(n.name or f"{n.op}#{i}", tuple(t.name for t in n.inputs if t.name), tuple(t.name for t in n.outputs))
            for i, n in enumerate(graph.nodes)
        ]
        sizes = activation_sizes(model, ctx.input_shapes)
        inputs, outputs = [i.name for i in graph_inputs(model)], [o.name for o in model.graph.output]
        current = peak_activation(steps, sizes, inputs, outputs)
        order, peak = best_order(steps, sizes, inputs, outputs)
        if peak.bytes < current.bytes:
            return [Site((), f"peak activation {current.bytes:,} → {peak.bytes:,} bytes (lower bound {peak.lower_bound:,})", None, (order, current.bytes, peak.bytes))]
        optimal = "optimal: it meets the lower bound" if current.bytes == current.lower_bound else f"lower bound {current.lower_bound:,}"
        return [Site((), "the node order", f"current order is already the best found: peak {current.bytes:,} bytes ({optimal})")]

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        order, before, after = sites[0].data
        nodes = list(graph.nodes)
        graph.nodes = [nodes[i] for i in order]
        return PassResult(graph, True, {"peak_before": before, "peak_after": after})

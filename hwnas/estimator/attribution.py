"""Measuring kernels in context: a network run with ONNX Runtime's per-node profiler, its time attributed to kernels.

Each node ORT ran is attributed to the kernel of `decompose` it came from (by node name; layout copies
that ORT inserts, ReorderInput/ReorderOutput, go to the plain-layout op beside them, the one that needs
the copy), minus what the profiler adds to a node and plus what the executor spends on it (both measured
once on trivial chains: `measure_node_overheads`; the profiler's cost then on a few small real networks:
`real_node_excess`). So a network's kernels add up to its latency, layout copies and cache state included,
which one-kernel models get wrong on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx

from hwnas.estimator.networks import NetworkBuilder
from hwnas.graph.shapes import Shape
from hwnas.targets.fusion_rules import FusionRules
from hwnas.targets.kernels import Kernel, carriers, decompose, node_keys

@dataclass(frozen=True)
class NetworkProfile:
    """One profiled network: each kernel's time inside it, and how the times were obtained."""

    kernels: tuple[Kernel, ...]  # the non-free kernels that ran as node(s) of their own
    latency_ms: tuple[float, ...]
    total_ms: float  # the plain runs' median
    nodes_ms: float  # the profiled nodes' sum (per run, median per node)
    dropped: tuple[str, ...] = ()  # kernels without a node of their own, and the kernels they were fused into
    # the time of each of `dropped`: what ORT's fused node took is attributed to one of them, so no sample, but
    # part of the network's time (a sum over `kernels` alone falls short of the run where ORT fused much)
    dropped_ms: tuple[float, ...] = ()

    @property
    def kernels_ms(self) -> dict[str, float]:
        """Every kernel's time by name, the dropped ones included: they add up to the network's time."""
        return {**dict(zip(self.dropped, self.dropped_ms)), **{k.name: t for k, t in zip(self.kernels, self.latency_ms)}}


@dataclass(frozen=True)
class NodeOverheads:
    """What a run costs besides its nodes' work, on this machine (`measure_node_overheads`)."""

    profiler_ms: float = 0.0  # what ORT's profiler adds to every node it times (subtracted)
    executor_ms: float = 0.0  # what the executor spends per node outside the profiled time (added)
    run_ms: float = 0.0  # what every run costs once: the Python call, feeding inputs, fetching outputs (added)


def measure_in_context(model: onnx.ModelProto, shapes: Mapping[str, Shape], rules: FusionRules, settings,
                       providers=("CPUExecutionProvider",), overheads: NodeOverheads = NodeOverheads(),
                       scale_to_run: bool = False) -> NetworkProfile:
    """Run `model` with ORT's profiler (and plainly, for `total_ms`) and attribute the time to its kernels."""
    model = _named(model)
    plain_ms, timings, optimized = _profile_and_time(model, shapes, settings, providers)
    kernels = decompose(model, shapes, rules)
    return attribute(model, kernels, timings, optimized, float(np.median(plain_ms)), overheads, scale_to_run)


def measure_node_overheads(settings, providers=("CPUExecutionProvider",), nodes: int = 128) -> NodeOverheads:
    """Time chains of 1 and `nodes` trivial ops (Relu/Neg on 16 numbers), profiled and plain.

    executor = (T_plain(nodes) − T_plain(1)) / (nodes − 1), the whole cost of a trivial node (~0.25 µs on a
    2-core EPYC, ORT 1.32); run = T_plain(1) − executor (~5 µs); profiler = the profiled duration of a
    trivial node minus executor (~1.8 µs: left in, every small kernel would look 2 µs slower than it is).
    Tiny models, medians over 200 runs: robust to a busy machine, unlike a big network's run median."""
    def chain(n: int) -> onnx.ModelProto:
        b = NetworkBuilder()
        x = b.input("x", (1, 16))
        for i in range(n):
            x = b.node("Relu" if i % 2 == 0 else "Neg", [x], (1, 16))
        return b.model([x])

    runs = dataclasses.replace(settings, warmup=max(settings.warmup, 10), repeats=max(settings.repeats, 200), min_seconds=0.0)
    one, _, _ = _profile_and_time(chain(1), {}, runs, providers)
    many, timings, _ = _profile_and_time(chain(nodes), {}, runs, providers)
    executor = max(0.0, float(np.median(many) - np.median(one)) / (nodes - 1))
    profiled = sum(t.duration_ms for t in timings) / nodes
    return NodeOverheads(profiler_ms=max(0.0, profiled - executor), executor_ms=executor,
                         run_ms=max(0.0, float(np.median(one)) - executor))


def real_node_excess(networks: Sequence[onnx.ModelProto], overheads: NodeOverheads, settings,
                     providers=("CPUExecutionProvider",), measure: Callable | None = None) -> float:
    """What ORT's profiler adds to a node of a real network beyond `overheads.profiler_ms` (measured on trivial
    nodes), in ms: over `networks` (static inputs), the median of (their nodes' times, corrected by `overheads`,
    minus their plain run) per node, each network weighted by (nodes / plain run)²: the plain run's noise grows
    with its time, and per node it shrinks with the nodes. `measure(fn)` takes each network's timing (a
    `QuietGate.measure`); None: at once.

    Why: real nodes cost the profiler ~1 us more than trivial ones (2-core Xeon, ORT 1.32), which left small
    models of many nodes 10-30 % over their runs, and chains of one op do not predict it (estimator-history.md,
    stop 46): so it is measured on networks like the profiled ones."""
    per_node, weights = [], []
    for model in networks:
        def timed(model=model):
            return _profile_and_time(model, {}, settings, providers)

        plain_ms, timings, _ = timed() if measure is None else measure(timed)
        plain = float(np.median(plain_ms))
        if timings and plain > 0:
            corrected = sum(_corrected(t.duration_ms, overheads) for t in timings) + overheads.run_ms
            per_node.append((corrected - plain) / len(timings))
            weights.append((len(timings) / plain) ** 2)
    if not per_node:
        return 0.0
    order = np.argsort(per_node)
    cumulative = np.cumsum(np.asarray(weights)[order])
    return float(np.asarray(per_node)[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def _corrected(duration_ms: float, overheads: NodeOverheads) -> float:
    """A node's profiled time without what the profiler adds to it, with what the executor spends outside it."""
    return max(duration_ms - overheads.profiler_ms, 0.05 * duration_ms) + overheads.executor_ms


def _profile_and_time(model: onnx.ModelProto, shapes: Mapping[str, Shape], settings, providers):
    """(plain run times, per-node timings, ORT's optimized graph) of `model`: a profiled session run
    `warmup` + `repeats` times back to back, then a plain one timed with the protocol of
    `hwnas.targets.measure` — each warm, as the `cpu` target measures a model (running the two in
    alternation would leave each run the other's caches: 20-50 % slower on a 1 ms model)."""
    from hwnas.graph.shapes import resolve_input_shapes
    from hwnas.targets.measure import interleave, node_timings, profiling_session
    from hwnas.graph.session import make_session, random_feeds, run

    feeds = random_feeds(model, resolve_input_shapes(model, shapes), seed=0)
    with tempfile.TemporaryDirectory(prefix="hwnas-context-") as tmp:
        # the optimized graph gives node names and wiring as ORT runs them
        profiled = profiling_session(model, settings, providers, os.path.join(tmp, "trace"),
                                     os.path.join(tmp, "optimized.onnx"))
        for _ in range(settings.warmup + settings.repeats):
            run(profiled, feeds)
        with open(profiled.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
        optimized = onnx.load(os.path.join(tmp, "optimized.onnx"))
    del profiled
    plain = make_session(model, optimized=True, threads=settings.threads, providers=list(providers))
    plain_ms = interleave({"plain": partial(run, plain, feeds)}, settings)["plain"]
    return plain_ms, node_timings(events, skip_runs=settings.warmup), optimized


def attribute(model: onnx.ModelProto, kernels: Sequence[Kernel], timings, optimized: onnx.ModelProto,
              total_ms: float, overheads: NodeOverheads = NodeOverheads(), scale_to_run: bool = False) -> NetworkProfile:
    """Each non-free kernel's time inside the network: the nodes ORT ran for it, plus the executor's share.

    Which kernel an ORT node (of `optimized`, ORT's graph as it ran) belongs to:
    - a node named like an original node (ORT's fused and blocked-layout nodes keep one of their
      original nodes' names, blocked ones with `_nchwc` added): that node's kernel;
    - a layout copy ORT inserted: the plain-layout op beside it, the one that needs the copy (a
      ReorderOutput belongs to the op that reads its output, a ReorderInput to the op that wrote its
      input; the other side where that is a model input or output);
    - any other node ORT made (a function op expanded, e.g. HardSwish into HardSigmoid and Mul; the
      Reshapes around a blocked-layout Add): the kernel whose original output tensor it, or a node
      after it, writes; failing that, the op before it.
    A node counts its profiled time minus what the profiler adds to it, plus what the executor spends on
    it outside that time (`overheads`, measured once per machine by `measure_node_overheads`); the
    per-run cost is shared equally. So a network's kernels add up to its latency without using its own
    run time, which on a busy machine includes waits for a core that short nodes' medians mostly avoid.
    `scale_to_run=True` scales them to `total_ms` (the plain runs' median) instead: the same on a quiet
    machine. A node of a free kernel (a Reshape ORT runs) counts for the next kernel that is not.
    Kernels ORT ran no node for (it fused them into another kernel's
    node) are dropped, with the kernels that feed them (`dropped`).
    """
    owner = {key: i for i, k in enumerate(kernels) for key in k.nodes}
    original_producer = {o: owner[key] for key, n in zip(_keys(model), model.graph.node) for o in n.output if o}
    reads: dict[int, set[str]] = {}  # by kernel, the tensors its nodes read and write
    writes: dict[int, set[str]] = {}
    for key, n in zip(_keys(model), model.graph.node):
        reads.setdefault(owner[key], set()).update(t for t in n.input if t)
        writes.setdefault(owner[key], set()).update(t for t in n.output if t)
    graph = optimized.graph
    ort_nodes = _named_ort_nodes(graph, timings)
    producer = {o: name for name, n in ort_nodes.items() for o in n.output if o}
    consumers: dict[str, list[str]] = {}
    for name, n in ort_nodes.items():
        for t in dict.fromkeys(t for t in n.input if t):
            consumers.setdefault(t, []).append(name)

    def direct(name: str) -> int | None:
        """The kernel of the original node this ORT node is named after: `X`, `X_nchwc`, `fused X`,
        `X/QuickGeluFusion/`... X is a node name, or for a blocked-layout node (`X_nchwc`) the name of the
        tensor it writes: ORT names those after their output, which only models whose nodes are named
        like their outputs (the profiling networks, the zoo) cannot tell apart."""
        blocked = name.endswith("_nchwc")
        name = name.removeprefix("fused ").removesuffix("_nchwc")
        for names in ((original_producer, owner) if blocked else (owner, original_producer)):
            if name in names:
                return names[name]
        cuts = [i for i, ch in enumerate(name) if ch in "/_:"]
        return next((owner[name[:i]] for i in reversed(cuts) if name[:i] in owner), None)

    def written(node) -> int | None:
        return next((original_producer[t] for t in node.output if t in original_producer), None)

    def downstream(name: str, seen: set[str]) -> int | None:
        """The kernel of a node ORT made: the original tensor it or a later made node writes, or the op it feeds."""
        hit = direct(name)
        if hit is not None or name in seen or name not in ort_nodes:
            return hit
        seen.add(name)
        node = ort_nodes[name]
        hit = written(node)
        if hit is not None or node.op_type == "ReorderOutput":
            return hit
        return next((k for t in node.output for c in consumers.get(t, ()) if (k := downstream(c, seen)) is not None), None)

    def upstream(name: str, seen: set[str]) -> int | None:
        hit = direct(name)
        if hit is not None or name in seen or name not in ort_nodes:
            return hit
        seen.add(name)
        return next((k for t in ort_nodes[name].input if t in producer if (k := upstream(producer[t], seen)) is not None), None)

    def between(node) -> int | None:
        """The one original kernel that reads what the kernels before `node` write and writes what the kernels
        after it read: an op ORT rewrote into a node of its own between two others (a decomposed GELU run as one
        Gelu node on the blocked tensors between two convs, which writes no original tensor)."""
        before = {k for t in node.input if t in producer if (k := upstream(producer[t], set())) is not None}
        after = {k for t in node.output for c in consumers.get(t, ()) if (k := downstream(c, set())) is not None}
        written_before = set().union(*(writes[k] for k in before))
        read_after = set().union(*(reads[k] for k in after))
        found = [k for k in writes if k not in before | after and reads[k] & written_before and writes[k] & read_after]
        return found[0] if len(found) == 1 else None

    def resolve(name: str, seen: frozenset[str] = frozenset()) -> int | None:
        hit = direct(name)
        node = ort_nodes.get(name)
        if hit is not None or node is None or name in seen:
            return hit
        seen = seen | {name}
        readers = [c for t in node.output for c in consumers.get(t, ())]
        writers = [producer[t] for t in node.input if t in producer]
        if node.op_type == "ReorderOutput":
            found = (resolve(c, seen) for c in readers)
            return next((k for k in found if k is not None), written(node))
        if node.op_type == "ReorderInput":
            found = (resolve(n, seen) for n in writers + readers)
            return next((k for k in found if k is not None), None)
        if written(node) is None and (found := between(node)) is not None:
            return found
        found = downstream(name, set())
        return found if found is not None else upstream(name, set())

    times = np.zeros(len(kernels))
    counts = np.zeros(len(kernels))
    carrier = carriers(kernels)
    for t in timings:
        k = resolve(t.name)
        k = carrier[k] if k is not None else None
        if k is not None:
            times[k] += _corrected(t.duration_ms, overheads)
            counts[k] += 1
    nodes_ms = float(sum(t.duration_ms for t in timings))
    live = np.array([k.kind != "free" and counts[i] > 0 for i, k in enumerate(kernels)], dtype=bool)
    if live.any():
        times[live] += overheads.run_ms / live.sum()
    if scale_to_run and times[live].sum() > 0:
        times[live] *= total_ms / float(times[live].sum())
    dropped = _absorbed(model, kernels, live)
    keep = [i for i in range(len(kernels)) if live[i] and kernels[i].name not in dropped]
    dropped_names = tuple(sorted(dropped))
    by_name = {k.name: float(times[i]) for i, k in enumerate(kernels) if live[i]}
    return NetworkProfile(tuple(kernels[i] for i in keep), tuple(float(times[i]) for i in keep), total_ms, nodes_ms,
                          dropped_names, tuple(by_name.get(name, 0.0) for name in dropped_names))


def _named_ort_nodes(graph: onnx.GraphProto, timings) -> dict[str, onnx.NodeProto]:
    """ORT's graph by the names its profiler uses. The saved graph leaves the nodes of an inlined function
    (HardSwish → HardSigmoid, Mul) unnamed while the profiler calls them `<op>_<index>`: those are
    matched by op type in execution order, which is the saved graph's order."""
    named = {n.name: n for n in graph.node if n.name}
    unnamed: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        if not n.name:
            unnamed.setdefault(n.op_type, []).append(n)
    for t in timings:
        if t.name not in named and unnamed.get(t.op_type):
            named[t.name] = unnamed[t.op_type].pop(0)
    return named


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every node named by its key (`node_keys`, what its kernels are named by). ORT names the nodes it
    makes after an original node's name, which an unnamed node cannot lend: in a quantized model whose Convs had no
    names, the QLinearConvs ORT made (named `_token_N`, writing tensors of its own) all went to the last kernel."""
    keys = _keys(model)
    if all(n.name == key for n, key in zip(model.graph.node, keys)):
        return model
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for node, key in zip(named.graph.node, keys):
        node.name = key
    return named


def _keys(model: onnx.ModelProto) -> tuple[str, ...]:
    return node_keys(list(model.graph.node))


def _absorbed(model: onnx.ModelProto, kernels: Sequence[Kernel], live: np.ndarray) -> set[str]:
    """Kernels ORT ran no node for (it fused them into a neighbour), and the kernels that feed them."""
    owner = {key: k.name for k in kernels for key in k.nodes}
    nodes = list(model.graph.node)
    keys = _keys(model)
    producer = {o: keys[i] for i, n in enumerate(nodes) for o in n.output if o}
    inputs_of = {keys[i]: [t for t in n.input if t] for i, n in enumerate(nodes)}
    dropped: set[str] = set()
    for i, k in enumerate(kernels):
        if k.kind == "free" or live[i]:
            continue
        dropped.add(k.name)
        for key in k.nodes:
            for t in inputs_of.get(key, ()):
                if t in producer and owner.get(producer[t]) not in (None, k.name):
                    dropped.add(owner[producer[t]])
    return dropped


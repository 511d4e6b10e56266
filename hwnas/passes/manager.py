"""Runs a pipeline: match, select sites, apply, clean up, record statistics, optionally verify each step.

Like MLIR's pass manager, every step leaves a record (sites matched, applied and skipped with their
reasons, node count change, time) and, with `verify_each`, a verifier runs after each pass so that a
broken rewrite is pinned on the pass that made it, naming the passes that ran before.

Copying a graph per pass copies no weights (onnx-graphsurgeon shares the arrays). For a model over
`hwnas.graph.io.LARGE_MODEL_BYTES` the weights a pass wrote are moved to a temporary data file after it
(`release_weights`), so a pipeline holds at most one pass's new weights in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from hwnas.errors import BadInputError, CheckFailedError
from hwnas.graph.gsgraph import release_weights, stable_toposort
from hwnas.passes.base import Exactness, PassContext, Site, weakest
from hwnas.passes.pipeline import Pipeline
from hwnas.passes.registry import get_pass
from hwnas.verify.policy import Verdict

# (graph before the pass, graph after it, the pass's class) -> the policy's verdict (hwnas.verify.policy): an
# exact step is judged Exact against the graph it was given, whatever the pipeline's policy and the steps before it
Verifier = Callable[[gs.Graph, gs.Graph, Exactness], Verdict]


@dataclass
class PassRecord:
    spec: str
    exactness: Exactness
    sites: list[Site]
    applied: list[Site]
    modified: bool
    nodes_before: int
    nodes_after: int
    seconds: float
    stats: dict[str, float] = field(default_factory=dict)
    verified: bool | None = None

    @property
    def skipped(self) -> list[Site]:
        return [s for s in self.sites if not s.applicable]

    def to_dict(self) -> dict:
        return {
            "pass": self.spec,
            "exactness": self.exactness.value,
            "modified": self.modified,
            "sites_applicable": sum(s.applicable for s in self.sites),
            "sites_applied": len(self.applied),
            "skipped": [{"nodes": list(s.nodes), "reason": s.reason} for s in self.skipped],
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "seconds": round(self.seconds, 4),
            "stats": self.stats,
            "verified": self.verified,
        }


@dataclass
class PipelineRun:
    graph: gs.Graph
    records: list[PassRecord]

    @property
    def exactness(self) -> Exactness:
        """The weakest class among the passes that changed something."""
        return weakest(r.exactness for r in self.records if r.modified)


class PassFailedVerification(CheckFailedError):
    def __init__(self, spec: str, before: list[str], detail: str):
        ran = ", ".join(before) if before else "none"
        super().__init__(f"verification failed after pass {spec!r} (passes before it: {ran}): {detail}")
        self.spec = spec


class PassManager:
    def __init__(self, pipeline: Pipeline, disabled: set[str] | frozenset[str] = frozenset(),
                 verify_each: Verifier | None = None, in_place: bool = False, strict_sites: bool = False):
        for name in disabled:
            get_pass(name)  # an unknown name would disable nothing, silently
        self.pipeline = pipeline.without(set(disabled))
        self.verify_each = verify_each
        # in place: the caller hands over a graph it will throw away if a pass fails (the search does),
        # saving one graph copy per pass
        self.in_place = in_place
        # strict: a `sites=` selector that picks nothing is a usage error (a user's pipeline); the search
        # compiles `@node` selectors for sites an earlier step of the same candidate may have removed
        self.strict_sites = strict_sites

    def run(self, graph: gs.Graph, ctx: PassContext, progress: Callable[[str], None] | None = None) -> PipelineRun:
        records: list[PassRecord] = []
        for spec in self.pipeline.steps:
            if progress:
                progress(str(spec))
            the_pass = spec.instantiate()
            start = time.perf_counter()
            nodes_before = len(graph.nodes)
            work = graph if self.in_place else graph.copy()  # else a pass that raises leaves the graph as it was
            before = graph.copy() if self.verify_each is not None else None  # weights are shared, not copied
            sites = the_pass.match(work, ctx)
            selector = spec.sites
            applicable = [s for s in sites if s.applicable]
            if self.strict_sites and selector is not None and (why := selector.unmatched(sites)):
                raise BadInputError(f"pass {str(spec)!r}: {why} (`hwnas run --dry-run` lists the sites)")
            chosen = [s for i, s in enumerate(applicable) if selector is None or selector.selects(i, s.nodes)]
            result = the_pass.apply(work, chosen, ctx) if chosen else None
            if result is not None and result.modified:
                graph = result.model
                stable_toposort(graph.cleanup())
                release_weights(graph)  # a large model's new weights go to disk before the next pass adds more
            record = PassRecord(
                spec=str(spec),
                exactness=the_pass.exactness,
                sites=sites,
                applied=chosen if result is not None and result.modified else [],
                modified=result is not None and result.modified,
                nodes_before=nodes_before,
                nodes_after=len(graph.nodes),
                seconds=time.perf_counter() - start,
                stats=dict(result.stats) if result else {},
            )
            records.append(record)
            if self.verify_each is not None and record.modified:
                verdict = self.verify_each(before, graph, record.exactness)
                record.verified = verdict.ok
                if not verdict.ok:
                    raise PassFailedVerification(record.spec, [r.spec for r in records[:-1]], verdict.detail)
        return PipelineRun(graph, records)

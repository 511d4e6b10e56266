"""Hints: per-layer advice a person can act on, each with the pipeline step that implements it and its saving.

The reference work's expert-in-the-loop: when there is no time to search, an expert applies what
searches on similar models found — regroup depthwise convs, fuse early IBN blocks, align channel counts
to the parallelism factor. `hints` says where each of those pays on *this* model and target, and how much:
every site the curated search space offers (hwnas.search.space, the target's PF) is tried alone, the
candidate's latency comes from the target's estimator (never the simulator), and the saving is the
prepared model's estimated latency minus the candidate's. Per site the best choice is kept; sites whose
saving is below `min_share` of the model's latency are left out (the estimator says they do not pay, as
it says for the late, wide IBN blocks on an array). Hints come sorted by saving, largest first.

- regroup: a depthwise conv → grouped conv with PF (or PF/2) channels per group, or dense. When the
  channel count is not a multiple of the group size, the hint pads its channel group first (two steps).
- fuse: exact fusion of two linear convs (fuse-ibn mode=linear).
- mbconv: Fused-MBConv (expand 1×1 + act + depthwise → one K×K conv); reconstructed: refit on calibration
  data or fine-tune. Estimated with the fit skipped (`fit=compose`): latency depends on the architecture
  only, and the least-squares fit costs seconds per block.
- align: pad a channel group to a multiple of PF (exact), with the lanes it leaves idle today.

Savings are not additive: two hints on the same block interact, and the search combines them properly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import onnx
import onnx_graphsurgeon as gs

from hwnas.errors import HwnasError
from hwnas.estimator.estimator import LatencyEstimator
from hwnas.graph.gsgraph import to_graph, to_model
from hwnas.graph.shapes import Shape
from hwnas.passes.base import Exactness, PassContext
from hwnas.passes.manager import PassManager
from hwnas.passes.pipeline import parse_pipeline
from hwnas.passes.registry import get_pass
from hwnas.search.evaluate import CandidateEvaluator
from hwnas.search.proxy import architecture_only
from hwnas.search.space import KEEP, PREFIX, Decision, SearchSpace, SpaceOptions, build_space
from hwnas.targets.base import Target


ADVISED = ("dw", "align", "fuse", "mbconv")  # per-site decisions; a global depth multiplier is a trade, not advice


@dataclass(frozen=True)
class Hint:
    kind: str  # regroup, fuse, mbconv, align
    node: str  # the node the rewrite starts from: the depthwise conv, the expand conv, a channel group's producer
    message: str
    pipeline: str  # the step(s) that implement it, to run after the exact prefix (hwnas run --passes)
    saving_ms: float  # estimated latency saved by this rewrite alone
    share: float  # saving_ms / the model's estimated latency
    exact: bool

    def to_dict(self) -> dict:
        return asdict(self)


def hints(
    model: onnx.ModelProto,
    target: Target,
    input_shapes: Mapping[str, Shape],
    estimator: LatencyEstimator,
    min_share: float = 0.001,
) -> list[Hint]:
    """Every single rewrite that saves at least `min_share` of the estimated latency, largest saving first."""
    pf = target.parallelism_factor
    ctx = PassContext(template=model, input_shapes=input_shapes)
    prepared = PassManager(parse_pipeline(PREFIX)).run(to_graph(model), ctx).graph
    evaluator = CandidateEvaluator(to_model(prepared.copy(), model), prepared, ctx, estimator, count_memory=False)
    space = build_space(prepared, ctx, SpaceOptions(pf, curated=True, allow_reconstructed=True))
    pads = _pads_by_node(space, prepared, ctx, pf)
    baseline = estimator.estimate(evaluator.base, input_shapes).latency_ms
    if baseline <= 0:
        return []  # nothing the target spends time on (every kernel free): nothing to save
    found = []
    for decision in (d for d in space.decisions if d.kind in ADVISED):
        tried = [_try(space, evaluator, _candidate(decision, choice, pads), baseline)
                 for choice in decision.choices if choice != KEEP]
        best = max((t for t in tried if t is not None), key=lambda t: t[0], default=None)
        if best is not None and best[0] >= min_share * baseline:
            saving, candidate, exact = best
            found.append(_hint(space, decision, candidate, saving, baseline, exact, pf))
    return sorted(found, key=lambda h: -h.saving_ms)


def _pads_by_node(space: SearchSpace, graph: gs.Graph, ctx: PassContext, pf: int) -> dict[str, Decision]:
    """For every node of a channel group the space can pad, the decision that pads it."""
    by_anchor = {d.anchor: d for d in space.decisions if d.kind == "align"}
    sites = get_pass("align-channels")(multiple=pf, mode="pad").match(graph, ctx)
    return {node: by_anchor[s.nodes[0]] for s in sites if s.nodes and s.nodes[0] in by_anchor for node in s.nodes}


def _candidate(decision: Decision, choice: str, pads: Mapping[str, Decision]) -> dict[str, str]:
    """The one rewrite, with the padding a regroup needs when the channels are not a multiple of its group size."""
    candidate = {decision.key: choice}
    needs_pad = decision.kind == "dw" and choice.startswith("g") and decision.channels % int(choice[1:]) != 0
    if needs_pad and decision.anchor in pads:
        pad = pads[decision.anchor]
        candidate[pad.key] = pad.choices[1]  # the curated space pads to the PF only
    return candidate


def _try(space: SearchSpace, evaluator: CandidateEvaluator, candidate: dict[str, str],
         baseline: float) -> tuple[float, dict[str, str], bool] | None:
    """(saving, candidate, exact) of one rewrite, None when it cannot be built here."""
    try:
        model, exactness = evaluator.build(architecture_only(space.compile(candidate)))
        latency = evaluator.estimator.estimate(model, evaluator.ctx.input_shapes).latency_ms
    except (HwnasError, ValueError, RuntimeError):  # as the search: a rewrite that cannot be built is no advice
        return None
    return baseline - latency, candidate, exactness is Exactness.EXACT


def _hint(space: SearchSpace, decision: Decision, candidate: Mapping[str, str], saving: float, baseline: float,
          exact: bool, pf: int) -> Hint:
    kind, what = _describe(decision, candidate, pf)
    return Hint(kind, decision.anchor, f"{what} — saves {saving:.4f} ms ({saving / baseline:.1%})",
                space.compile(candidate), saving, saving / baseline, exact)


def _describe(decision: Decision, candidate: Mapping[str, str], pf: int) -> tuple[str, str]:
    """The hint's kind and what to do, in words."""
    choice = candidate[decision.key]
    where = f" at {decision.resolution}×{decision.resolution}" if decision.resolution else ""
    padded = math.ceil(decision.channels / pf) * pf
    if decision.kind == "mbconv":
        return "mbconv", (f"block at {decision.anchor}{where}: fuse the expand 1×1 conv and the depthwise conv into one "
                          "conv (Fused-MBConv; reconstructed: refit with --calib or fine-tune)")
    if decision.kind == "fuse":
        return "fuse", f"{decision.anchor}: fuse with the 1×1 conv that follows it (exact)"
    if decision.kind == "align":
        return "align", (f"channel group of {decision.channels} channels at {decision.anchor}: "
                         f"{padded - decision.channels} of {pf} lanes idle in its last fold; pad to {padded} (exact)")
    conv = f"depthwise conv {decision.anchor} ({decision.channels} channels{where})"
    channels = padded if len(candidate) > 1 else decision.channels  # a second decision in it: the padding
    pad = f", after padding its channel group to {channels}" if len(candidate) > 1 else ""
    if choice == "dense" or int(choice[1:]) == channels:
        return "regroup", f"{conv}: make it a dense conv{pad}"
    size = int(choice[1:])
    return "regroup", f"{conv}: regroup to {size} channels per group ({channels // size} groups{pad})"

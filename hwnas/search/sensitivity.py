"""Non-uniform depth: which channel groups to scale, and how far, ranked by latency saved per drift (NetAdapt / AMC style).

One multiplier over every channel group is what the curated space offers the zoo models, but on a real
model the groups differ by an order of magnitude in what scaling them costs in drift for what it saves in
latency. Measured on PP-OCRv4 det at 640² (npu-32x32, 12 fit + 4 judge pages, each group alone on the
prepared graph, latency saved as a share of the baseline's): the 96-channel neck group at `p2o.Conv.37`
saves 4.6 % at m = 0.5 (drift 0.0076) and 9.2 % at 0.25 (0.0165); the 384-channel groups save ~1.2 % at
0.0035–0.011; the small early groups (48 channels, rounded to 32 at every curated multiplier) save
1.3–2.5 % at 0.014–0.023 each, which is why every uniform multiplier (0.75 included) drifts ~0.04.

So before the search, each scale-depth group is scaled alone at each ranking multiplier (`RANKED_MULTIPLIERS`)
and scored by the evaluator as any candidate is (estimated latency, drift on the held-back samples;
in the search's worker processes, in parallel):

    ratio(g, m) = (latency(prepared) − latency(g scaled by m)) / max(drift(g, m), DRIFT_FLOOR)

Walking the measurements by decreasing ratio, each one is taken when it scales its group deeper than
before, charged its lone drift beyond the group's earlier one; the depth decision gains one choice per
level (`LEVELS`): the assignment taken while the summed drift stays within level × the drift budget.
Lone drifts do not add up (over all groups at 0.5 they sum to ~5× uniform m = 0.5's measured 0.039),
so the levels go past the budget and the search judges each choice by its measured drift like any
candidate. A choice reads `ranked7r32` (the first 7 measurements taken) and compiles to one
`scale-depth{multiplier=m,round_to=32,sites=@…}` step per multiplier it uses; the evaluator caches the
leading scale-depth steps' graph as it does a uniform multiplier's, and the expert seeds take each
choice on top of the full expert recipe. Everything is deterministic for a model, calibration and target.

Cost: one evaluation per group and ranking multiplier in the setup (PP-OCRv4 det: 18 groups, 32
measurements, ~5 s each alone). Only searches with a drift budget, reconstructed passes and held-back
calibration samples are ranked; the uniform multipliers stay (the zoo models use them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import onnx_graphsurgeon as gs

from hwnas.passes.base import PassContext
from hwnas.passes.scale_depth import ScaleDepth
from hwnas.search.evaluate import Score
from hwnas.search.space import SAFE_NAME, SearchSpace

RANKED_MULTIPLIERS = ("0.5", "0.25")
LEVELS = (0.5, 1, 1.5, 2, 3, 4, 6, 8)  # × the drift budget: how much summed lone drift each ranked choice may take
DRIFT_FLOOR = 1e-4  # a group whose drift measures below this counts as this (no division by ~0)


@dataclass(frozen=True)
class GroupSensitivity:
    anchor: str  # the group's site anchor (what `sites=@anchor` selects)
    multiplier: str
    channels: int
    latency_saved_ms: float
    drift: float

    @property
    def ratio(self) -> float:
        return self.latency_saved_ms / max(self.drift, DRIFT_FLOOR)


def measure_groups(graph: gs.Graph, ctx: PassContext, round_to: int, score_all: Callable[[list[str]], list[Score]],
                   multipliers: tuple[str, ...] = RANKED_MULTIPLIERS) -> list[GroupSensitivity]:
    """Every applicable scale-depth group scaled alone by each multiplier, scored by `score_all` (candidate
    pipelines → their scores, in order: the search's workers score them in parallel) with the prepared
    graph (the empty pipeline) in the same call, in graph order; a multiplier that leaves a group the count an earlier one did is not measured again, and groups the
    evaluator refuses are left out."""
    measured, counts = [], {}
    for m in multipliers:
        for site in ScaleDepth(multiplier=float(m), round_to=round_to).match(graph, ctx):
            anchor = site.nodes[0] if site.nodes else ""
            if not (site.applicable and SAFE_NAME.match(anchor)) or counts.get(anchor, ()).count(site.data.target):
                continue
            counts[anchor] = (*counts.get(anchor, ()), site.data.target)
            measured.append((anchor, m, site.data.group.channels))
    baseline, *scores = score_all(["", *(f"scale-depth{{multiplier={m},round_to={round_to},sites=@{anchor}}}"
                                         for anchor, m, _ in measured)])
    return [GroupSensitivity(anchor, m, channels, baseline.latency_ms - score.latency_ms, score.drift)
            for (anchor, m, channels), score in zip(measured, scores) if score.error is None]


def ranked_choices(groups: list[GroupSensitivity], budget: float, round_to: int
                   ) -> dict[str, tuple[tuple[str, tuple[str, ...]], ...]]:
    """Choice name (`ranked7r32`) → (multiplier, anchors) pairs: the (group, multiplier) measurements that
    save latency, best ratio first, each taken when it scales its group deeper than a taken one did
    (charged the extra lone drift), cut where the summed drift passes each level × `budget`."""
    order = {g.anchor: i for i, g in enumerate(dict((g.anchor, g) for g in groups).values())}
    ranked = sorted((g for g in groups if g.latency_saved_ms > 0), key=lambda g: (-g.ratio, order[g.anchor], g.multiplier))
    taken: dict[str, GroupSensitivity] = {}
    states, total = [], 0.0  # (summed drift, the assignment) after each measurement taken
    for g in ranked:
        before = taken.get(g.anchor)
        if before is not None and float(g.multiplier) >= float(before.multiplier):
            continue
        total += max(g.drift - (before.drift if before else 0.0), 0.0)
        taken[g.anchor] = g
        states.append((total, dict(taken)))
    choices = {}
    for level in LEVELS:
        within = [i for i, (drift, _) in enumerate(states) if drift <= level * budget]
        if within:
            k = within[-1] + 1
            assignment = states[k - 1][1]
            by_multiplier = {}
            for anchor in sorted(assignment, key=order.get):
                by_multiplier.setdefault(assignment[anchor].multiplier, []).append(anchor)
            choices[f"ranked{k}r{round_to}"] = tuple((m, tuple(a)) for m, a in sorted(by_multiplier.items()))
    return choices


def add_ranked_depth(space: SearchSpace, graph: gs.Graph, ctx: PassContext, score_all: Callable[[list[str]], list[Score]],
                     budget: float) -> list[GroupSensitivity]:
    """Give `space`'s depth decision the ranked choices (module docstring); returns the measurements.
    `score_all`: candidate pipelines → their scores, in order."""
    index = next((i for i, d in enumerate(space.decisions) if d.kind == "depth"), None)
    if index is None:
        return []
    depth = space.decisions[index]
    round_to = space.options.parallelism_factor if space.options.curated else 1
    groups = measure_groups(graph, ctx, round_to, score_all)
    ranked = ranked_choices(groups, budget, round_to)
    space.depth_sites.update(ranked)
    space.decisions[index] = replace(depth, choices=depth.choices + tuple(ranked))
    return groups

"""Non-uniform depth: which channel groups to scale, ranked by latency saved per drift (NetAdapt / AMC style).

One multiplier over every channel group is what the curated space offers the zoo models, but on a real
model the groups differ by an order of magnitude in what scaling them costs in drift for what it saves in
latency. Measured on PP-OCRv4 det at 640² (npu-32x32, 12 fit + 4 judge pages, each group alone at m = 0.5
on the prepared graph): most groups save 1–2.5 % of the latency at a drift of 0.01–0.02 each, while a few
of the widest (384 channels) save ~1.2 % at 0.0035–0.0065 and some save almost nothing at almost no
drift; uniform m = 0.5 drifts 0.039, far over a 0.02 budget.

So before the search, each scale-depth group is scaled alone at each ranking multiplier (`RANKED_MULTIPLIERS`)
and scored by the evaluator as any candidate is (estimated latency, drift on the held-back samples):

    ratio(g, m) = (latency(prepared) − latency(g scaled by m)) / max(drift(g, m), DRIFT_FLOOR)

and the depth decision gains one choice per (m, level): the groups in decreasing ratio order, taken while
the sum of their lone drifts stays within level × the drift budget (`LEVELS`). Lone drifts do not add up
(the sum over all groups is ~5× uniform m = 0.5's measured drift), so the levels go past the budget and
the search judges each prefix by its measured drift like any candidate. A choice reads `m0.5r32k7` (the
7 best groups at 0.5) and compiles to `scale-depth{multiplier=0.5,round_to=32,sites=@…}` with the
groups' anchors; the expert seeds take each one on top of the full expert recipe. Prefixes with the same
groups as a shorter level are dropped; everything is deterministic for a given model, calibration and target.

Cost: one evaluation per group and ranking multiplier in the setup (PP-OCRv4 det: 18 groups, ~5 s each).
Only searches with a drift budget, reconstructed passes and calibration data are ranked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import onnx_graphsurgeon as gs

from hwnas.passes.base import PassContext
from hwnas.passes.scale_depth import ScaleDepth
from hwnas.search.evaluate import Score
from hwnas.search.space import SAFE_NAME, SearchSpace

RANKED_MULTIPLIERS = ("0.5",)
LEVELS = (0.5, 1, 2, 4, 8)  # × the drift budget: how much summed lone drift each ranked choice may take
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


def measure_groups(graph: gs.Graph, ctx: PassContext, round_to: int, evaluate: Callable[[str], Score],
                   baseline_ms: float, multipliers: tuple[str, ...] = RANKED_MULTIPLIERS) -> list[GroupSensitivity]:
    """Every applicable scale-depth group scaled alone by each multiplier, scored by `evaluate` (a
    candidate pipeline → its score); groups the evaluator refuses are left out."""
    found = []
    for m in multipliers:
        for site in ScaleDepth(multiplier=float(m), round_to=round_to).match(graph, ctx):
            if not (site.applicable and site.nodes and SAFE_NAME.match(site.nodes[0])):
                continue
            score = evaluate(f"scale-depth{{multiplier={m},round_to={round_to},sites=@{site.nodes[0]}}}")
            if score.error is None:
                found.append(GroupSensitivity(site.nodes[0], m, site.data.group.channels,
                                              baseline_ms - score.latency_ms, score.drift))
    return found


def ranked_choices(groups: list[GroupSensitivity], budget: float, round_to: int) -> dict[str, tuple[str, ...]]:
    """Choice name (`m0.5r32k7`) → the anchors it scales: per multiplier, the best-ratio groups that save
    latency, cut where their summed lone drift passes each level × `budget`; nested, deduplicated."""
    choices: dict[str, tuple[str, ...]] = {}
    for m in dict.fromkeys(g.multiplier for g in groups):
        ranked = sorted((g for g in groups if g.multiplier == m and g.latency_saved_ms > 0),
                        key=lambda g: (-g.ratio, g.anchor))
        taken: set[int] = set()
        for level in LEVELS:
            total, k = 0.0, 0
            while k < len(ranked) and total + ranked[k].drift <= level * budget:
                total += ranked[k].drift
                k += 1
            if 0 < k < len(ranked) and k not in taken:
                taken.add(k)
                choices[f"m{m}r{round_to}k{k}"] = tuple(g.anchor for g in ranked[:k])
    return choices


def add_ranked_depth(space: SearchSpace, graph: gs.Graph, ctx: PassContext, evaluate: Callable[[str], Score],
                     budget: float) -> list[GroupSensitivity]:
    """Give `space`'s depth decision the ranked choices (module docstring); returns the measurements."""
    index = next((i for i, d in enumerate(space.decisions) if d.kind == "depth"), None)
    if index is None:
        return []
    depth = space.decisions[index]
    round_to = space.options.parallelism_factor if space.options.curated else 1
    groups = measure_groups(graph, ctx, round_to, evaluate, evaluate("").latency_ms)
    ranked = ranked_choices(groups, budget, round_to)
    space.depth_sites.update(ranked)
    space.decisions[index] = replace(depth, choices=depth.choices + tuple(ranked))
    return groups


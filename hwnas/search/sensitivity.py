"""Non-uniform depth: which channel groups to scale, and how far, ranked by latency saved per drift (NetAdapt / AMC style).

One multiplier over every channel group is what the curated space offers the zoo models, but on a real
model the groups differ by an order of magnitude in what scaling them costs in drift for what it saves in
latency. Measured on PP-OCRv4 det at 640² (npu-32x32, 12 fit + 4 judge pages, each group alone on the
prepared graph, latency saved as a share of the baseline's): the 96-channel neck group at `p2o.Conv.37`
saves 4.6 % at m = 0.5 (drift 0.0076) and 9.2 % at 0.25 (0.0165); the 384-channel groups save ~1.2 % at
0.0035–0.011; the small early groups (48 channels, rounded to 32 at every curated multiplier) save
1.3–2.5 % at 0.014–0.023 each, which is why every uniform multiplier (0.75 included) drifts ~0.04.

So before the search, each scale-depth group is scaled alone at each ranking multiplier (`RANKED_MULTIPLIERS`),
its count rounded to the target's parallelism factor PF and, at the mildest multiplier, also to PF/4, and
scored by the evaluator as any candidate is (estimated latency, drift on the held-back samples; in the
search's worker processes, in parallel):

    ratio(g, c) = (latency(prepared) − latency(g scaled to c channels)) / max(drift(g, c), DRIFT_FLOOR)

Why the finer rounding: a K×K conv reading the group is a GEMM whose depth is K²·C, so on an array of PF
rows its folds are ceil(K²·C / PF), not K²·ceil(C / PF): PP-OCRv4 det's 96-channel neck group, read by
two 3×3 convs at 160², saves 6.7 % (on top of the exact passes) at 48 channels, the nearest multiple of
8 to 0.5 × 96, at drift 0.008, and 4.6 % at 64, the nearest multiple of 32. A count whose scaled graph
the estimate (weights need not be fitted for it) says is no faster is not measured: no drift is spent
on what cannot pay.

Walking the measurements by decreasing ratio, each one is taken when it scales its group deeper than
before, charged its lone drift beyond the group's earlier one; the depth decision gains one choice per
level (`LEVELS`): the assignment taken while the summed drift stays within level × the drift budget.
Lone drifts do not add up (over all groups at 0.5 they sum to ~5× uniform m = 0.5's measured 0.039),
so the levels go past the budget and the search judges each choice by its measured drift like any
candidate. A choice reads `ranked7` (the first 7 measurements taken) and compiles to one
`scale-depth{multiplier=m,round_to=N,sites=@…}` step per multiplier and rounding it uses; the evaluator
caches the leading scale-depth steps' graph as it does a uniform multiplier's, and the seeds take each
choice on top of the fastest exact choices (hwnas.search.optimize.expert_seeds). Everything is
deterministic for a model, calibration and target.

Cost: one evaluation per group and ranked count in the setup (PP-OCRv4 det: ~5 s each alone), and one
cheap estimate per group, multiplier and rounding to leave out the counts that save nothing. Only
searches with a drift budget, reconstructed passes and held-back calibration samples are ranked; the
uniform multipliers stay (the zoo models use them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import onnx_graphsurgeon as gs

from hwnas.passes.base import PassContext
from hwnas.passes.scale_depth import ScaleDepth, scaled_count
from hwnas.search.evaluate import Score
from hwnas.search.space import SAFE_NAME, SearchSpace, latencies_alone

RANKED_MULTIPLIERS = ("0.5", "0.25")
FINER = 4  # counts are ranked rounded to the parallelism factor, and at the first multiplier to it / FINER too
LEVELS = (0.5, 1, 1.5, 2, 3, 4, 6, 8)  # × the drift budget: how much summed lone drift each ranked choice may take
DRIFT_FLOOR = 1e-4  # a group whose drift measures below this counts as this (no division by ~0)
# the share of a graph's estimate a count must save to be measured: the boosted corrections put counts that a
# simulated array runs in the same folds ~1e-5 apart either way (npu-32x32, mobilenetv2 at 64²: block3's project
# conv at 32 or 16 channels, the same simulated 1.2022 ms, estimated 0.000014 ms apart), and a count saving less
# than this is not worth a measurement
MIN_SAVING = 1e-3


@dataclass(frozen=True)
class GroupSensitivity:
    anchor: str  # the group's site anchor (what `sites=@anchor` selects)
    multiplier: str
    channels: int
    latency_saved_ms: float
    drift: float
    round_to: int = 1

    @property
    def ratio(self) -> float:
        return self.latency_saved_ms / max(self.drift, DRIFT_FLOOR)

    @property
    def count(self) -> int:
        """The group's channels once scaled."""
        return scaled_count(self.channels, float(self.multiplier), self.round_to)

    def step(self) -> str:
        return f"scale-depth{{multiplier={self.multiplier},round_to={self.round_to},sites=@{self.anchor}}}"


def ranking_steps(parallelism_factor: int) -> tuple[tuple[str, int], ...]:
    """The (multiplier, round_to) pairs each group is measured at (module docstring)."""
    finer = [(RANKED_MULTIPLIERS[0], max(parallelism_factor // FINER, 1))]
    steps = [(m, parallelism_factor) for m in RANKED_MULTIPLIERS]
    return tuple(dict.fromkeys(steps[:1] + finer + steps[1:]))


def measure_groups(graph: gs.Graph, ctx: PassContext, steps: tuple[tuple[str, int], ...],
                   score_all: Callable[[list[str]], list[Score]],
                   latency: Callable[[gs.Graph], float] | None = None) -> list[GroupSensitivity]:
    """Every applicable scale-depth group scaled alone by each (multiplier, round_to) of `steps`, scored by
    `score_all` (candidate pipelines → their scores, in order: the search's workers score them in parallel)
    with the prepared graph (the empty pipeline) in the same call, in graph order; a count an earlier step
    gave the group is not measured again, nor (given `latency`, a graph's estimate) one whose graph,
    weights unfitted, is estimated no faster than `graph` (`saves_latency`); groups the evaluator refuses are left out."""
    measured, counts = [], {}
    for m, round_to in steps:
        for site in ScaleDepth(multiplier=float(m), round_to=round_to).match(graph, ctx):
            anchor = site.nodes[0] if site.nodes else ""
            if not (site.applicable and SAFE_NAME.match(anchor)) or counts.get(anchor, ()).count(site.data.target):
                continue
            counts[anchor] = (*counts.get(anchor, ()), site.data.target)
            measured.append(GroupSensitivity(anchor, m, site.data.group.channels, 0.0, 0.0, round_to))
    if latency is not None:
        # channels chosen by weight norms and nothing refitted: the estimate reads shapes only
        unfitted = [g.step().replace("}", ",importance=weight,refit=false}") for g in measured]
        before = latency(graph)
        measured = [g for g, after in zip(measured, latencies_alone(graph, ctx, latency, unfitted))
                    if saves_latency(before, after)]
    baseline, *scores = score_all(["", *(g.step() for g in measured)])
    return [replace(g, latency_saved_ms=baseline.latency_ms - score.latency_ms, drift=score.drift)
            for g, score in zip(measured, scores) if score.error is None]


def saves_latency(before_ms: float, after_ms: float) -> bool:
    """Whether an estimate dropping from `before_ms` to `after_ms` is a saving, not the estimator's noise (`MIN_SAVING`)."""
    return after_ms < before_ms * (1 - MIN_SAVING)


def ranked_choices(groups: list[GroupSensitivity], budget: float
                   ) -> dict[str, tuple[tuple[str, int, tuple[str, ...]], ...]]:
    """Choice name (`ranked7`) → (multiplier, round_to, anchors) triples: the (group, count) measurements
    that save latency, best ratio first, each taken when it scales its group to fewer channels than a
    taken one did (charged the extra lone drift), cut where the summed drift passes each level × `budget`."""
    order = {g.anchor: i for i, g in enumerate(dict((g.anchor, g) for g in groups).values())}
    ranked = sorted((g for g in groups if g.latency_saved_ms > 0),
                    key=lambda g: (-g.ratio, order[g.anchor], g.multiplier, g.round_to))
    taken: dict[str, GroupSensitivity] = {}
    states, total = [], 0.0  # (summed drift, the assignment) after each measurement taken
    for g in ranked:
        before = taken.get(g.anchor)
        if before is not None and g.count >= before.count:
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
            by_step = {}
            for anchor in sorted(assignment, key=order.get):
                g = assignment[anchor]
                by_step.setdefault((g.multiplier, g.round_to), []).append(anchor)
            choices[f"ranked{k}"] = tuple((m, r, tuple(a)) for (m, r), a in sorted(by_step.items()))
    return choices


def add_ranked_depth(space: SearchSpace, graph: gs.Graph, ctx: PassContext, score_all: Callable[[list[str]], list[Score]],
                     budget: float, latency: Callable[[gs.Graph], float] | None = None) -> list[GroupSensitivity]:
    """Give `space`'s depth decision the ranked choices (module docstring); returns the measurements.
    `score_all`: candidate pipelines → their scores, in order; `latency` (a graph's estimate) leaves out the
    counts that save nothing before their drift is measured."""
    index = next((i for i, d in enumerate(space.decisions) if d.kind == "depth"), None)
    if index is None:
        return []
    depth = space.decisions[index]
    pf = space.options.parallelism_factor if space.options.curated else 1
    groups = measure_groups(graph, ctx, ranking_steps(pf), score_all, latency=latency)
    ranked = ranked_choices(groups, budget)
    space.depth_sites.update(ranked)
    space.decisions[index] = replace(depth, choices=depth.choices + tuple(ranked))
    return groups

"""Non-uniform depth choices: channel groups ranked by latency saved per drift (hwnas.search.sensitivity)."""

from __future__ import annotations

import re

import onnx
import pytest

from hwnas.estimator.defaults import estimator_for
from hwnas.graph.gsgraph import to_model
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.models import build
from hwnas.passes.manager import PassManager
from hwnas.passes.pipeline import parse_pipeline
from hwnas.passes.scale_depth import scaled_count
from hwnas.search.algorithms import Limits
from hwnas.search.optimize import SearchSettings, expert_seeds, prepare
from hwnas.search.evaluate import Score
from hwnas.search.sensitivity import (GroupSensitivity, add_ranked_depth, measure_groups, ranked_choices, ranking_steps,
                                     saves_latency)
from hwnas.search.space import CURATED_MULTIPLIERS, SpaceOptions, build_space
from hwnas.targets import get_target
from hwnas.verify import random_calibration
from hwnas.verify.policy import Drift


def out_channels(model: onnx.ModelProto) -> dict[str, int]:
    """Output channels of the dense convs (the depthwise convs inside a group shrink with it)."""
    weights = {t.name: t.dims for t in model.graph.initializer}
    return {n.name: weights[n.input[1]][0] for n in model.graph.node
            if n.op_type == "Conv" and n.input[1] in weights and weights[n.input[1]][1] > 1}


@pytest.mark.slow
def test_ranked_depth_choices_scale_only_their_groups():
    model = build("mobilenetv2", resolution=64)
    shapes = resolve_input_shapes(model, None)
    calibration = random_calibration(model, shapes, samples=8, seed=0)
    settings = SearchSettings(limits=Limits(fidelity=Drift(0.05)), workers=1)
    prepared, ctx, evaluator = prepare(model, estimator_for(get_target("npu-32x32")), shapes, settings, calibration)
    space = build_space(prepared, ctx, SpaceOptions(8, allow_reconstructed=True))

    def score_all(pipelines: list[str]) -> list:
        return [evaluator.evaluate(p) for p in pipelines]

    groups = add_ranked_depth(space, prepared, ctx, score_all, 0.05)
    depth = next(d for d in space.decisions if d.kind == "depth")
    assert len({g.anchor for g in groups}) > 3 and {g.multiplier for g in groups} == {"0.5", "0.25"}
    assert depth.choices[: 1 + len(CURATED_MULTIPLIERS)] == ("keep", *(f"m{m}r8" for m in CURATED_MULTIPLIERS))
    ranked = [c for c in depth.choices if c.startswith("ranked")]
    assert ranked and set(ranked) == set(space.depth_sites)
    before = out_channels(evaluator.base)
    anchors = {g.anchor for g in groups}
    assert anchors <= set(before)
    # counts rounded to the parallelism factor and, at multiplier 0.5, to a quarter of it are both ranked
    assert {(g.multiplier, g.round_to) for g in groups} <= {("0.5", 8), ("0.5", 2), ("0.25", 8)}
    assert {g.round_to for g in groups} == {8, 2}
    assert all(len({g.count for g in groups if g.anchor == a}) == sum(g.anchor == a for g in groups) for a in anchors)
    for choice in ranked:
        steps = space.depth_sites[choice]  # (multiplier, round_to, anchors) per scale-depth step
        pipeline = space.compile({depth.key: choice})
        assert set(re.findall(r"scale-depth\{[^}]*\}", pipeline)) == {
            f"scale-depth{{multiplier={m},round_to={r},sites=" + ";".join("@" + a for a in some) + "}" for m, r, some in steps}
        after = out_channels(evaluator.build(pipeline)[0])
        # the chosen groups and only they (each anchored at a dense conv producing it), each to its count
        assert {a for a in anchors if after[a] < before[a]} == {a for _, _, some in steps for a in some}
        for m, r, some in steps:
            assert all(after[a] == scaled_count(before[a], float(m), r) for a in some)
    # every ranked choice is a seed (on the expert recipe: no estimate, no fastest choices), deterministically
    assert {s[depth.key] for s in expert_seeds(space)} >= set(ranked)
    again = build_space(prepared, ctx, SpaceOptions(8, allow_reconstructed=True))
    add_ranked_depth(again, prepared, ctx, score_all, 0.05)
    assert again.depth_sites == space.depth_sites


def test_ranking_takes_best_latency_per_drift_first_and_deepens_a_group_at_its_extra_drift():
    g = GroupSensitivity
    groups = [g("a", "0.5", 64, 1.0, 0.01), g("b", "0.5", 64, 1.0, 0.001), g("b", "0.25", 64, 1.5, 0.004),
              g("c", "0.5", 64, 0.5, 0.02), g("d", "0.5", 64, 0.0, 0.0), g("a", "0.25", 64, 0.9, 0.001)]
    # d saves nothing: never taken; a at 0.25 saves less than at 0.5 but its ratio (900) comes first, so a
    # at 0.5 (100) is not taken after it (not deeper); b at 0.25 (375) deepens b, charged 0.004 - 0.001
    choices = ranked_choices(groups, 0.01)
    assert choices == {
        "ranked3": (("0.25", 1, ("a", "b")),),  # summed drift 0.005: levels 0.5 to 2 (× 0.01)
        "ranked4": (("0.25", 1, ("a", "b")), ("0.5", 1, ("c",))),  # 0.025: levels 3 to 8
    }


def test_a_finer_rounding_deepens_a_group_only_to_fewer_channels():
    g = GroupSensitivity
    # 96 channels: 0.5 rounded to 32 keeps 64, rounded to 8 keeps 48; 0.25 rounded to 32 keeps 32
    groups = [g("a", "0.5", 96, 1.0, 0.002, 32), g("a", "0.5", 96, 1.6, 0.004, 8), g("a", "0.25", 96, 1.8, 0.02, 32)]
    assert [x.count for x in groups] == [64, 48, 32]
    choices = ranked_choices(groups, 0.01)
    # ratios 500, 400, 90: 64 first, then 48 (charged 0.002 more: summed 0.004), then 32 (0.016 more: 0.02)
    assert choices == {"ranked2": (("0.5", 8, ("a",)),), "ranked3": (("0.25", 32, ("a",)),)}


def test_a_saving_below_the_estimators_noise_is_none():
    assert saves_latency(1.2, 1.19) and not saves_latency(1.202262, 1.202248) and not saves_latency(1.0, 1.0001)


@pytest.mark.slow
def test_counts_the_estimate_says_save_nothing_are_not_measured():
    model = build("mobilenetv2", resolution=64)
    shapes = resolve_input_shapes(model, None)
    estimator = estimator_for(get_target("npu-32x32"))
    prepared, ctx, _ = prepare(model, estimator, shapes, SearchSettings(workers=1), None)

    def latency(graph):
        return estimator.estimate(to_model(graph.copy(), model), shapes).latency_ms

    def score_all(pipelines):
        return [Score(1.0, 0, 0, 0.01, False) for _ in pipelines]

    steps = ranking_steps(32)
    assert steps == (("0.5", 32), ("0.5", 8), ("0.25", 32))
    everything = measure_groups(prepared, ctx, steps, score_all)
    screened = measure_groups(prepared, ctx, steps, score_all, latency=latency)
    assert 0 < len(screened) < len(everything) and set(screened) <= set(everything)
    left_out = [g for g in everything if g not in screened]
    for group in left_out[:4] + screened[:4]:
        step = parse_pipeline(group.step().replace("}", ",importance=weight,refit=false}"))
        faster = saves_latency(latency(prepared), latency(PassManager(step, in_place=True).run(prepared.copy(), ctx).graph))
        assert faster == (group in screened), group

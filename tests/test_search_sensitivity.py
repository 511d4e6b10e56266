"""Non-uniform depth choices: channel groups ranked by latency saved per drift (hwnas.search.sensitivity)."""

from __future__ import annotations

import onnx
import pytest

from hwnas.estimator.defaults import estimator_for
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.models import build
from hwnas.passes.scale_depth import scaled_count
from hwnas.search.algorithms import Limits
from hwnas.search.optimize import SearchSettings, expert_seeds, prepare
from hwnas.search.sensitivity import add_ranked_depth, ranked_choices, GroupSensitivity
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
    for choice in ranked:
        chosen = dict(space.depth_sites[choice])  # multiplier -> anchors
        pipeline = space.compile({depth.key: choice})
        assert pipeline == ",".join(f"scale-depth{{multiplier={m},round_to=8,sites=" + ";".join("@" + a for a in chosen[m]) + "}"
                                    for m in sorted(chosen))
        after = out_channels(evaluator.build(pipeline)[0])
        # the chosen groups and only they (each anchored at a dense conv producing it), each to its multiplier
        assert {a for a in anchors if after[a] < before[a]} == {a for some in chosen.values() for a in some}
        for m, some in chosen.items():
            assert all(after[a] == scaled_count(before[a], float(m), 8) for a in some)
    # every ranked choice is a seed on top of the expert recipe, and the ranking is deterministic
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
    choices = ranked_choices(groups, 0.01, 32)
    assert choices == {
        "ranked3r32": (("0.25", ("a", "b")),),  # summed drift 0.005: levels 0.5 to 2 (× 0.01)
        "ranked4r32": (("0.25", ("a", "b")), ("0.5", ("c",))),  # 0.025: levels 3 to 8
    }

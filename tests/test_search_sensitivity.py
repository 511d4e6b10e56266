"""Non-uniform depth choices: channel groups ranked by latency saved per drift (hwnas.search.sensitivity)."""

from __future__ import annotations

import onnx
import pytest

from hwnas.estimator.defaults import estimator_for
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.models import build
from hwnas.search.algorithms import Limits
from hwnas.search.optimize import SearchSettings, expert_seeds, prepare
from hwnas.search.sensitivity import add_ranked_depth, ranked_choices, GroupSensitivity
from hwnas.search.space import CURATED_MULTIPLIERS, SpaceOptions, build_space
from hwnas.targets import get_target
from hwnas.verify import random_calibration
from hwnas.verify.policy import Drift


def out_channels(model: onnx.ModelProto) -> dict[str, int]:
    weights = {t.name: t.dims for t in model.graph.initializer}
    return {n.name: weights[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in weights}


@pytest.mark.slow
def test_ranked_depth_choices_scale_only_their_groups():
    model = build("mobilenetv2", resolution=64)
    shapes = resolve_input_shapes(model, None)
    calibration = random_calibration(model, shapes, samples=8, seed=0)
    settings = SearchSettings(limits=Limits(fidelity=Drift(0.05)), workers=1)
    prepared, ctx, evaluator = prepare(model, estimator_for(get_target("npu-32x32")), shapes, settings, calibration)
    space = build_space(prepared, ctx, SpaceOptions(8, allow_reconstructed=True))
    groups = add_ranked_depth(space, prepared, ctx, evaluator.evaluate, 0.05)
    depth = next(d for d in space.decisions if d.kind == "depth")
    assert len({g.anchor for g in groups}) > 3 and all(g.multiplier == "0.5" for g in groups)
    assert depth.choices[: 1 + len(CURATED_MULTIPLIERS)] == ("keep", *(f"m{m}r8" for m in CURATED_MULTIPLIERS))
    ranked = [c for c in depth.choices if "k" in c and c != "keep"]
    assert ranked and set(ranked) == set(space.depth_sites)
    before = out_channels(evaluator.base)
    anchors = {g.anchor for g in groups}
    for choice in ranked:
        chosen = space.depth_sites[choice]
        assert len(chosen) == int(choice.split("k")[1]) < len(anchors)
        pipeline = space.compile({depth.key: choice})
        assert pipeline == "scale-depth{multiplier=0.5,round_to=8,sites=" + ";".join("@" + a for a in chosen) + "}"
        after = out_channels(evaluator.build(pipeline)[0])
        shrunk = {a for a in anchors if a in before and after[a] < before[a]}
        assert shrunk == {a for a in chosen if a in before}  # the chosen groups and only they
    # every ranked choice is a seed on top of the expert recipe, and the ranking is deterministic
    assert {s[depth.key] for s in expert_seeds(space)} >= set(ranked)
    again = build_space(prepared, ctx, SpaceOptions(8, allow_reconstructed=True))
    add_ranked_depth(again, prepared, ctx, evaluator.evaluate, 0.05)
    assert again.depth_sites == space.depth_sites


def test_ranking_takes_best_latency_per_drift_first_within_each_level():
    groups = [GroupSensitivity("a", "0.5", 64, 1.0, 0.01), GroupSensitivity("b", "0.5", 64, 1.0, 0.001),
              GroupSensitivity("c", "0.5", 64, 0.5, 0.02), GroupSensitivity("d", "0.5", 64, 0.0, 0.0)]
    choices = ranked_choices(groups, 0.01, 32)
    # d saves nothing: never taken; b (1000/unit drift) before a (100) before c (25)
    assert choices == {"m0.5r32k1": ("b",), "m0.5r32k2": ("b", "a")}

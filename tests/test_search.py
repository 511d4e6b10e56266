"""The search: it finds faster verified models, resumes after an interrupt, transfers recipes, honours budgets."""

from __future__ import annotations

import json

import onnx
import pytest

from hwnas import api
from hwnas.cli import main
from hwnas.errors import BadInputError, CheckFailedError
from hwnas.models import build
from hwnas.search.algorithms import Limits, Trial, pareto_front
from hwnas.search.evaluate import Score
from hwnas.search.space import SpaceOptions, build_space
from hwnas.verify.policy import Drift, Exact


@pytest.fixture(scope="module")
def small_mnv2():
    return build("mobilenetv2", resolution=96)


def distinct_choices(recipe: dict) -> set[str]:
    return {r["choice"] for r in recipe["rules"]}


def test_exact_search_reduces_npu_latency_and_verifies(small_mnv2, tmp_path):
    result = api.optimize(small_mnv2, "npu-32x32", trials=40, seed=0, workers=1, journal=tmp_path / "j.jsonl")
    report = result.to_dict()
    assert report["exact"] and report["verified"]
    assert report["verification"]["equivalent"]
    assert report["latency_reduction"] > 0.4
    assert report["optimized"]["latency_ms"] < report["baseline"]["latency_ms"]
    assert len(distinct_choices(result.recipe)) >= 2  # different choices in different blocks
    assert report["search"]["candidates_evaluated"] == 40
    curve = report["search"]["best_so_far"]
    assert all(a >= b for a, b in zip(curve, curve[1:]))
    # the typed report and its JSON form (the keys the CLI prints: docs/report-schema.md) say the same
    assert list(report) == ["target", "target_config", "baseline", "optimized", "latency_reduction", "pipeline",
                            "exact", "verification", "verified", "measured", "holdout", "precision", "quantization",
                            "drift", "calibration_split", "deploy_check", "search", "pareto", "recipe", "passes",
                            "warnings"]
    assert list(report["search"]) == ["algorithm", "space", "seed", "trials", "candidates_evaluated",
                                      "distinct_candidates", "candidates_scored", "depth_cache", "fit_cache", "pass_errors",
                                      "decisions", "space_size", "wall_s", "seconds", "best_so_far", "quality",
                                      "storage", "expert_seed_latency_ms"]
    assert result.fidelity == Exact() and result.exact and result.verified and result.precision == "float"
    assert (result.latency_reduction, result.pipeline) == (report["latency_reduction"], report["pipeline"])
    assert report["search"]["pass_errors"] == {"count": result.search.pass_errors.count, "first": []}
    assert sum(p["chosen"] for p in report["pareto"]) <= 1


@pytest.mark.parametrize("algorithm", [pytest.param("random", marks=pytest.mark.slow), "greedy"])
def test_other_algorithms_run_and_improve(small_mnv2, algorithm):
    result = api.optimize(small_mnv2, "npu-16x16", algorithm=algorithm, trials=25, seed=1, workers=1)
    assert result.to_dict()["latency_reduction"] > 0
    assert result.to_dict()["search"]["algorithm"] == algorithm


@pytest.mark.slow
def test_interrupted_search_resumes_to_the_same_result(small_mnv2, tmp_path):
    uninterrupted = api.optimize(small_mnv2, "npu-32x32", trials=30, seed=3, workers=1)
    journal = tmp_path / "resume.jsonl"

    def interrupt_after_12(n, trial):
        if trial.number == 11:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.optimize(small_mnv2, "npu-32x32", trials=30, seed=3, workers=1, journal=journal, progress=interrupt_after_12)
    saved = len(journal.read_text().splitlines()) - 1
    assert 0 < saved < 30
    resumed = api.optimize(small_mnv2, "npu-32x32", trials=30, seed=3, workers=1, journal=journal)
    assert len(journal.read_text().splitlines()) - 1 >= saved  # nothing evaluated before the interrupt was lost
    assert resumed.to_dict()["pipeline"] == uninterrupted.to_dict()["pipeline"]
    assert resumed.to_dict()["search"]["best_so_far"] == uninterrupted.to_dict()["search"]["best_so_far"]


@pytest.mark.slow
def test_recipe_transfers_to_other_models(small_mnv2, tmp_path):
    found = api.optimize(small_mnv2, "npu-32x32", trials=30, seed=0, workers=1)
    for other in (build("mobilenetv2", width=0.75, resolution=96), build("ibn-detector", resolution=128)):
        pipeline = api.recipe_pipeline(other, found.recipe)
        applied = api.run(other, pipeline)
        assert applied.verification.equivalent
        before = api.estimate(other, "npu-32x32").latency_ms
        after = api.estimate(applied.model, "npu-32x32").latency_ms
        assert after < before


def test_memory_budget_that_cannot_be_met_says_by_how_much(small_mnv2):
    with pytest.raises(CheckFailedError, match="over by"):
        api.optimize(small_mnv2, "npu-32x32", trials=6, workers=1, memory_budget=1000)


def test_pareto_front_has_no_dominated_points():
    scores = [(3.0, 0.0, 10), (2.0, 0.1, 10), (2.5, 0.05, 10), (2.0, 0.2, 12), (4.0, 0.0, 9), (3.0, 0.0, 11)]
    trials = [Trial(i, {}, f"p{i}", Score(lat, mem, 0, drift, drift == 0)) for i, (lat, drift, mem) in enumerate(scores)]
    front = pareto_front(trials, Limits(Drift(0.5)))
    assert {t.pipeline for t in front} == {"p0", "p1", "p2", "p4"}
    for a in front:
        for b in front:
            worse_or_equal = (a.score.latency_ms >= b.score.latency_ms, a.score.drift >= b.score.drift,
                              a.score.memory_bytes >= b.score.memory_bytes)
            assert a is b or not all(worse_or_equal)


def test_limits_mark_drift_and_memory():
    limits = Limits(Drift(0.01), max_params=100)
    assert limits.feasible(Score(1.0, 50, 0, 0.005, False))
    assert not limits.feasible(Score(1.0, 150, 0, 0.005, False))
    assert not limits.feasible(Score(1.0, 50, 0, 0.02, False))


def test_bad_options_are_bad_input(small_mnv2):
    with pytest.raises(BadInputError, match="algorithm"):
        api.optimize(small_mnv2, "npu-32x32", algorithm="annealing")
    with pytest.raises(BadInputError, match="space"):
        api.optimize(small_mnv2, "npu-32x32", space="huge")
    # exact=True used to be overridden silently by a drift budget: a contradiction is refused instead
    with pytest.raises(BadInputError, match="cannot be combined with a drift budget"):
        api.optimize(small_mnv2, "npu-32x32", exact=True, max_drift=0.05, trials=2, workers=1)
    with pytest.raises(BadInputError, match="cannot be combined with a search for models to retrain"):
        api.optimize(small_mnv2, "npu-32x32", exact=True, algorithm="zero-shot", trials=2, workers=1)
    with pytest.raises(BadInputError, match="give the drift budget"):
        api.optimize(small_mnv2, "npu-32x32", exact=False, trials=2, workers=1)


@pytest.mark.slow
def test_optimize_cli_writes_model_report_and_recipe(tmp_path, capsys, small_mnv2):
    model_path = tmp_path / "m.onnx"
    onnx.save_model(small_mnv2, str(model_path))
    out, report, recipe = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "recipe.json"
    code = main(["optimize", str(model_path), "-o", str(out), "--target", "npu-32x32", "--exact", "--trials", "16",
                 "--workers", "1", "--quiet", "--report", str(report), "--recipe-out", str(recipe)])
    assert code == 0
    data = json.loads(report.read_text())
    for key in ("target", "baseline", "optimized", "latency_reduction", "pipeline", "exact", "verification", "search"):
        assert key in data
    assert {"algorithm", "candidates_evaluated", "wall_s"} <= set(data["search"])
    assert json.loads(recipe.read_text())["format"] == "hwnas-recipe"
    assert main(["run", str(model_path), "--recipe", str(recipe), "-o", str(tmp_path / "again.onnx")]) == 0


@pytest.mark.slow
def test_holdout_drift_is_reported_for_the_written_model(tmp_path, capsys, small_mnv2):
    import numpy as np

    from hwnas.verify.fidelity import measure_fidelity

    model_path = tmp_path / "m.onnx"
    onnx.save_model(small_mnv2, str(model_path))
    rng = np.random.default_rng(0)
    for name, count in (("fit", 4), ("held", 3)):
        np.savez(tmp_path / f"{name}.npz", input=rng.standard_normal((count, 3, 96, 96)).astype(np.float32))
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code = main(["optimize", str(model_path), "-o", str(out), "--target", "npu-32x32", "--max-drift", "0.05",
                 "--calib", str(tmp_path / "fit.npz"), "--holdout", str(tmp_path / "held.npz"), "--trials", "6",
                 "--workers", "1", "--quiet", "--report", str(report)])
    assert code == 0
    holdout = json.loads(report.read_text())["holdout"]
    feeds = dict(np.load(tmp_path / "held.npz", allow_pickle=False))
    again = measure_fidelity(small_mnv2, onnx.load(str(out)), feeds)
    assert holdout["samples"] == 3
    assert holdout["cosine"] == pytest.approx(again.cosine, abs=1e-6)
    assert holdout["top1_agreement"] == again.top1_agreement
    assert "held-out drift: cosine" in capsys.readouterr().out


@pytest.mark.slow
def test_depth_scaled_graph_is_reused_and_scores_stay_the_same(small_mnv2):
    from hwnas.estimator.defaults import estimator_for
    from hwnas.graph.gsgraph import to_graph, to_model
    from hwnas.graph.shapes import resolve_input_shapes
    from hwnas.passes.base import PassContext
    from hwnas.passes.manager import PassManager
    from hwnas.passes.pipeline import parse_pipeline
    from hwnas.search.evaluate import CandidateEvaluator
    from hwnas.search.space import PREFIX
    from hwnas.targets import get_target
    from hwnas.verify import random_calibration
    from hwnas.graph.session import make_session, run_per_sample

    shapes = resolve_input_shapes(small_mnv2, None)
    calibration = random_calibration(small_mnv2, shapes, samples=2, seed=0)
    ctx = PassContext(template=small_mnv2, input_shapes=shapes, calibration=calibration)
    prepared = PassManager(parse_pipeline(PREFIX)).run(to_graph(small_mnv2), ctx).graph
    reference = run_per_sample(make_session(small_mnv2), calibration)

    def evaluator():
        return CandidateEvaluator(to_model(prepared.copy(), small_mnv2), prepared, ctx,
                                  estimator_for(get_target("npu-32x32")), reference, judge_feeds=calibration,
                                  fidelity=Drift(0.5))

    scale = "scale-depth{multiplier=0.5,round_to=8}"
    pipelines = [scale, f"{scale},replace-conv{{mode=dense,sites=0}}"]
    shared = evaluator()
    scores = [shared.evaluate(p) for p in pipelines]
    assert len(shared._scaled) == 1  # one refit of the depth multiplier served both
    assert scores == [evaluator().evaluate(p) for p in pipelines]  # each from scratch
    assert all(s.error is None and not s.exact and s.drift > 0 for s in scores)
    assert scores[1].latency_ms != scores[0].latency_ms


@pytest.mark.slow
def test_curated_space_leaves_out_fusions_that_do_not_pay_alone():
    """Fused-MBConv sites whose fusion alone the estimator says is no faster are not offered by the curated
    space (their fits are the costliest part of a candidate), each skipped with its estimates; the
    uncurated space keeps them."""
    from hwnas.estimator.defaults import estimator_for
    from hwnas.graph.gsgraph import to_model
    from hwnas.passes.manager import PassManager
    from hwnas.passes.pipeline import parse_pipeline
    from hwnas.search.optimize import SearchSettings, prepare
    from hwnas.targets import get_target

    model = build("mobilenetv2", resolution=96)
    shapes = {model.graph.input[0].name: (1, 3, 96, 96)}
    estimator = estimator_for(get_target("npu-32x32"), None)
    prepared, ctx, _ = prepare(model, estimator, shapes, SearchSettings(limits=Limits(Drift(0.1)), workers=1), None)

    def latency(graph):
        return estimator.estimate(to_model(graph.copy(), model), shapes).latency_ms

    curated = build_space(prepared, ctx, SpaceOptions(32, True, True), latency=latency)
    every = [d.anchor for d in build_space(prepared, ctx, SpaceOptions(32, False, True), latency=latency).decisions
             if d.kind == "mbconv"]
    kept = {d.anchor for d in curated.decisions if d.kind == "mbconv"}
    assert kept and kept < set(every)
    before = latency(prepared)
    for anchor in every:
        spec = f"fuse-ibn{{mode=mbconv,fit=compose,sites=@{anchor}}}"
        alone = latency(PassManager(parse_pipeline(spec)).run(prepared.copy(), ctx).graph)
        assert (alone < before) == (anchor in kept), anchor
        assert (anchor in kept) != any(f"mbconv site at {anchor!r}: fused alone" in s for s in curated.skipped)

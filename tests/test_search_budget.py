"""The time budget holds within one candidate (issue 18): the search stops after the candidate during
which the budget ran out, mid-batch included, and the report says where the time went."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hwnas import api
from hwnas.models import build
from hwnas.search import algorithms
from hwnas.search.algorithms import Limits, search
from hwnas.search.evaluate import Score
from hwnas.search.space import Decision, SearchSpace, SpaceOptions
from hwnas.verify.policy import Drift


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def space() -> SearchSpace:
    decisions = [Decision(f"d{i}", "align", f"n{i}", ("keep", "8", "16")) for i in range(4)]
    return SearchSpace(decisions, SpaceOptions(32))


@pytest.mark.parametrize("algorithm", ["evolution", "random", "greedy"])
def test_search_stops_within_one_candidate_of_its_budget_mid_batch(monkeypatch, algorithm):
    clock = FakeClock()
    monkeypatch.setattr(algorithms.time, "monotonic", clock.monotonic)
    scored = []

    def score_batch(pipelines):  # lazily, as optimize's is: 10 s per candidate
        for p in pipelines:
            clock.now += 10.0
            scored.append(p)
            yield Score(float(len(p)), 0, 0, 0.0, True)

    trials = search(space(), score_batch, algorithm, trials=100, limits=Limits(), seed=0, time_budget=25.0,
                    batch_size=8)
    # 10, 20, 30 s: the third candidate crossed the 25 s budget, the other five of the first batch never ran
    assert len(trials) == len(scored) == 3
    assert clock.now <= 25.0 + 10.0


def test_a_list_of_scores_still_works_and_stops_recording_at_the_budget(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(algorithms.time, "monotonic", clock.monotonic)

    def score_batch(pipelines):  # scored all at once (the benchmarks' scorers): nothing to save, no harm
        clock.now += 10.0 * len(pipelines)
        return [Score(1.0, 0, 0, 0.0, True) for _ in pipelines]

    trials = search(space(), score_batch, "random", trials=100, limits=Limits(), seed=0, time_budget=25.0)
    assert len(trials) == 1


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_optimize_reports_candidates_scored_and_where_the_time_went(workers):
    model = build("mobilenetv2", resolution=64)
    report = api.optimize(model, "npu-32x32", trials=16, seed=0, workers=workers).to_dict()
    search_report = report["search"]
    seconds = search_report["seconds"]
    assert search_report["candidates_evaluated"] == 16
    assert 0 < search_report["candidates_scored"] <= 16
    assert set(seconds) == {"setup", "search", "candidates_build", "candidates_quantize", "candidates_estimate",
                            "candidates_drift", "verify_chosen"}
    assert seconds["candidates_quantize"] == pytest.approx(0, abs=0.05)  # float candidates are not quantized
    assert seconds["candidates_build"] > 0 and seconds["candidates_estimate"] > 0
    assert seconds["candidates_drift"] == pytest.approx(0, abs=0.05)  # exact candidates are not run
    assert search_report["depth_cache"] == {"depth_cache_lookups": 0, "depth_cache_hits": 0, "depth_cache_shared_hits": 0}
    assert search_report["fit_cache"] == {"fit_cache_lookups": 0, "fit_cache_hits": 0, "fit_cache_shared_hits": 0}  # exact: nothing fitted
    assert seconds["setup"] + seconds["search"] == pytest.approx(search_report["wall_s"], abs=2e-3)  # rounded to ms


@pytest.mark.slow
def test_depth_and_fit_cache_use_is_counted_over_the_candidates_scored():
    model = build("mobilenetv2", resolution=64)
    # past the seeds (each depth choice on the fastest exact choices), so that Fused-MBConv candidates are scored
    search_report = api.optimize(model, "npu-32x32", max_drift=0.2, trials=24, seed=0, workers=1).to_dict()["search"]
    use = search_report["depth_cache"]
    assert 0 < use["depth_cache_hits"] < use["depth_cache_lookups"] <= search_report["candidates_scored"]
    fits = search_report["fit_cache"]  # Fused-MBConv refits, reused by candidates sharing a prefix
    assert 0 <= fits["fit_cache_hits"] <= fits["fit_cache_lookups"] and fits["fit_cache_lookups"] > 0
    assert search_report["seconds"]["candidates_drift"] > 0  # reconstructed candidates are run


@pytest.mark.slow
def test_candidates_sharing_a_prefix_reuse_its_fits(tmp_path):
    """The evaluator's fit cache: a candidate that fuses a subset of an earlier one's first sites makes no
    fit, and scores the same drift as a fresh evaluator (no cache hit) does."""
    from hwnas.estimator.defaults import estimator_for
    from hwnas.search.optimize import SearchSettings, prepare
    from hwnas.targets import get_target

    model = build("mobilenetv2", resolution=64)
    shapes = {model.graph.input[0].name: (1, 3, 64, 64)}
    settings = SearchSettings(limits=Limits(Drift(0.2)), workers=1)
    estimator = estimator_for(get_target("npu-32x32"), None)
    name = model.graph.input[0].name
    calibration = {name: np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)}
    _, _, evaluator = prepare(model, estimator, shapes, settings, calibration)
    evaluator.evaluate("fuse-ibn{mode=mbconv,sites=0:4}")
    score = evaluator.evaluate("fuse-ibn{mode=mbconv,sites=0:3}")
    assert evaluator.cache_use["fit_cache_lookups"] == 7 and evaluator.cache_use["fit_cache_hits"] == 3
    _, _, fresh = prepare(model, estimator, shapes, settings, calibration)
    assert fresh.evaluate("fuse-ibn{mode=mbconv,sites=0:3}").drift == score.drift
    # workers sharing a folder: the fits one made, another reads instead of fitting again, bitwise
    _, _, first = prepare(model, estimator, shapes, settings, calibration)
    _, _, second = prepare(model, estimator, shapes, settings, calibration)
    first.share(str(tmp_path))
    second.share(str(tmp_path))
    assert first.evaluate("fuse-ibn{mode=mbconv,sites=0:3}") == fresh.evaluate("fuse-ibn{mode=mbconv,sites=0:3}")
    assert first.cache_use["fit_cache_shared_hits"] == 0 and len(list(tmp_path.glob("fit-*.npz"))) == 3
    assert second.evaluate("fuse-ibn{mode=mbconv,sites=0:3}") == score
    assert second.cache_use["fit_cache_shared_hits"] == second.cache_use["fit_cache_lookups"] == 3


@pytest.mark.slow
def test_the_best_exact_candidate_is_verified_before_falling_back_to_the_input(monkeypatch):
    """Reconstructed winners can fail verification; the exact passes' result must not be lost then."""
    from hwnas.search import optimize as search_optimize

    real = search_optimize.verify_in_order
    tried = []

    def every_reconstructed_one_fails(candidates, check):
        tried.extend(candidates)

        def strict(pipeline):
            trial = next(t for t in candidates if search_optimize.full_pipeline(t.pipeline) == pipeline)
            if not trial.score.exact:
                raise search_optimize.CheckFailedError("drift over the budget (simulated)")
            return check(pipeline)
        return real(candidates, strict)

    monkeypatch.setattr(search_optimize, "verify_in_order", every_reconstructed_one_fails)
    model = build("mobilenetv2", resolution=64)
    result = api.optimize(model, "npu-32x32", max_drift=0.2, trials=16, seed=0, workers=1)
    exact_tried = [t for t in tried if t.score.exact]
    assert exact_tried and exact_tried[0].pipeline  # not only the input's own pipeline
    assert result.to_dict()["exact"] and result.to_dict()["latency_reduction"] > 0


@pytest.mark.slow
def test_two_workers_score_what_one_does_and_build_each_depth_choice_once():
    """The pool (the setup's depth ranking included) gives the trials one worker gives, score for score;
    a depth-scaled graph built by one worker is loaded by the other (a shared hit), not refitted."""
    from hwnas.estimator.defaults import estimator_for
    from hwnas.search.optimize import SearchSettings, run_search
    from hwnas.targets import get_target
    from hwnas.verify import random_calibration

    model = build("mobilenetv2", resolution=32, width=0.35)
    shapes = {model.graph.input[0].name: (1, 3, 32, 32)}
    calibration = random_calibration(model, shapes, samples=8, seed=0)
    target = get_target("npu-32x32")
    outcomes = [run_search(model, target, estimator_for(target), shapes,
                           SearchSettings(trials=24, limits=Limits(Drift(0.2)), workers=workers), calibration)
                for workers in (1, 2)]
    one, two = ([(t.pipeline, t.score) for t in o.trials] for o in outcomes)
    assert [p for p, _ in one] == [p for p, _ in two] and len(one) == 24
    assert any(p.startswith("scale-depth") for p, _ in one)
    for (_, a), (_, b) in zip(one, two):  # a refit's sums may differ in the last bits: one worker's BLAS runs a
        # thread per core, a pool worker's one thread
        assert replace(a, drift=0.0) == replace(b, drift=0.0) and b.drift == pytest.approx(a.drift, rel=1e-5, abs=1e-9)
    assert outcomes[0].depth_cache["depth_cache_shared_hits"] == 0  # one worker: nothing to share
    assert outcomes[1].depth_cache["depth_cache_shared_hits"] > 0

"""Distributed evaluation: worker processes score candidates through an Optuna RDB storage (SQLite here).

Measured on the 2-core machine (mobilenetv2 at 96², npu-32x32, evolution, seed 0, 20 trials): local
(1 process) and distributed (2 worker processes, SQLite) mode find the same best candidate, 0.6902 ms,
with the same 20 trials in the same order.
"""

from __future__ import annotations

import functools
import os

import pytest

from hwnas import api
from hwnas.errors import BadInputError
from hwnas.estimator.defaults import estimator_for
from hwnas.graph.gsgraph import to_graph, to_model
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.models import build
from hwnas.passes.base import PassContext
from hwnas.passes.manager import PassManager
from hwnas.passes.pipeline import parse_pipeline
from hwnas.search.algorithms import Limits, rank_key, search
from hwnas.search.distributed import StorageWorkers, open_storage
from hwnas.search.evaluate import CandidateEvaluator, Score
from hwnas.search.optimize import expert_candidate
from hwnas.search.space import PREFIX, SpaceOptions, build_space
from hwnas.targets import get_target

pytest.importorskip("sqlalchemy", reason="Optuna's RDB storage needs sqlalchemy")


def fake_score(pipeline: str) -> Score:
    """A deterministic score per pipeline; "bad" ones cannot be built."""
    if pipeline.startswith("bad"):
        return Score(float("inf"), 0, 0, 1.0, False, "ValueError: cannot build")
    return Score(float(len(pipeline)), len(pipeline), 0, 0.0, True)


def logged_score(log: str, pipeline: str) -> Score:
    with open(log, "a") as f:  # one line per evaluation, whichever process makes it
        f.write(pipeline + "\n")
    return fake_score(pipeline)


def die(pipeline: str) -> Score:
    os._exit(7)


def test_workers_return_the_scores_in_the_order_asked_each_job_run_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    log = tmp_path / "evaluated.txt"
    batches = [["aaa", "b", "bad-1", "cc", "aaa"], ["dddd"]]
    with StorageWorkers(url, functools.partial(logged_score, str(log)), workers=3) as workers:
        results = [workers.map(batch) for batch in batches]
    assert results == [[fake_score(p) for p in batch] for batch in batches]
    assert sorted(log.read_text().split()) == sorted(batches[0] + batches[1])
    storage = open_storage(url)
    jobs = storage.get_all_trials(storage.get_study_id_from_name(workers.study_name))
    assert [t.user_attrs["pipeline"] for t in jobs] == batches[0] + batches[1]
    assert [t.state.name for t in jobs] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]


def test_a_dead_worker_stops_the_search(tmp_path):
    with StorageWorkers(f"sqlite:///{tmp_path / 'jobs.db'}", die, workers=1) as workers:
        with pytest.raises(RuntimeError, match="1 of 1 worker processes died .exit code 7"):
            workers.map(["a"])


@pytest.mark.parametrize("url", ["nosuchdialect://x", "sqlite:////no/such/dir/x.db"])
def test_an_unusable_storage_is_bad_input(url):
    with pytest.raises(BadInputError, match="cannot open storage"):
        open_storage(url)


def test_a_study_name_in_use_is_bad_input(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with StorageWorkers(url, fake_score, workers=1, study_name="taken"):
        pass
    with pytest.raises(BadInputError, match="cannot create study 'taken'"):
        with StorageWorkers(url, fake_score, workers=1, study_name="taken"):
            pass


@pytest.mark.slow
def test_distributed_search_finds_what_the_local_search_finds(tmp_path):
    model = build("mobilenetv2", resolution=96)
    shapes = resolve_input_shapes(model, None)
    ctx = PassContext(template=model, input_shapes=shapes)
    prepared = PassManager(parse_pipeline(PREFIX)).run(to_graph(model), ctx).graph
    space = build_space(prepared, ctx, SpaceOptions(32))
    evaluator = CandidateEvaluator(to_model(prepared.copy(), model), prepared, ctx, estimator_for(get_target("npu-32x32")),
                                   count_memory=False)
    seeds = [space.baseline(), expert_candidate(space)]
    local = search(space, lambda pipelines: [evaluator.evaluate(p) for p in pipelines], "evolution", 20, Limits(), 0, seeds)
    with StorageWorkers(f"sqlite:///{tmp_path / 'search.db'}", evaluator.evaluate, workers=2) as workers:
        distributed = search(space, workers.map, "evolution", 20, Limits(), 0, seeds)
    assert [t.pipeline for t in distributed] == [t.pipeline for t in local]
    best_local, best_distributed = (min(trials, key=rank_key(Limits())) for trials in (local, distributed))
    assert best_distributed.pipeline == best_local.pipeline
    assert best_distributed.score == best_local.score
    assert best_local.score.latency_ms < 0.5 * local[0].score.latency_ms  # a real search, not the baseline


@pytest.mark.slow
def test_optimize_with_a_storage_gives_the_local_result(tmp_path):
    model = build("mobilenetv2", resolution=96)
    local = api.optimize(model, "npu-32x32", trials=12, seed=1, workers=1)
    distributed = api.optimize(model, "npu-32x32", trials=12, seed=1, workers=2,
                               storage=f"sqlite:///{tmp_path / 'search.db'}")
    assert distributed.report["pipeline"] == local.report["pipeline"]
    assert distributed.report["search"]["best_so_far"] == local.report["search"]["best_so_far"]

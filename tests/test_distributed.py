"""Distributed evaluation: worker processes score candidates through an Optuna RDB storage (SQLite, and
PostgreSQL from pgserver where it starts).

Measured on the 2-core machine (mobilenetv2 at 96², npu-32x32, evolution, seed 0, 20 trials): local
(1 process) and distributed (2 worker processes, SQLite) mode find the same best candidate, 0.6902 ms,
with the same 20 trials in the same order.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import onnx
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
from hwnas.search.distributed import StorageWorkers, open_storage, work
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


def killed_once(marker: str, log: str, pipeline: str) -> Score:
    """Evaluates; the first worker to take the "victim" is killed with SIGKILL while holding it."""
    if pipeline == "victim" and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return logged_score(log, pipeline)


def always_killed(pipeline: str) -> Score:
    if pipeline == "deadly":
        os.kill(os.getpid(), signal.SIGKILL)
    return fake_score(pipeline)


def raises(pipeline: str) -> Score:
    if pipeline == "flaky":
        raise OSError("disk full")
    return fake_score(pipeline)


def attempts(url: str, study: str) -> dict[str, list[str]]:
    """The states of every job posted for each pipeline, oldest first."""
    storage = open_storage(url)
    found: dict[str, list[str]] = {}
    for t in storage.get_all_trials(storage.get_study_id_from_name(study)):
        found.setdefault(t.user_attrs["pipeline"], []).append(t.state.name)
    return found


def test_workers_return_the_scores_in_the_order_asked_each_job_run_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    log = tmp_path / "evaluated.txt"
    batches = [["aaa", "b", "bad-1", "cc", "aaa"], ["dddd"]]
    with StorageWorkers(url, functools.partial(logged_score, str(log)), 3, "s") as workers:
        results = [workers.map(batch) for batch in batches]
    assert results == [[fake_score(p) for p in batch] for batch in batches]
    assert sorted(log.read_text().split()) == sorted(set(batches[0])) + batches[1]
    assert attempts(url, "s") == {"aaa": ["COMPLETE"], "b": ["COMPLETE"], "bad-1": ["FAIL"], "cc": ["COMPLETE"],
                                  "dddd": ["COMPLETE"]}


def test_a_worker_killed_holding_a_candidate_costs_that_candidate_once_more(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    log, marker = tmp_path / "evaluated.txt", tmp_path / "killed"
    batch = ["a", "victim", "bb", "ccc"]
    with StorageWorkers(url, functools.partial(killed_once, str(marker), str(log)), 2, "s", heartbeat=(1, 2)) as workers:
        assert workers.map(batch) == [fake_score(p) for p in batch]
    assert marker.exists()
    assert sorted(log.read_text().split()) == sorted(batch)  # the victim's second evaluation is its only complete one
    assert attempts(url, "s")["victim"] == ["FAIL", "COMPLETE"]
    assert all(attempts(url, "s")[p] == ["COMPLETE"] for p in ("a", "bb", "ccc"))


def test_a_candidate_that_fails_twice_is_a_failed_candidate_and_the_search_goes_on(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with StorageWorkers(url, raises, 1, "s", heartbeat=(1, 2)) as workers:
        flaky, ok = workers.map(["flaky", "ok"])
    assert ok == fake_score("ok")
    assert flaky.latency_ms == float("inf") and "evaluated 2 times" in flaky.error and "OSError: disk full" in flaky.error
    assert attempts(url, "s")["flaky"] == ["FAIL", "FAIL"]


def test_a_candidate_that_kills_its_worker_twice_is_a_failed_candidate(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with StorageWorkers(url, always_killed, 1, "s", heartbeat=(1, 2)) as workers:
        deadly, ok = workers.map(["deadly", "ok"])
    assert ok == fake_score("ok")
    assert "stopped heartbeating" in deadly.error
    assert attempts(url, "s")["deadly"] == ["FAIL", "FAIL"]


def test_ctrl_c_releases_the_candidate_to_another_worker_without_counting_an_attempt(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"

    def interrupted(pipeline: str) -> Score:
        raise KeyboardInterrupt

    with StorageWorkers(url, fake_score, 0, "s", spec={"unused": b"no worker builds from it"}) as coordinator:
        result = []
        thread = threading.Thread(target=lambda: result.append(coordinator.map(["x"])))
        thread.start()
        with pytest.raises(KeyboardInterrupt):
            work(url, "s", interrupted)
        assert work(url, "s", raises, max_candidates=1).evaluated == 1
        thread.join(timeout=30)
    assert result == [[fake_score("x")]]
    assert attempts(url, "s")["x"] == ["FAIL", "COMPLETE"]


def test_a_restarted_coordinator_takes_what_the_study_holds_and_evaluates_nothing_twice(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    log = tmp_path / "evaluated.txt"
    with StorageWorkers(url, functools.partial(logged_score, str(log)), 1, "s") as first:
        first.map(["a", "bb"])
    with StorageWorkers(url, functools.partial(logged_score, str(log)), 1, "s") as again:  # the same search, resumed
        assert again.map(["a", "bb", "ccc"]) == [fake_score(p) for p in ("a", "bb", "ccc")]
    assert sorted(log.read_text().split()) == ["a", "bb", "ccc"]
    assert attempts(url, "s") == {"a": ["COMPLETE"], "bb": ["COMPLETE"], "ccc": ["COMPLETE"]}


@pytest.mark.parametrize("url", ["nosuchdialect://x", "sqlite:////no/such/dir/x.db", "mysql://u@localhost/db",
                                 "postgresql://hwnas@127.0.0.1:9/hwnas"])
def test_an_unusable_storage_is_bad_input(url):
    """A bad URL, a missing driver (MySQLdb is not installed), an unreachable server (nothing on port 9)."""
    with pytest.raises(BadInputError, match="cannot open storage"):
        open_storage(url)


@pytest.mark.parametrize("command", [["worker", "--storage"], ["optimize", "IN", "-o", "OUT", "--target", "npu-32x32",
                                                              "--workers", "0", "--storage"]])
def test_the_cli_says_an_unusable_storage_in_one_line(tmp_path, command):
    if "IN" in command:
        onnx.save(build("mobilenetv2", resolution=32, width=0.35), str(tmp_path / "in.onnx"))
        command = [str(tmp_path / "in.onnx") if c == "IN" else str(tmp_path / "out.onnx") if c == "OUT" else c for c in command]
    done = subprocess.run([sys.executable, "-m", "hwnas", *command, "mysql://u@localhost/db"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "cannot open storage" in done.stderr, done.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_workers_0_needs_a_storage():
    with pytest.raises(BadInputError, match="--workers must be at least 1"):
        api.optimize(build("mobilenetv2", resolution=32, width=0.35), "npu-32x32", trials=2, workers=0)


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

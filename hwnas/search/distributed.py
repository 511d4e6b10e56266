"""Distributed evaluation: worker processes score candidates posted to an Optuna RDB storage.

The search itself stays in one process, the coordinator: it asks its sampler for a seeded batch of
candidates exactly as a local search does (hwnas.search.algorithms), so the same seed and the same
scores give the same trials, the same best and the same journal. Only the *evaluation* of each batch is
spread out, through a study in the storage that serves as a job board:

    coordinator                                   storage (study "hwnas-…")            workers 1..N
    ───────────                                   ─────────────────────────            ────────────
    one WAITING trial per pipeline  ─────────────► trial {pipeline}
                                                   WAITING → RUNNING  ◄──────────────── claim one
                                                   user attr "score", COMPLETE ◄─────── evaluate, write
    read the scores, in the order asked ◄───────── (FAIL when the candidate could not be built)

Claiming is Optuna's own: `set_trial_state_values(RUNNING)` succeeds only for a trial still WAITING,
reading and writing it under a row lock (PostgreSQL, MySQL). SQLite has no row locks, so there every
transaction takes the database's write lock as it begins (BEGIN IMMEDIATE): either way each job runs
once. A job costs four small writes (about 0.1 s on a local disk, each an fsync): the storage pays off
when evaluations take seconds or more (--evaluate-cmd, zero-shot) or run on several machines, not for
estimator-only scores, which the local process pool computes faster.

`storage` is any SQLAlchemy URL Optuna accepts: `sqlite:///search.db` for several processes on one
machine, `postgresql://user@host/db` for workers on several machines (each runs `work(...)` with the
same model and settings; `StorageWorkers` starts local ones), with the database's driver installed.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict

import optuna
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.study import StudyDirection
from optuna.trial import TrialState, create_trial

from hwnas.errors import BadInputError
from hwnas.search.evaluate import Score

_CLOSED = "closed"  # study user attribute: the coordinator is done, workers leave
_POLL_S = (0.01, 0.2)  # polling interval: starts short, doubles while nothing changes, up to the maximum


def open_storage(url: str):
    """An Optuna RDB storage for `url` (SQLAlchemy and alembic come with Optuna); BadInputError if unusable."""
    sqlite = url.startswith("sqlite")
    # SQLite serialises writers on a file lock: wait for it instead of failing at the default 5 s; and let
    # SQLAlchemy, not the driver, begin transactions (isolation_level=None), so that they begin as below
    engine = {"connect_args": {"timeout": 60, "isolation_level": None}} if sqlite else {}
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as e:  # SQLAlchemy's errors for a bad URL, a missing driver, an unreachable server
        raise BadInputError(f"cannot open storage {url!r}: {str(e).splitlines()[0]}") from None
    if sqlite:
        # A claim reads a job's state, then writes it. SQLite has no row locks: every transaction takes the
        # write lock as it begins, so two claims cannot interleave and each job runs once.
        sqlalchemy.event.listen(storage.engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
    return storage


def work(url: str, study_name: str, evaluate: Callable[[str], Score]) -> None:
    """A worker's loop: claim waiting jobs of the study, evaluate them, write the scores; return when closed."""
    storage = open_storage(url)
    study_id = storage.get_study_id_from_name(study_name)
    idle = _POLL_S[0]
    while True:
        job = _claim(storage, study_id)
        if job is not None:
            _write(storage, job[0], evaluate(job[1]))
            idle = _POLL_S[0]
        elif storage.get_study_user_attrs(study_id).get(_CLOSED):
            return
        else:
            time.sleep(idle)
            idle = min(idle * 2, _POLL_S[1])


def _write(storage, trial_id: int, score: Score) -> None:
    """The score as the job's user attribute, then the job finished (FAIL: the candidate could not be built)."""
    failed = score.error is not None
    storage.set_trial_user_attr(trial_id, "score", json.dumps(asdict(score)))
    storage.set_trial_state_values(trial_id, TrialState.FAIL if failed else TrialState.COMPLETE,
                                   None if failed else [score.latency_ms])


def _local_worker(url: str, study_name: str, evaluate: Callable[[str], Score]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle: it closes the study
    work(url, study_name, evaluate)


def _claim(storage, study_id: int) -> tuple[int, str] | None:
    """(trial id, pipeline) of a waiting job this worker now holds, or None when none is waiting."""
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        with contextlib.suppress(UpdateFinishedTrialError):  # done by another worker since we listed it
            if storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                return trial_id, trial.user_attrs["pipeline"]
    return None


class StorageWorkers:
    """Local worker processes around a study in `url`; `map(pipelines)` scores a batch through them.

    Use as a context manager: entering creates the study and starts `workers` processes (forked, so
    they inherit `evaluate` and what it holds); leaving closes the study and stops them.
    """

    def __init__(self, url: str, evaluate: Callable[[str], Score], workers: int, study_name: str | None = None):
        if workers < 1:
            raise BadInputError(f"--workers must be at least 1 with --storage, got {workers}")
        self.url = url
        self.evaluate = evaluate
        self.workers = workers
        self.study_name = study_name or f"hwnas-{uuid.uuid4().hex[:12]}"

    def __enter__(self) -> StorageWorkers:
        self._storage = open_storage(self.url)
        try:
            self._study_id = self._storage.create_new_study([StudyDirection.MINIMIZE], self.study_name)
        except Exception as e:  # optuna's DuplicatedStudyError, or the database refusing the write
            raise BadInputError(f"cannot create study {self.study_name!r} in {self.url!r}: {e}") from None
        context = multiprocessing.get_context("fork")
        self._processes = [
            context.Process(target=_local_worker, args=(self.url, self.study_name, self.evaluate), daemon=True)
            for _ in range(self.workers)
        ]
        for p in self._processes:
            p.start()
        return self

    def __exit__(self, *exc) -> None:
        self._storage.set_study_user_attr(self._study_id, _CLOSED, True)
        deadline = time.monotonic() + 5
        for p in self._processes:
            p.join(timeout=max(deadline - time.monotonic(), 0))
        for p in self._processes:
            if p.is_alive():  # still in an evaluation whose result is no longer wanted
                p.terminate()
                p.join()

    def map(self, pipelines: Sequence[str]) -> list[Score]:
        """The scores of `pipelines`, in order, computed by the workers."""
        ids = [
            self._storage.create_new_trial(
                self._study_id, template_trial=create_trial(state=TrialState.WAITING, user_attrs={"pipeline": p}))
            for p in pipelines
        ]
        scores: dict[int, Score] = {}
        idle = _POLL_S[0]
        while True:
            for trial_id in ids:
                trial = None if trial_id in scores else self._storage.get_trial(trial_id)
                if trial is not None and trial.state.is_finished() and "score" in trial.user_attrs:
                    scores[trial_id] = Score(**json.loads(trial.user_attrs["score"]))
            if len(scores) == len(ids):
                return [scores[i] for i in ids]
            self._check_workers()
            time.sleep(idle)
            idle = min(idle * 2, _POLL_S[1])

    def _check_workers(self) -> None:
        dead = [p for p in self._processes if not p.is_alive()]
        if dead:
            raise RuntimeError(f"distributed evaluation: {len(dead)} of {self.workers} worker processes died "
                               f"(exit code {dead[0].exitcode}); the journal keeps every score written so far")

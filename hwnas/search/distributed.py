"""Distributed evaluation: worker processes score candidates posted to an Optuna RDB storage.

The search itself stays in one process, the coordinator: it asks its sampler for a seeded batch of
candidates exactly as a local search does (hwnas.search.algorithms), so the same seed and the same
scores give the same trials, the same best and the same journal. Only the *evaluation* of each batch is
spread out, through a study in the storage that serves as a job board:

    coordinator                                   storage (study "hwnas-…")            workers 1..N
    ───────────                                   ─────────────────────────            ────────────
    the evaluator's inputs as plain data       ──► table hwnas_blobs ─────────────────► build the evaluator
      (ONNX bytes, JSON, .npz: EvaluatorSpec)      study user attr "hwnas" (version)
    one WAITING trial per pipeline  ─────────────► trial {pipeline}
      (the next batch's too, see `post`)
                                                   WAITING → RUNNING  ◄──────────────── beat once, claim one
                                                   heartbeat every HEARTBEAT_S ◄─────── while evaluating
                                                   user attr "score", COMPLETE ◄─────── evaluate, write
    read the scores, in the order asked ◄───────── (FAIL when the candidate could not be built)
    no heartbeat for GRACE_S: FAIL, post again ──► trial {pipeline} (second attempt)

Between batches the workers would sit idle while the coordinator reads the scores, tells its sampler and
asks for the next batch, and in a batch's last round only some of them have a candidate. So wherever the
search's next batch cannot depend on this one's scores (random sampling, and NSGA-II within a generation:
hwnas.search.algorithms), the coordinator posts it with this one, behind it: idle workers start on it, and
the trials stay those of the local search.

Claiming is Optuna's own: `set_trial_state_values(RUNNING)` succeeds only for a trial still WAITING,
reading and writing it under a row lock (PostgreSQL, MySQL). SQLite has no row locks, so there every
transaction takes the database's write lock as it begins (BEGIN IMMEDIATE): either way each job runs
once. A job costs six small writes (about 0.1 s on a local disk, each an fsync): the storage pays off
when evaluations take seconds or more (--evaluate-cmd, zero-shot) or run on several machines, not for
estimator-only scores, which the local process pool computes faster.

Failures cost one candidate, never the search. A worker heartbeats the trial it holds through Optuna's
heartbeat (RDBStorage's `heartbeat_interval` / `grace_period`, `fail_stale_trials`); the coordinator
fails a trial whose heartbeat stopped (the worker was killed, its machine lost) and posts the pipeline
again, once. A worker whose evaluation raises fails its trial with the error, posted again the same way;
a pipeline that failed ATTEMPTS times is scored as a failed candidate carrying the last error. Only the
coordinator posts jobs, so a pipeline never has two live attempts. A worker stopped with Ctrl-C releases
its trial (FAIL, "released"), which does not count as an attempt.

The study's name is derived from the search's settings (the journal's header): the same command run
again, after the coordinator died, joins the same study, takes the scores written there since the
journal's last line and waits for the jobs still posted, so nothing finished is evaluated again.

`storage` is any SQLAlchemy URL Optuna accepts: `sqlite:///search.db` for several processes on one
machine, `postgresql://user@host/db` for workers on several machines (each runs `hwnas worker --storage
URL`; `StorageWorkers` starts local ones), with the database's driver installed (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import fail_stale_trials
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.study import StudyDirection
from optuna.trial import TrialState, create_trial

from hwnas.version import __version__
from hwnas.errors import BadInputError
from hwnas.search.evaluate import Score

_CLOSED = "closed"  # study user attribute: the coordinator is done, workers leave
_SPEC = "hwnas"  # study user attribute: the coordinator's hwnas version, set once the blobs are written
_HEARTBEAT = "heartbeat"  # study user attribute: [interval, grace period] in seconds, the coordinator's choice
_POLL_S = (0.01, 0.2)  # polling interval: starts short, doubles while nothing changes, up to the maximum
HEARTBEAT_S, GRACE_S = 5, 30  # a worker heartbeats every 5 s; silent for 30 s, its candidate is posted again
_CREATE_TRIES = 4  # opening a fresh database: see open_storage
ATTEMPTS = 2  # evaluations of one pipeline that may fail (worker lost, evaluation raised) before it is scored failed


def open_storage(url: str, heartbeat: tuple[int, int] | None = None):
    """An Optuna RDB storage for `url` (SQLAlchemy and alembic come with Optuna); BadInputError if unusable.

    `heartbeat`: (interval, grace period) in seconds, to record heartbeats and find the stale trials.
    """
    sqlite = url.startswith("sqlite")
    # SQLite serialises writers on a file lock: wait for it instead of failing at the default 5 s; and let
    # SQLAlchemy, not the driver, begin transactions (isolation_level=None), so that they begin as below.
    # Elsewhere give up on an unreachable server after 10 s instead of the driver's minutes.
    engine = ({"connect_args": {"timeout": 60, "isolation_level": None}} if sqlite
              else {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {})
    interval, grace = heartbeat or (None, None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line on stderr per study created
    for attempt in range(_CREATE_TRIES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)  # the heartbeat is experimental in Optuna 4-5
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=interval,
                                                     grace_period=grace)
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            # Processes opening a fresh database at once (workers started before their coordinator) race
            # to create Optuna's tables; the losers find them made when they try again.
            if attempt + 1 == _CREATE_TRIES:
                raise BadInputError(f"cannot open storage {url!r}: {_first_line(e)}") from None
            time.sleep(0.5 * (attempt + 1))
        except Exception as e:  # SQLAlchemy's errors for a bad URL, a missing driver, an unreachable server
            raise BadInputError(f"cannot open storage {url!r}: {_first_line(e)}") from None
    if sqlite:
        # A claim reads a job's state, then writes it. SQLite has no row locks: every transaction takes the
        # write lock as it begins, so two claims cannot interleave and each job runs once.
        sqlalchemy.event.listen(storage.engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
    return storage


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# What a worker builds its evaluator from, in a table of its own beside Optuna's: plain bytes (ONNX, JSON,
# .npz), never a pickle, and kept out of the study attributes that workers and coordinator poll.
_BLOBS = sqlalchemy.Table(
    "hwnas_blobs", sqlalchemy.MetaData(),
    sqlalchemy.Column("study", sqlalchemy.String(512), primary_key=True),
    sqlalchemy.Column("name", sqlalchemy.String(64), primary_key=True),
    sqlalchemy.Column("data", sqlalchemy.LargeBinary(length=2**32 - 1), nullable=False),  # MySQL: LONGBLOB
)


def put_blobs(storage, study_name: str, blobs: Mapping[str, bytes]) -> None:
    """Store `blobs` for `study_name`, replacing what a previous coordinator of the same search stored."""
    _BLOBS.create(storage.engine, checkfirst=True)
    with storage.engine.begin() as connection:
        connection.execute(_BLOBS.delete().where(_BLOBS.c.study == study_name))
        connection.execute(_BLOBS.insert(), [{"study": study_name, "name": k, "data": v} for k, v in blobs.items()])


def get_blobs(storage, study_name: str) -> dict[str, bytes]:
    """The blobs `put_blobs` stored (not the workers' `SharedBuilds`)."""
    with storage.engine.connect() as connection:
        rows = connection.execute(sqlalchemy.select(_BLOBS.c.name, _BLOBS.c.data).where(
            _BLOBS.c.study == study_name, ~_BLOBS.c.name.startswith(_BUILT)))
        return {name: bytes(data) for name, data in rows}


_BUILT = "built/"  # blob name prefix of SharedBuilds' graphs
_SHARED_BYTES = 256 << 20  # larger graphs are built by each worker that needs them


class SharedBuilds:
    """Graphs a worker built that the others would build again (the depth-scaled graphs a search's
    candidates start from, seconds of refits each), by their pipeline, in the study's blobs: each is
    built about once per search instead of once per worker (hwnas.search.evaluate.CandidateEvaluator)."""

    def __init__(self, storage, study_name: str):
        self.storage, self.study_name = storage, study_name

    def _name(self, key: str) -> str:
        return _BUILT + hashlib.sha256(key.encode()).hexdigest()[:48]  # the name column holds 64 characters

    def get(self, key: str) -> bytes | None:
        with self.storage.engine.connect() as connection:
            data = connection.execute(sqlalchemy.select(_BLOBS.c.data).where(
                _BLOBS.c.study == self.study_name, _BLOBS.c.name == self._name(key))).scalar()
        return None if data is None else bytes(data)

    def put(self, key: str, data: bytes) -> None:
        if len(data) > _SHARED_BYTES:  # a copy per multiplier of a large model would swell the database
            return
        # IntegrityError: another worker stored it first (the same graph); others: a graph the database will
        # not take (MySQL's max_allowed_packet) is not shared, and the candidate goes on with its own
        with contextlib.suppress(sqlalchemy.exc.DBAPIError):
            with self.storage.engine.begin() as connection:
                connection.execute(_BLOBS.insert(), [{"study": self.study_name, "name": self._name(key), "data": data}])


@dataclass(frozen=True)
class WorkerRun:
    """What one worker did: the study it joined and how many candidates it evaluated."""

    study: str
    evaluated: int


def work(url: str, study_name: str | None = None, evaluate: Callable[[str], Score] | None = None, *,
         build: Callable[[dict[str, bytes], SharedBuilds], Callable[[str], Score]] | None = None, once: bool = False,
         max_candidates: int | None = None, on_job: Callable[[str], None] | None = None,
         share: Callable[[SharedBuilds], None] | None = None) -> WorkerRun:
    """A worker's loop: claim waiting jobs of the study, evaluate them, write the scores; return when closed.

    `study_name`: the study to join; None waits for the newest open one. `evaluate` scores a pipeline; a
    worker on another machine passes `build` instead, which makes it from the blobs the coordinator
    stored (plain data, see `put_blobs`) and the graphs the workers share (`SharedBuilds`); with
    `evaluate`, `share` is told them. `once`: leave when no job is waiting instead of waiting for more;
    `max_candidates`: leave after that many. Ctrl-C (KeyboardInterrupt) releases the job in hand, for
    another worker, and re-raises.
    """
    storage = open_storage(url)
    study_id, study_name = _join(storage, study_name, wait=not once, built_here=evaluate is not None)
    if study_id is None:
        return WorkerRun("", 0)
    attrs = storage.get_study_user_attrs(study_id)
    storage.engine.dispose()
    storage = open_storage(url, tuple(attrs[_HEARTBEAT]))  # heartbeats as the coordinator expects them
    if evaluate is None:
        evaluate = build(get_blobs(storage, study_name), SharedBuilds(storage, study_name))
    elif share is not None:
        share(SharedBuilds(storage, study_name))
    me = f"{socket.gethostname()}:{os.getpid()}"
    evaluated, idle = 0, _POLL_S[0]
    while max_candidates is None or evaluated < max_candidates:
        job = _claim(storage, study_id, me)
        if job is None:
            if once or storage.get_study_user_attrs(study_id).get(_CLOSED):
                break
            time.sleep(idle)
            idle = min(idle * 2, _POLL_S[1])
            continue
        trial_id, pipeline = job
        if on_job is not None:
            on_job(pipeline)
        try:
            with get_heartbeat_thread(trial_id, storage):
                score = evaluate(pipeline)
        except KeyboardInterrupt:
            _fail(storage, trial_id, "released: its worker was stopped (Ctrl-C)", released=True)
            raise
        except Exception as e:  # an evaluation that breaks, not a bad candidate (that is a Score with an error)
            _fail(storage, trial_id, f"{type(e).__name__}: {e} (on {me})")
        else:
            _write(storage, trial_id, score)
        evaluated += 1
        idle = _POLL_S[0]
    return WorkerRun(study_name, evaluated)


def _join(storage, study_name: str | None, wait: bool, built_here: bool) -> tuple[int | None, str]:
    """The id and name of the study to work for: the named one, or the newest still open; None if none and
    not `wait`. Unless the worker builds its evaluator itself (`built_here`), only once its blobs are stored."""
    idle = _POLL_S[0]
    while True:
        if study_name is not None:
            with contextlib.suppress(KeyError):  # not created yet: the coordinator is still preparing
                study_id = storage.get_study_id_from_name(study_name)
                if built_here or _SPEC in storage.get_study_user_attrs(study_id):
                    return study_id, study_name
        else:
            open_names = [s.study_name for s in storage.get_all_studies()
                          if _SPEC in s.user_attrs and not s.user_attrs.get(_CLOSED)]
            if open_names:  # the newest: ids grow (FrozenStudy's own id is private to Optuna)
                newest_id, newest_name = max((storage.get_study_id_from_name(n), n) for n in open_names)
                return newest_id, newest_name
        if not wait:
            return None, ""
        time.sleep(idle)
        idle = min(idle * 2, _POLL_S[1])  # a worker started first joins within a poll of the coordinator's start


def _write(storage, trial_id: int, score: Score) -> None:
    """The score as the job's user attribute, then the job finished (FAIL: the candidate could not be built)."""
    failed = score.error is not None
    # a worker silent past the grace period (paused, cut off) was given up on: its job is posted again
    with contextlib.suppress(UpdateFinishedTrialError):
        storage.set_trial_user_attr(trial_id, "score", json.dumps(asdict(score)))
        storage.set_trial_state_values(trial_id, TrialState.FAIL if failed else TrialState.COMPLETE,
                                       None if failed else [score.latency_ms])


def _fail(storage, trial_id: int, error: str, released: bool = False) -> None:
    """The job finished without a score: the coordinator posts its pipeline again (see ATTEMPTS)."""
    with contextlib.suppress(UpdateFinishedTrialError):  # the coordinator found it stale first
        storage.set_trial_user_attr(trial_id, "error", error)
        if released:
            storage.set_trial_user_attr(trial_id, "released", True)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)


def _local_worker(url: str, study_name: str, evaluate: Callable[[str], Score],
                  share: Callable[[SharedBuilds], None] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle: it closes the study
    work(url, study_name, evaluate, share=share)


def _claim(storage, study_id: int, me: str) -> tuple[int, str] | None:
    """(trial id, pipeline) of a waiting job this worker now holds, or None when none is waiting."""
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        # Heartbeat first: Optuna never finds a RUNNING trial without one stale, so a worker killed between
        # its claim and its heartbeat thread's first beat would hold the job forever. A beat on a job another
        # worker wins is harmless: that worker's own beats overwrite it, and only RUNNING jobs go stale.
        storage.record_heartbeat(trial_id)
        with contextlib.suppress(UpdateFinishedTrialError):  # done by another worker since we listed it
            if storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                storage.set_trial_user_attr(trial_id, "worker", me)  # who evaluated it, for the record
                return trial_id, trial.user_attrs["pipeline"]
    return None


@dataclass(frozen=True)
class JobStatus:
    """A batch's progress on the job board, for a progress bar."""

    claimed: int  # jobs a worker holds now
    finished: int  # pipelines of the batch scored
    total: int  # pipelines in the batch


class StorageWorkers:
    """Local worker processes around a study in `url`; `map(pipelines)` scores a batch through them.

    Use as a context manager: entering creates (or, resuming, joins) the study and writes what remote
    workers need (`spec`: named blobs of plain data, see `put_blobs`); the first jobs posted start `workers`
    local processes (forked then, so they inherit `evaluate` with what the coordinator cached by then; 0
    starts none and waits for `hwnas worker` processes); leaving closes the study. `share`: told, in each
    local process, the `SharedBuilds` it reads and stores built graphs through (its own connection).
    """

    def __init__(self, url: str, evaluate: Callable[[str], Score], workers: int, study_name: str,
                 spec: Mapping[str, bytes] | None = None, heartbeat: tuple[int, int] = (HEARTBEAT_S, GRACE_S),
                 status: Callable[[JobStatus], None] | None = None, share: Callable[[SharedBuilds], None] | None = None):
        if workers < 0:
            raise BadInputError(f"--workers must be at least 0 with --storage, got {workers}")
        if workers == 0 and spec is None:
            raise BadInputError("no local workers and nothing for remote ones to build the evaluator from")
        self.url = url
        self.evaluate = evaluate
        self.workers = workers
        self.study_name = study_name
        self.spec = spec
        self.heartbeat = heartbeat
        self.status = status
        self.share = share

    def __enter__(self) -> StorageWorkers:
        self._storage = open_storage(self.url, self.heartbeat)
        try:
            self._study_id = self._storage.get_study_id_from_name(self.study_name)  # resuming: the same search
        except KeyError:
            try:
                self._study_id = self._storage.create_new_study([StudyDirection.MINIMIZE], self.study_name)
            except Exception as e:  # the database refusing the write
                raise BadInputError(f"cannot create study {self.study_name!r} in {self.url!r}: {e}") from None
        self._study = optuna.load_study(study_name=self.study_name, storage=self._storage)
        self._storage.set_study_user_attr(self._study_id, _HEARTBEAT, list(self.heartbeat))
        _BLOBS.create(self._storage.engine, checkfirst=True)  # also where the workers share their builds
        if self.spec is not None:
            put_blobs(self._storage, self.study_name, self.spec)
            self._storage.set_study_user_attr(self._study_id, _SPEC, __version__)  # workers may build now
        self._storage.set_study_user_attr(self._study_id, _CLOSED, False)
        self._context = multiprocessing.get_context("fork")
        self._processes: list = []
        return self

    def _start(self):
        p = self._context.Process(target=_local_worker, args=(self.url, self.study_name, self.evaluate, self.share),
                                  daemon=True)
        p.start()
        return p

    def shared_builds(self) -> SharedBuilds:
        """The graphs the workers share, for the coordinator's own evaluations (not for a forked process)."""
        return SharedBuilds(self._storage, self.study_name)

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
        wanted = list(dict.fromkeys(pipelines))
        self._deaths, self._batch = 0, len(wanted)
        self.post(wanted)
        scores: dict[str, Score] = {}
        idle = _POLL_S[0]
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                fail_stale_trials(self._study)  # heartbeat silent for the grace period: FAIL, posted again below
            jobs, claimed = self._jobs(wanted), 0
            for p in wanted:
                if p in scores:
                    continue
                attempts = jobs[p]
                scored = next((t for t in attempts if "score" in t.user_attrs), None)
                if scored is not None:
                    scores[p] = Score(**json.loads(scored.user_attrs["score"]))
                elif any(not t.state.is_finished() for t in attempts):
                    claimed += any(t.state == TrialState.RUNNING for t in attempts)
                elif sum(not t.user_attrs.get("released") for t in attempts) < ATTEMPTS:
                    self._post(p)
                else:
                    scores[p] = Score(float("inf"), 0, 0, 1.0, False, f"evaluated {ATTEMPTS} times without a score, "
                                      f"last: {_failure(attempts[-1], self.heartbeat[1])}")
            if self.status is not None:
                self.status(JobStatus(claimed, len(scores), len(wanted)))
            if len(scores) == len(wanted):
                return [scores[p] for p in pipelines]
            self._replace_dead_workers()
            time.sleep(idle)
            idle = min(idle * 2, _POLL_S[1])

    def post(self, pipelines: Sequence[str]) -> None:
        """Jobs for those of `pipelines` that have none yet, for idle workers to start on before `map` asks
        for their scores (the search's next batch, see hwnas.search.algorithms.search). Scores and jobs
        already in the study (posted ahead, or left by a previous coordinator of this search) are taken as
        they are."""
        if not self._processes:
            self._processes = [self._start() for _ in range(self.workers)]
        for p, attempts in self._jobs(list(dict.fromkeys(pipelines))).items():
            if not attempts:
                self._post(p)

    def _jobs(self, pipelines: Sequence[str]) -> dict[str, list]:
        """The study's trials for each of `pipelines`, oldest first (every attempt, this run's and earlier ones)."""
        jobs: dict[str, list] = {p: [] for p in pipelines}
        for t in self._storage.get_all_trials(self._study_id, deepcopy=False):
            if t.user_attrs.get("pipeline") in jobs:
                jobs[t.user_attrs["pipeline"]].append(t)
        return jobs

    def _post(self, pipeline: str) -> None:
        self._storage.create_new_trial(
            self._study_id, template_trial=create_trial(state=TrialState.WAITING, user_attrs={"pipeline": pipeline}))

    def _replace_dead_workers(self) -> None:
        """A local worker that died is replaced; the job it held comes back when its heartbeat goes stale."""
        dead = [p for p in self._processes if not p.is_alive()]
        self._deaths += len(dead)
        if self._deaths > ATTEMPTS * self._batch:  # more than the batch's jobs can kill: they die without one
            raise RuntimeError(f"distributed evaluation: local worker processes keep dying ({self._deaths}, last "
                               f"exit code {dead[-1].exitcode}); the journal keeps every score written so far")
        self._processes = [p if p.is_alive() else self._start() for p in self._processes]


def _failure(trial, grace: int) -> str:
    return trial.user_attrs.get("error") or f"its worker stopped heartbeating for over {grace} s"

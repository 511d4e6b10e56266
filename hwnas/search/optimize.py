"""`optimize`: prepare the model, build the space, search, apply the winner, verify it, report.

1. The exact prefix (fold-bn, fold-affine, fold-constants, flush-denormals) runs once; candidates start
   from its graph.
2. The space is built from that graph and the target's parallelism factor (curated by default).
3. Seed candidates — the baseline and the expert recipe (every depthwise conv regrouped with PF
   channels per group, every channel group padded to a multiple of PF) — go in first; then the
   algorithm runs for `trials` evaluations (or `time_budget` seconds), scored by the target's estimator,
   in parallel worker processes (or, with `storage`, worker processes fed through an Optuna RDB storage:
   hwnas.search.distributed), every score journaled. Candidates that will be trained (`zero-shot`,
   `evaluate_cmd`) are also scored for quality and must keep the original's, less `quality_tolerance` of it.
4. The best feasible candidate (fastest within the drift and memory limits) is applied to the original
   model and verified with ONNX Runtime: equivalence for exact pipelines, drift against the budget for
   reconstructed ones. If the winner fails, the next best is tried: nothing unverified is returned.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import multiprocessing
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from multiprocessing.pool import AsyncResult

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from threadpoolctl import threadpool_limits

from hwnas.version import __version__ as HWNAS_VERSION
from hwnas.errors import BadInputError, CheckFailedError
from hwnas.estimator.estimator import LatencyEstimator
from hwnas.graph.gsgraph import to_graph, to_model
from hwnas.graph.session import make_session, run_per_sample
from hwnas.graph.shapes import Shape
from hwnas.passes._reconstruct import FitCache
from hwnas.passes.base import PassContext
from hwnas.passes.manager import PassManager
from hwnas.passes.pipeline import parse_pipeline
from hwnas.search.algorithms import ALGORITHMS, BATCH, Limits, Trial, first_candidates, pareto_front, rank_key, search
from hwnas.search.distributed import JobStatus, StorageWorkers
from hwnas.search.evaluate import PHASES, CandidateEvaluator, Journal, Score, SharedBuilds, fingerprint
from hwnas.search.external import DEFAULT_TIMEOUT_S, ExternalEvaluator
from hwnas.search.proxy import NaswotProxy
from hwnas.search.recipe import full_pipeline
from hwnas.search.sensitivity import add_ranked_depth
from hwnas.search.space import KEEP, PREFIX, SearchSpace, SpaceOptions, build_space
from hwnas.targets.base import Target
from hwnas.verify.calibration import split_calibration
from hwnas.verify.policy import Drift, Retrain


@dataclass(frozen=True)
class SearchSettings:
    algorithm: str = "evolution"
    trials: int = 200
    time_budget: float | None = None
    seed: int = 0
    curated: bool = True
    workers: int | None = None  # None: one per CPU core; 0 (with storage): none here, `hwnas worker` processes elsewhere
    limits: Limits = Limits()
    journal: str | None = None
    evaluate_cmd: str | None = None  # the user's score for a candidate (higher is better), e.g. after fine-tuning
    evaluate_timeout: float = DEFAULT_TIMEOUT_S
    quality_tolerance: float = 0.01  # zero-shot / evaluate_cmd: how far below the original's quality, as a fraction
    storage: str | None = None  # an SQLAlchemy URL: evaluate in `workers` processes through an Optuna storage
    quantize: str | None = None  # the quantize step (e.g. "quantize{preset=cpu}"): candidates are scored as its int8 models

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise BadInputError(f"unknown --algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.trials < 1:
            raise BadInputError("--trials must be at least 1")
        if self.algorithm == "zero-shot" and self.evaluate_cmd is not None:
            raise BadInputError("--algorithm zero-shot scores candidates with its proxy, --evaluate-cmd with the command: give one")
        if self.workers is not None and self.workers < (0 if self.storage else 1):
            raise BadInputError(f"--workers must be at least 1 (0, waiting for `hwnas worker` processes, needs --storage), "
                                f"got {self.workers}")
        if not 0 <= self.quality_tolerance < 1:
            raise BadInputError(f"--quality-tolerance must be in [0, 1), got {self.quality_tolerance}")
        if self.retrain != isinstance(self.limits.fidelity, Retrain):
            raise BadInputError("candidates to retrain (zero-shot, --evaluate-cmd) are judged by quality (a Retrain "
                                f"policy), and only they; got {self.limits.fidelity.kind} for --algorithm {self.algorithm}")

    @property
    def retrain(self) -> bool:
        """The candidates will be trained: judged by quality, not drift (the limits' policy is Retrain)."""
        return self.algorithm == "zero-shot" or self.evaluate_cmd is not None


@dataclass
class SearchOutcome:
    space: SearchSpace
    trials: list[Trial]
    best: Trial
    baseline: Trial
    pipeline: str  # the full pipeline applied to the original (prefix included)
    wall_s: float
    limits: Limits  # the settings' limits, with the quality floor set from the original's score
    pareto: list[Trial] = field(default_factory=list)
    # where the time went: setup (prefix, space, reference outputs), search (evaluating and choosing), and
    # per evaluation phase summed over the candidates scored here (over all workers: CPU seconds)
    seconds: dict[str, float] = field(default_factory=dict)
    scored: int = 0  # candidates scored by this search (not read from its journal)
    depth_cache: dict[str, int] = field(default_factory=dict)  # lookups and hits of the depth-scaled graph cache
    fit_cache: dict[str, int] = field(default_factory=dict)  # lookups and hits of the fit cache (shared prefixes' refits)


def data_fingerprint(feeds: Mapping[str, np.ndarray] | None) -> str | None:
    """Identity of a set of input arrays (names, dtypes, shapes, bytes); None when there are none."""
    if feeds is None:
        return None
    digest = hashlib.sha256()
    for name in sorted(feeds):
        array = np.ascontiguousarray(feeds[name])
        digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def estimator_fingerprint(estimator: LatencyEstimator) -> str:
    """Identity of an estimator: its stored form (settings and every measurement it was fitted on)."""
    return hashlib.sha256(json.dumps(estimator.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def expert_candidate(space: SearchSpace) -> dict[str, str]:
    """The reference work's expert advice: regroup depthwise convs to the PF, pad channels to the PF."""
    pf = space.options.parallelism_factor
    candidate = space.baseline()
    for d in space.decisions:
        if d.kind == "align":
            candidate[d.key] = f"pad{pf}" if f"pad{pf}" in d.choices else KEEP
        elif d.kind == "dw":
            candidate[d.key] = next((c for c in (f"g{pf}", f"g{pf // 2}") if c in d.choices), KEEP)
    return candidate


def expert_seeds(space: SearchSpace, memory_limited: bool = False) -> list[dict[str, str]]:
    """The baseline, the alignment advice alone, then the full advice: on targets where regrouping
    depthwise convs hurts (ORT CPU runs depthwise natively) the first piece still pays on its own.

    Then, where the space knows them (`space.fastest`), the exact choices each estimated fastest alone,
    together: the advice as the target's estimate gives it, site by site (the expert recipe pads and
    regroups every site, also where that costs on the target).

    Where reconstructed passes are allowed, each depth choice on top of the fastest exact choices, or
    where the space knows none, of the full advice (the reference work's V1 on top of its expert recipe);
    under a memory limit also every multiplier alone: the latency advice adds parameters (regrouped convs
    hold zeros), and a random walk rarely finds a small multiplier with nothing else.
    """
    full = expert_candidate(space)
    align_only = {d.key: full[d.key] if d.kind == "align" else KEEP for d in space.decisions}
    fastest = {**space.baseline(), **space.fastest}
    seeds = [space.baseline(), align_only, full] + ([fastest] if space.fastest else [])
    for depth in (d for d in space.decisions if d.kind == "depth"):
        multipliers = [c for c in depth.choices if c != KEEP]
        seeds += [{**(fastest if space.fastest else full), depth.key: m} for m in multipliers]
        if memory_limited:
            seeds += [{**space.baseline(), depth.key: m} for m in multipliers]
    return [dict(c) for c in dict.fromkeys(tuple(sorted(c.items())) for c in seeds)]

Timed = tuple[Score, dict[str, float]]
_WORKER: CandidateEvaluator | None = None


def _init_worker(evaluator: CandidateEvaluator) -> None:
    global _WORKER  # one evaluator per worker process, set once by the pool initializer
    _WORKER = evaluator
    # one BLAS thread per worker: the pool has a worker per core already, and each worker's BLAS starting a
    # thread per core too (the least-squares Gram matrices and solves) oversubscribes the cores
    threadpool_limits(1)


def _evaluate_in_worker(pipeline: str) -> Timed:
    return _timed_with_cache_use(_WORKER, pipeline)


class PoolWorkers:
    """Worker processes scoring pipelines: `map` gives a batch's scores in order, `post` starts jobs ahead.

    Forked, each inherits the evaluator; a job is a pipeline (a string) and its result a score (small): no
    model crosses between processes. Jobs run in the order posted, each on the first free worker. The
    search posts its next batch before the current one is scored wherever the next cannot depend on the
    current scores (hwnas.search.algorithms.search), so a worker done early starts on it instead of
    waiting for the batch's slowest candidate. The workers share a temporary folder through which a
    depth-scaled graph or a fit one of them made is read by the others (CandidateEvaluator.share): each
    is made about once per search, not once per worker. Use within `stack`, which closes both.
    """

    def __init__(self, stack: contextlib.ExitStack, evaluator: CandidateEvaluator, workers: int):
        evaluator.share(stack.enter_context(tempfile.TemporaryDirectory(prefix="hwnas-workers-")))
        stack.callback(evaluator.share, None)  # the folder goes when the stack closes
        self._pool = stack.enter_context(multiprocessing.get_context("fork").Pool(workers, _init_worker, (evaluator,)))
        self._jobs: dict[str, AsyncResult] = {}

    def post(self, pipelines: Iterable[str]) -> None:
        """Start jobs for those of `pipelines` that have none."""
        for p in pipelines:
            if p not in self._jobs:
                self._jobs[p] = self._pool.apply_async(_evaluate_in_worker, (p,))

    def map(self, pipelines: list[str]) -> Iterator[Timed]:
        """The scores and seconds of `pipelines`, in order, each as soon as it is known."""
        self.post(pipelines)
        done: dict[str, Timed] = {}
        for p in pipelines:
            if p not in done:
                done[p] = self._jobs.pop(p).get()
            yield done[p]


def _timed_with_cache_use(evaluator: CandidateEvaluator, pipeline: str) -> tuple[Score, dict[str, float]]:
    """The score, the seconds per phase, and the depth and fit caches' lookups and hits it made (each process
    has its own caches: the search sums them)."""
    before = dict(evaluator.cache_use)
    score, seconds = evaluator.evaluate_timed(pipeline)
    return score, {**seconds, **{k: v - before[k] for k, v in evaluator.cache_use.items()}}


def _quality(settings: SearchSettings, shapes: Mapping[str, Shape]) -> Callable[[onnx.ModelProto], float] | None:
    if settings.algorithm == "zero-shot":
        return NaswotProxy(shapes, seed=settings.seed)
    if settings.evaluate_cmd is not None:
        return ExternalEvaluator(settings.evaluate_cmd, settings.evaluate_timeout)
    return None


def _quality_floor(original: Score, tolerance: float) -> float:
    """The original's quality less `tolerance` of its size: a candidate must stay about as good as it."""
    if original.error is not None or original.quality is None:
        raise CheckFailedError(f"cannot score the original model's quality: {original.error}")
    return original.quality - tolerance * abs(original.quality)


@dataclass(frozen=True)
class EvaluatorSpec:
    """What scores candidates exactly as the coordinator does, for a worker on another machine.

    Stored in the search's storage (hwnas.search.distributed) as plain data, never a pickle (whoever can
    write the database must not be able to run code in the workers through it): the model's ONNX bytes,
    the estimator's JSON and fitted arrays, the settings and input shapes as JSON, the calibration as an
    .npz read with allow_pickle=False. A worker needs only the storage's URL; for the same reason it runs
    a search's --evaluate-cmd only when its own command line names the same command.
    """

    model: onnx.ModelProto
    estimator: LatencyEstimator
    shapes: Mapping[str, Shape]
    settings: SearchSettings
    calibration: Mapping[str, np.ndarray] | None

    def to_blobs(self) -> dict[str, bytes]:
        estimator = self.estimator.to_dict()
        # where the coordinator keeps its journal and storage (a URL may hold a password) is not the workers' business
        settings = replace(self.settings, storage=None, journal=None, workers=None)
        search = {"settings": {**vars(settings), "limits": settings.limits.to_json()},
                  "shapes": {k: list(v) for k, v in self.shapes.items()}}
        blobs = {"version": HWNAS_VERSION.encode(), "model.onnx": self.model.SerializeToString(),
                 "estimator.json": json.dumps(estimator).encode(),
                 "estimator.npz": _npz_bytes(self.estimator.fitted_arrays(estimator)),
                 "search.json": json.dumps(search).encode()}
        if self.calibration is not None:
            blobs["calibration.npz"] = _npz_bytes(self.calibration)
        return blobs

    @classmethod
    def from_blobs(cls, blobs: Mapping[str, bytes], evaluate_cmd: str | None = None) -> EvaluatorSpec:
        """BadInputError when the worker runs another hwnas than the coordinator, the data is malformed, or
        the search scores with an --evaluate-cmd other than the worker's `evaluate_cmd`."""
        version = blobs.get("version", b"?").decode()
        if version != HWNAS_VERSION:
            raise BadInputError(f"the search runs hwnas {version}, this worker hwnas {HWNAS_VERSION}: install the same")
        try:
            search = json.loads(blobs["search.json"])
            settings = dict(search["settings"])
            limits = Limits.from_json(settings.pop("limits"))
            settings = SearchSettings(**settings, limits=limits)
            model = onnx.load_from_string(blobs["model.onnx"])
            estimator = LatencyEstimator.from_dict(json.loads(blobs["estimator.json"]), "the search's estimator",
                                                   _npz_arrays(blobs["estimator.npz"]))
            calibration = _npz_arrays(blobs["calibration.npz"]) if "calibration.npz" in blobs else None
            shapes = {k: tuple(v) for k, v in search["shapes"].items()}
        except (KeyError, TypeError, ValueError, DecodeError) as e:
            raise BadInputError(f"the search's data in the storage is malformed ({type(e).__name__}: {e})") from None
        if settings.evaluate_cmd is not None and settings.evaluate_cmd != evaluate_cmd:
            raise BadInputError(f"the search scores candidates with --evaluate-cmd {settings.evaluate_cmd!r}: start the "
                                "worker with the same --evaluate-cmd to run it on this machine")
        return cls(model, estimator, shapes, settings, calibration)

    def evaluator(self, shared: SharedBuilds | None = None) -> CandidateEvaluator:
        """The coordinator's evaluator; `shared`: where the workers share the graphs they built."""
        return prepare(self.model, self.estimator, self.shapes, self.settings, self.calibration, shared)[2]


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _npz_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:  # data, never code
        return {k: npz[k] for k in npz.files}


def prepare(original: onnx.ModelProto, estimator: LatencyEstimator, shapes: Mapping[str, Shape], settings: SearchSettings,
            calibration: Mapping[str, np.ndarray] | None, shared: SharedBuilds | None = None,
            ) -> tuple[gs.Graph, PassContext, CandidateEvaluator]:
    """The prepared graph (exact prefix applied), its pass context, and the evaluator that scores candidates on it."""
    # fits see the first samples, drift is judged on the held-back rest, as the final verification does
    split = split_calibration(calibration) if calibration else None
    ctx = PassContext(template=original, input_shapes=shapes, calibration=split.fit if split else None,
                      seed=settings.seed, fit_cache=FitCache())
    prepared = PassManager(parse_pipeline(PREFIX)).run(to_graph(original), ctx).graph
    base = to_model(prepared.copy(), original)
    limits = settings.limits
    judge = split.judge if split and isinstance(limits.fidelity, Drift) else None
    reference = run_per_sample(make_session(original), judge) if judge else None
    evaluator = CandidateEvaluator(base, prepared, ctx, estimator, reference, count_memory=_needs_memory(limits),
                                   quality=_quality(settings, shapes), fit_weights=settings.algorithm != "zero-shot",
                                   quantize=settings.quantize, judge_feeds=judge, fidelity=limits.fidelity, shared=shared)
    return prepared, ctx, evaluator


def _needs_memory(limits: Limits) -> bool:
    return any(x is not None for x in (limits.memory_budget, limits.max_params, limits.max_peak_act))


def _evaluate_many(board: StorageWorkers | None, pool: PoolWorkers | None,
                   ) -> tuple[Callable[[list[str]], Iterable[Timed]] | None, Callable[[list[str]], None] | None]:
    """How a batch is scored in parallel — storage workers (`board`), a process pool, or None (here, one by
    one) — and how the search posts its next batch ahead (`search`'s `post`)."""
    if board is not None:
        # timed in the workers only
        return (lambda pipelines: ((score, {}) for score in board.map(pipelines))), board.post
    if pool is not None:
        return pool.map, pool.post
    return None, None


def run_search(
    original: onnx.ModelProto,
    target: Target,
    estimator: LatencyEstimator,
    shapes: Mapping[str, Shape],
    settings: SearchSettings,
    calibration: Mapping[str, np.ndarray] | None = None,
    progress: Callable[[int, Trial], None] | None = None,
    job_status: Callable[[JobStatus], None] | None = None,
) -> SearchOutcome:
    """The search; with `settings.storage`, evaluated through it (`job_status` hears each batch's progress there)."""
    start = time.monotonic()
    # with --quantize the budget is the quantizer's (an int8 search with --max-drift keeps reconstructed passes out)
    allow_reconstructed = settings.limits.fidelity.changes_function and settings.quantize is None
    prepared, ctx, evaluator = prepare(original, estimator, shapes, settings, calibration)
    limits = settings.limits

    def latency(graph: gs.Graph) -> float:
        return estimator.estimate(to_model(graph.copy(), original), shapes).latency_ms

    needs_memory = _needs_memory(limits)
    journal = Journal(settings.journal, {
        "model": fingerprint(original), "target": target.name, "algorithm": settings.algorithm, "seed": settings.seed,
        "curated": settings.curated, "limits": settings.limits.to_json(), "shapes": {k: list(v) for k, v in shapes.items()},
        "evaluate_cmd": settings.evaluate_cmd, "quality_tolerance": settings.quality_tolerance,
        "quantize": settings.quantize,
        # the scores depend on both: a resume after changing either must score again, not reuse
        "estimator": estimator_fingerprint(estimator), "calibration": data_fingerprint(calibration),
    })
    workers = multiprocessing.cpu_count() if settings.workers is None else settings.workers
    # the original's quality sets the floor; it is scored first
    score_original = isinstance(limits.fidelity, Retrain) and limits.fidelity.floor is None
    spent: Counter[str] = Counter()  # seconds per evaluation phase summed over candidates (and workers); their count
    with contextlib.ExitStack() as stack:
        board = None
        if settings.storage:  # the study is named by the search's settings: the same command run again joins it (resume)
            # opened before the space is built: workers elsewhere build their evaluator meanwhile, and one
            # of them scores the original
            board = stack.enter_context(StorageWorkers(
                settings.storage, evaluator.evaluate, workers, "hwnas-" + hashlib.sha256(journal.header.encode()).hexdigest()[:16],
                EvaluatorSpec(original, estimator, shapes, settings, calibration).to_blobs(), status=job_status,
                share=functools.partial(setattr, evaluator, "shared")))
            # what the coordinator builds (the ranked depth choices) the workers read, local and elsewhere
            evaluator.shared = board.shared_builds()
            if score_original:
                board.post([p for p in [""] if p not in journal.scores])
        space = build_space(prepared, ctx, SpaceOptions(target.parallelism_factor, settings.curated, allow_reconstructed,
                                                        quantized=settings.quantize is not None), latency=latency)
        # forked once the space is built: the setup's depth ranking runs on it too
        pool = PoolWorkers(stack, evaluator, workers) if board is None and workers > 1 else None
        if isinstance(limits.fidelity, Drift) and evaluator.judge_feeds is not None:  # depth per group, ranked by latency per drift
            score_all = ((lambda pipelines: [score for score, _ in pool.map(pipelines)]) if pool
                         else (lambda pipelines: [evaluator.evaluate(p) for p in pipelines]))
            add_ranked_depth(space, prepared, ctx, score_all, limits.fidelity.max, latency)
        setup_s = time.monotonic() - start
        evaluate_many, post_ahead = _evaluate_many(board, pool)

        def score_batch(pipelines: list[str]) -> Iterator[Score]:
            """Scores in order, each as soon as it is known (the search may stop consuming mid-batch)."""
            todo = list(dict.fromkeys(p for p in pipelines if p not in journal.scores))
            # with workers every job goes to them: a storage's coordinator may have none of its own, and a pool's
            # may be scoring it already (posted ahead)
            fresh = zip(todo, evaluate_many(todo) if evaluate_many and todo
                        else (_timed_with_cache_use(evaluator, p) for p in todo))
            for pipeline in pipelines:
                if pipeline not in journal.scores:  # the next one of `todo`: same order
                    done, (score, seconds) = next(fresh)
                    journal.record(done, score)
                    spent.update(seconds)
                    spent["candidates"] += 1
                yield journal.scores[pipeline]

        def post(pipelines: list[str]) -> None:
            """Jobs for the workers ahead of the batch that scores them, but none for journaled scores."""
            post_ahead([p for p in pipelines if p not in journal.scores])

        seeds = expert_seeds(space, memory_limited=needs_memory)
        if score_original:
            if post_ahead:  # the other workers start on the search's first batch while one scores the original
                first = first_candidates(space, settings.algorithm, seeds, settings.seed)[:min(BATCH, settings.trials)]
                post(["", *(space.compile(c) for c in first)])
            original_score = next(score_batch([""]))
            limits = replace(limits, fidelity=limits.fidelity.with_floor(
                _quality_floor(original_score, settings.quality_tolerance)))
        # the default batch, not one per core: a seed must give the same search on any machine (resume elsewhere)
        trials = search(space, score_batch, settings.algorithm, settings.trials, limits, settings.seed,
                        seeds, settings.time_budget, progress=progress, post=post if post_ahead else None)
    baseline = next(t for t in trials if t.pipeline == "")
    ranked = sorted(trials, key=rank_key(limits))
    wall = time.monotonic() - start
    seconds = {"setup": setup_s, "search": wall - setup_s, **{f"candidates_{k}": spent[k] for k in PHASES}}
    return SearchOutcome(space, trials, ranked[0], baseline, full_pipeline(ranked[0].pipeline), wall,
                         limits, pareto_front(trials, limits), seconds, int(spent["candidates"]),
                         {k: int(spent[k]) for k in ("depth_cache_lookups", "depth_cache_hits", "depth_cache_shared_hits")},
                         {k: int(spent[k]) for k in ("fit_cache_lookups", "fit_cache_hits", "fit_cache_shared_hits")})


def ranked_pipelines(outcome: SearchOutcome, limits: Limits) -> list[Trial]:
    """Feasible trials, best first, one per distinct pipeline: the order in which winners are verified."""
    seen, ordered = set(), []
    for t in sorted(outcome.trials, key=rank_key(limits)):
        if t.pipeline not in seen and limits.feasible(t.score):
            seen.add(t.pipeline)
            ordered.append(t)
    return ordered


def no_feasible_message(outcome: SearchOutcome, limits: Limits) -> str:
    """By how much the best candidate misses each limit."""
    best = outcome.best.score
    misses = []
    if isinstance(limits.fidelity, Drift) and best.drift > limits.fidelity.max:
        misses.append(f"drift {best.drift:.4g} > {limits.fidelity.max:g}")
    if (floor := limits.fidelity.quality_floor) is not None and (best.quality is None or best.quality < floor):
        misses.append(f"quality {best.quality} < floor {floor:.6g}")
    for name, value, limit in (("params + peak activations", best.memory_bytes, limits.memory_budget),
                               ("params", best.params_bytes, limits.max_params),
                               ("peak activations", best.peak_activation_bytes, limits.max_peak_act)):
        if limit is not None and value > limit:
            misses.append(f"{name} {value:,} bytes > budget {limit:,} (over by {value - limit:,} bytes, {(value - limit) / limit:.1%})")
    return "no candidate meets the limits; the closest: " + "; ".join(misses or ["(could not be built)"])


@dataclass(frozen=True)
class PassErrors:
    count: int  # distinct pipelines a pass failed on
    first: list[str]  # the first few, with their error


def pass_errors(trials: list[Trial], shown: int = 3) -> PassErrors:
    """The candidates a pass failed on with a ValueError/RuntimeError (a bug, not a reasoned refusal):
    how many distinct pipelines, and the first few with their error, so that a search never hides them."""
    failed = {t.pipeline: t.score.error for t in trials if t.score.pass_error}
    return PassErrors(len(failed), [f"{p or '(prefix only)'}: {e}" for p, e in list(failed.items())[:shown]])


def verify_in_order(candidates: list[Trial], check: Callable[[str], object]) -> tuple[Trial, object]:
    """The first candidate whose full pipeline passes `check` (ORT verification), and its result."""
    failures = []
    for trial in candidates:
        try:
            return trial, check(full_pipeline(trial.pipeline))
        except CheckFailedError as e:
            failures.append(f"{trial.pipeline or '(prefix only)'}: {e}")
    raise CheckFailedError("no candidate passed verification: " + " | ".join(failures[:3]))

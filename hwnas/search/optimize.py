"""`optimize`: prepare the model, build the space, search, apply the winner, verify it, report.

1. The exact prefix (fold-bn, fold-affine, fold-constants) runs once; candidates start from its graph.
2. The space is built from that graph and the target's parallelism factor (curated by default).
3. Seed candidates — the baseline and the expert recipe (every depthwise conv regrouped with PF
   channels per group, every channel group padded to a multiple of PF) — go in first; then the
   algorithm runs for `trials` evaluations (or `time_budget` seconds), scored by the target's estimator,
   in parallel worker processes, every score journaled.
4. The best feasible candidate (fastest within the drift and memory limits) is applied to the original
   model and verified with ONNX Runtime: equivalence for exact pipelines, drift against the budget for
   reconstructed ones. If the winner fails, the next best is tried: nothing unverified is returned.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from hwnas.errors import BadInputError, CheckFailedError
from hwnas.estimator.estimator import LatencyEstimator
from hwnas.graph.gsgraph import to_graph, to_model
from hwnas.graph.shapes import Shape
from hwnas.passes.base import PassContext
from hwnas.passes.manager import PassManager
from hwnas.passes.pipeline import parse_pipeline
from hwnas.search.algorithms import ALGORITHMS, Limits, Trial, pareto_front, rank_key, search
from hwnas.search.evaluate import CandidateEvaluator, Journal, Score
from hwnas.search.recipe import full_pipeline
from hwnas.search.space import KEEP, PREFIX, SearchSpace, SpaceOptions, build_space
from hwnas.targets.base import Target
from hwnas.verify.runtime import make_session, run_per_sample


@dataclass(frozen=True)
class SearchSettings:
    algorithm: str = "evolution"
    trials: int = 200
    time_budget: float | None = None
    seed: int = 0
    curated: bool = True
    workers: int = 0  # 0: one per CPU core
    limits: Limits = Limits()
    journal: str | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise BadInputError(f"unknown --algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.trials < 1:
            raise BadInputError("--trials must be at least 1")


@dataclass
class SearchOutcome:
    space: SearchSpace
    trials: list[Trial]
    best: Trial
    baseline: Trial
    pipeline: str  # the full pipeline applied to the original (prefix included)
    wall_s: float
    pareto: list[Trial] = field(default_factory=list)


def fingerprint(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()[:16]


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


_WORKER: CandidateEvaluator | None = None


def _init_worker(evaluator: CandidateEvaluator) -> None:
    global _WORKER  # one evaluator per worker process, set once by the pool initializer
    _WORKER = evaluator


def _evaluate_in_worker(pipeline: str) -> Score:
    return _WORKER.evaluate(pipeline)


def run_search(
    original: onnx.ModelProto,
    target: Target,
    estimator: LatencyEstimator,
    shapes: Mapping[str, Shape],
    settings: SearchSettings,
    calibration: Mapping[str, np.ndarray] | None = None,
    progress: Callable[[int, Trial], None] | None = None,
) -> SearchOutcome:
    start = time.monotonic()
    allow_reconstructed = settings.limits.max_drift > 0
    ctx = PassContext(template=original, input_shapes=shapes, calibration=calibration, seed=settings.seed)
    prepared = PassManager(parse_pipeline(PREFIX)).run(to_graph(original), ctx).graph
    base = to_model(prepared.copy(), original)
    space = build_space(prepared, ctx, SpaceOptions(target.parallelism_factor, settings.curated, allow_reconstructed))
    reference = run_per_sample(make_session(original), calibration) if allow_reconstructed and calibration else None
    limits = settings.limits
    needs_memory = any(x is not None for x in (limits.memory_budget, limits.max_params, limits.max_peak_act))
    evaluator = CandidateEvaluator(base, prepared, ctx, estimator, reference, count_memory=needs_memory)
    journal = Journal(settings.journal, {
        "model": fingerprint(original), "target": target.name, "algorithm": settings.algorithm, "seed": settings.seed,
        "curated": settings.curated, "limits": vars(settings.limits), "shapes": {k: list(v) for k, v in shapes.items()},
    })
    workers = settings.workers or multiprocessing.cpu_count()
    pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (evaluator,)) if workers > 1 else None

    def score_batch(pipelines: list[str]) -> list[Score]:
        todo = list(dict.fromkeys(p for p in pipelines if p not in journal.scores))
        fresh = pool.map(_evaluate_in_worker, todo) if pool and len(todo) > 1 else [evaluator.evaluate(p) for p in todo]
        for pipeline, score in zip(todo, fresh):
            journal.record(pipeline, score)
        return [journal.scores[p] for p in pipelines]

    try:
        seeds = [space.baseline(), expert_candidate(space)]
        trials = search(space, score_batch, settings.algorithm, settings.trials, settings.limits, settings.seed,
                        seeds, settings.time_budget, batch_size=max(8, 2 * workers), progress=progress)
    finally:
        if pool:
            pool.terminate()
    baseline = next(t for t in trials if t.pipeline == "")
    ranked = sorted(trials, key=rank_key(settings.limits))
    return SearchOutcome(space, trials, ranked[0], baseline, full_pipeline(ranked[0].pipeline), time.monotonic() - start,
                         pareto_front(trials))


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
    if limits.max_drift > 0 and best.drift > limits.max_drift:
        misses.append(f"drift {best.drift:.4g} > {limits.max_drift:g}")
    for name, value, limit in (("params + peak activations", best.memory_bytes, limits.memory_budget),
                               ("params", best.params_bytes, limits.max_params),
                               ("peak activations", best.peak_activation_bytes, limits.max_peak_act)):
        if limit is not None and value > limit:
            misses.append(f"{name} {value:,} bytes > budget {limit:,} (over by {value - limit:,} bytes, {(value - limit) / limit:.1%})")
    return "no candidate meets the limits; the closest: " + "; ".join(misses or ["(could not be built)"])


def verify_in_order(candidates: list[Trial], check: Callable[[str], object]) -> tuple[Trial, object]:
    """The first candidate whose full pipeline passes `check` (ORT verification), and its result."""
    failures = []
    for trial in candidates:
        try:
            return trial, check(full_pipeline(trial.pipeline))
        except CheckFailedError as e:
            failures.append(f"{trial.pipeline or '(prefix only)'}: {e}")
    raise CheckFailedError("no candidate passed verification: " + " | ".join(failures[:3]))

"""The Python API: what the CLI calls, and what export scripts and CI jobs call directly.

Every function takes a path or an `onnx.ModelProto`, returns a small typed result, never prints and
never exits. Errors are `hwnas.errors.BadInputError` (bad input) and `CheckFailedError` (a check
failed); the CLI maps them to exit codes 2 and 1.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx

from hwnas.advice import Hint
from hwnas.advice import hints as advise
from hwnas.errors import BadInputError, CheckFailedError
from hwnas.estimator.defaults import estimator_for, machine_warnings
from hwnas.estimator.estimate import EstimateResult, estimate
from hwnas.estimator.estimator import LatencyEstimator
from hwnas.gate import Budgets, CheckResult
from hwnas.gate import check as check_budgets
from hwnas.graph.gsgraph import to_graph, to_model
from hwnas.graph.io import ModelLike, as_model
from hwnas.graph.shapes import Shape, resolve_input_shapes
from hwnas.graph.summary import ModelSummary, summarize
from hwnas.passes.base import Exactness, PassContext
from hwnas.passes.manager import PassManager, PassRecord
from hwnas.passes.pipeline import Pipeline, parse_pipeline
from hwnas.passes.quantize import quantize_model
from hwnas.targets import Target, get_target
from hwnas.verify import Tolerance, VerificationReport, measure_fidelity, verify_equivalence
from hwnas.verify.fidelity import FidelityReport
from hwnas.verify.calibration import CalibrationSplit, held_out_feeds, split_calibration
from hwnas.verify.policy import Drift, Exact, Fidelity, Retrain, Verdict

if TYPE_CHECKING:  # the search (Optuna), the quantizer and profiling load on first use: `import hwnas` stays light
    from hwnas.estimator.around import AroundReport
    from hwnas.estimator.profile import ProfileReport
    from hwnas.passes.quantize import QuantSettings
    from hwnas.search.algorithms import Trial
    from hwnas.search.optimize import PassErrors, SearchOutcome, SearchSettings
    from hwnas.targets.qnn_htp import DeployCheck


@dataclass
class RunResult:
    """What `run` produced: the model (None for a dry run), what each pass did, and the verdict."""

    model: onnx.ModelProto | None
    pipeline: str
    exactness: Exactness
    records: list[PassRecord]
    input_shapes: dict[str, Shape]
    baseline: ModelSummary
    optimized: ModelSummary
    verification: VerificationReport | None
    warnings: list[str] = field(default_factory=list)
    verdict: Verdict | None = None  # the policy's verdict on `verification` (hwnas.verify.policy)
    # a result that is not exact: its drift against the original on the held-back calibration samples
    # and, when given, on held-out inputs ("calibration", "holdout"), every sample and output
    drift: dict[str, FidelityReport] = field(default_factory=dict)
    calibration_split: CalibrationSplit | None = None  # which calibration samples fitted, which judged

    @property
    def verified(self) -> bool:
        """ONNX Runtime checked the result's function: equivalent (exact results) or within the drift budget
        (`run` raises when it is not). Not for a Retrain policy, which only checks that ORT runs the model."""
        return self.verdict is not None and self.verdict.ok and self.verdict.function_checked

    def to_dict(self) -> dict:
        return {
            "pipeline": self.pipeline,
            "exact": self.exactness is Exactness.EXACT,
            "exactness": self.exactness.value,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "baseline": self.baseline.to_dict(),
            "optimized": self.optimized.to_dict(),
            "passes": [r.to_dict() for r in self.records],
            "verification": self.verification.to_dict() if self.verification else None,
            "verified": self.verified,
            "drift": {k: {"samples": v.samples, **v.to_dict()} for k, v in self.drift.items()},
            "calibration_split": self.calibration_split.to_dict() if self.calibration_split else None,
            "warnings": self.warnings,
        }


def run(
    model: ModelLike,
    pipeline: str | Pipeline,
    *,
    input_shapes: Mapping[str, Shape] | None = None,
    calibration: Mapping[str, np.ndarray] | None = None,
    holdout: Mapping[str, np.ndarray] | None = None,
    tolerance: Tolerance = Tolerance(),
    allow_drift: float | None = None,
    fidelity: Fidelity | None = None,
    disabled: Iterable[str] = (),
    verify: bool = True,
    verify_each: bool = False,
    dry_run: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    strict_sites: bool = True,
) -> RunResult:
    """Apply a pipeline and check the result with ONNX Runtime.

    `fidelity` (hwnas.verify.policy) judges a result that is not exact: `Drift(X)` keeps every output's
    cosine ≥ 1 − X on every held-back sample, `Retrain()` only needs ORT to run it; `allow_drift=X` is
    short for `fidelity=Drift(X)`. With neither (`Exact(tolerance)`) a pipeline that changes the function
    is a BadInputError. An exact result, and each exact step of a pipeline that also changes the function,
    is judged Exact at the tolerance whatever the policy. A failed verdict is a CheckFailedError naming
    the first pass that broke the model. With `verify=False` the model is returned unchecked and a
    warning says so. A `sites=` selector that picks nothing is a BadInputError unless
    `strict_sites=False` (pipelines the search compiled, recipes).

    A result that is not exact (reconstructed, or lossy: quantized) is never reported equivalent; its
    `drift` is measured and the budget judged on the calibration samples the fits did not use: the last
    quarter (at least one) is held back from least-squares fits and quantizer ranges (`split_calibration`;
    with a single sample it is both). When `holdout` inputs are given, drift is measured on those too
    (cosine, max abs, top-1 agreement for class scores). Exact results are checked on every sample.
    """
    if fidelity is not None and allow_drift is not None:
        raise BadInputError("give the fidelity policy or allow_drift (short for Drift(allow_drift)), not both")
    policy = fidelity if fidelity is not None else Drift(allow_drift) if allow_drift is not None else Exact(tolerance)
    exact_policy = policy if isinstance(policy, Exact) else Exact(tolerance)
    original = as_model(model)
    pipe = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    shapes = resolve_input_shapes(original, input_shapes)
    split = split_calibration(calibration) if calibration is not None else None
    ctx = PassContext(template=original, input_shapes=shapes, calibration=split.fit if split else None, seed=seed,
                      dry_run=dry_run)
    baseline = summarize(original, shapes)

    def check(candidate: onnx.ModelProto, exact: bool) -> VerificationReport:
        # exact rewrites must hold at every size the original accepts, on every sample; drift is judged on
        # the held-back calibration samples only (random inputs at other sizes say nothing about a fitted
        # model's fidelity, and the fitted samples flatter it)
        feeds = calibration if exact or split is None else split.judge
        return verify_equivalence(original, candidate, shapes, feeds, exact_policy.tolerance, seed,
                                  check_other_sizes=exact)

    def step_verifier(before, after, exactness: Exactness) -> Verdict:
        if exactness is Exactness.EXACT:
            # an exact step keeps the function of the graph it was given, at the tolerance, even after a
            # reconstructed step changed the function: a drift budget must not absorb a broken exact pass
            report = verify_equivalence(to_model(before, original), to_model(after.copy(), original), shapes,
                                        calibration, exact_policy.tolerance, seed, check_other_sizes=True)
            return exact_policy.judge(report)
        return policy.judge(check(to_model(after.copy(), original), exact=False))

    classes = {spec.instantiate().exactness for spec in pipe.without(set(disabled)).steps}
    mixed = Exactness.EXACT in classes and len(classes) > 1
    # in place: the graph is this call's own, dropped if a pass raises (a copy per pass doubled a long
    # chain's pass time)
    manager = PassManager(pipe, set(disabled), step_verifier if (verify_each or mixed) and verify else None,
                          in_place=True, strict_sites=strict_sites)
    pipeline_run = manager.run(to_graph(original), ctx, progress)
    candidate = to_model(pipeline_run.graph, original)
    exactness = pipeline_run.exactness
    result = RunResult(
        model=None if dry_run else candidate,
        pipeline=str(manager.pipeline),
        exactness=exactness,
        records=pipeline_run.records,
        input_shapes=shapes,
        baseline=baseline,
        optimized=summarize(candidate, shapes),
        verification=None,
        warnings=list(ctx.warnings),
    )
    if dry_run:
        return result
    if exactness is not Exactness.EXACT and isinstance(policy, Exact):  # with --no-verify too: a changed function needs a budget
        raise BadInputError(
            f"pipeline is {exactness.value} (it changes the function); give --allow-drift X to accept output "
            "cosine >= 1 - X"
        )
    if not verify:
        result.warnings.append("not verified (--no-verify): the output was not checked with ONNX Runtime")
        return result
    try:
        report = check(candidate, exact=exactness is Exactness.EXACT)
    except CheckFailedError as e:
        raise CheckFailedError(f"{e}; use --no-verify to write the model unchecked") from None
    result.verification = report
    if exactness is not Exactness.EXACT:
        report.equivalent = False  # whatever the tolerance says: the function was changed on purpose
        report.notes.append(f"a {exactness.value} result is judged by its drift, never reported equivalent")
        feeds = split.judge if split is not None else held_out_feeds(original, shapes, seed)
        result.drift["calibration"] = measure_fidelity(original, candidate, feeds)
        result.calibration_split = split
        if holdout is not None:
            result.drift["holdout"] = measure_fidelity(original, candidate, holdout)
    result.verdict = (exact_policy if exactness is Exactness.EXACT else policy).judge(report)
    if not result.verdict.ok:
        if not verify_each:
            # run again, verifying after every pass, to name the first pass that broke the model
            run(original, pipe, input_shapes=shapes, calibration=calibration, fidelity=policy, tolerance=tolerance,
                disabled=disabled, verify_each=True, seed=seed, strict_sites=strict_sites)
        raise CheckFailedError(f"verification failed: {result.verdict.detail}")
    return result


def hints(
    model: ModelLike,
    target: str | Target = "npu-32x32",
    *,
    input_shapes: Mapping[str, Shape] | None = None,
    estimator: str | os.PathLike | LatencyEstimator | None = None,
) -> list[Hint]:
    """Per-layer advice from the target's estimator: each single rewrite that pays, its step and saving (ms)."""
    original = as_model(model)
    the_target = get_target(target) if isinstance(target, str) else target
    latency_model = estimator if isinstance(estimator, LatencyEstimator) else estimator_for(the_target, estimator)
    return advise(original, the_target, resolve_input_shapes(original, input_shapes), latency_model)


def profile(
    target: str | Target,
    budget: int = 2000,
    *,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    int8: bool = False,
    quiet_gate: bool = True,
) -> tuple[LatencyEstimator, ProfileReport]:
    """Measure `budget` sampled kernels on the target (adaptive sampling) and fit its estimator.

    `int8=True`: every second profiling network is quantized (`profiling_quantizer`; cpu-like targets that
    time kernels in context), so the estimator learns int8 kernels (DQ → Conv → Q, ORT's QLinearConv).
    `quiet_gate` (targets timed in context): wait out a neighbour's burst before and after each profiling
    network (`hwnas.estimator.quiet`); off, a profile taken on a noisy VM can come out ~20 % slow throughout."""
    from hwnas.estimator.profile import default_mode, profile_target

    if budget < 10:
        raise BadInputError("profile: --budget must be at least 10 measurements")
    the_target = get_target(target) if isinstance(target, str) else target
    if int8 and default_mode(the_target) != "context":
        raise BadInputError(f"profile: --int8 needs a target whose kernels are timed inside networks (cpu, ort:CPU...); "
                            f"{the_target.name} is not one")
    return profile_target(the_target, budget, seed=seed, progress=progress, quantize=profiling_quantizer() if int8 else None,
                          quiet_gate=quiet_gate and default_mode(the_target) == "context")


def profiling_quantizer(multiple: int = 16) -> Callable[[onnx.ModelProto, Mapping[str, np.ndarray]], onnx.ModelProto]:
    """What quantizes int8 profiling networks: the quantize pass (cpu preset), every second call after
    `align-channels{multiple=16,mode=pad}` (verified exact), as `optimize --quantize int8` aligns before it
    quantizes. Profiled without it (2026-12-05), 24 of 524 int8 convs had both channel counts a multiple
    of 16, and the aligned zoo models' int8 convs were overestimated ~1.4x."""
    calls = itertools.count()

    def quantize(model: onnx.ModelProto, calibration: Mapping[str, np.ndarray]) -> onnx.ModelProto:
        if next(calls) % 2 == 0 and model.graph.node:  # a random network may have no node: nothing to align
            model = run(model, f"align-channels{{multiple={multiple},mode=pad}}").model
        return quantize_model(model, calibration)

    return quantize


def profile_around(
    target: str | Target,
    model: ModelLike,
    budget: int = 200,
    *,
    estimator: str | os.PathLike | LatencyEstimator | None = None,
    input_shapes: Mapping[str, Shape] | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    quiet_gate: bool = True,
) -> tuple[LatencyEstimator, AroundReport]:
    """The target's estimator (default: the shipped one) refitted with `model`'s own kernels timed in context (a
    measured target) and `budget` measurements shaped like its kernels outside the profiled distribution or
    estimated far from their time in it (hwnas.estimator.around). `quiet_gate`: as for `profile`."""
    from hwnas.estimator.around import profile_around as around_model

    if budget < 1:
        raise BadInputError("profile: --budget must be at least 1 measurement")
    the_target = get_target(target) if isinstance(target, str) else target
    the_model = as_model(model)
    base = estimator_for(the_target, estimator)
    # an int8 kernel's neighbours are quantized as the profile's int8 networks are (cpu preset), not aligned first
    return around_model(the_target, base, the_model, resolve_input_shapes(the_model, input_shapes), budget, seed=seed,
                        progress=progress, quiet_gate=quiet_gate, quantize=quantize_model)


def check(
    model: ModelLike,
    target: str | Target = "npu-32x32",
    *,
    max_latency_ms: float | None = None,
    max_params: int | str | None = None,
    max_peak_act: int | str | None = None,
    require_multiple: int | None = None,
    baseline: ModelLike | None = None,
    max_regression_pct: float | None = None,
    input_shapes: Mapping[str, Shape] | None = None,
    estimator: str | os.PathLike | LatencyEstimator | None = None,
    require_npu: bool = False,
    max_drift: float | None = None,
    reference: ModelLike | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
    feeds_label: str = "calibration",
) -> CheckResult:
    """Check a model against deployment budgets on a target (see hwnas.gate): one CheckItem per budget given.

    On `qnn-htp`, `require_npu` and `max_drift` compile the model with Qualcomm's backend (needs
    onnxruntime-qnn) and measure the NPU's drift against `reference` on `feeds` (hwnas.targets.qnn_htp).

    A failed budget is `result.passed == False`, not an exception (the CLI exits 1); bad input raises
    BadInputError. Sizes are bytes or text with a unit ("512KB", "3.5MiB").
    """
    budgets = Budgets(max_latency_ms, max_params, max_peak_act, require_multiple, baseline, max_regression_pct,
                      require_npu, max_drift, reference)
    return check_budgets(model, target, budgets, input_shapes, estimator, feeds, feeds_label)


@dataclass(frozen=True)
class SearchSummary:
    """How the search went (the report's "search" object)."""

    algorithm: str
    space: str
    seed: int
    trials: int
    candidates_evaluated: int
    distinct_candidates: int
    candidates_scored: int  # by this run (not read from its journal)
    depth_cache: dict[str, int]
    fit_cache: dict[str, int]  # lookups and hits of the Fused-MBConv fit cache
    pass_errors: PassErrors
    decisions: int
    space_size: int
    wall_s: float
    seconds: dict[str, float]  # per phase (setup, search, candidates_*, verify_chosen)
    best_so_far: list[float]
    quality: QualitySummary | None  # models to retrain: the original's quality, the floor, the chosen one's
    storage: str | None
    expert_seed_latency_ms: float | None

    def to_dict(self) -> dict:
        return {**vars(self), "pass_errors": asdict(self.pass_errors),
                "quality": None if self.quality is None else asdict(self.quality)}


@dataclass(frozen=True)
class QualitySummary:
    kind: str  # "naswot" (zero-shot) or "evaluate-cmd"
    original: float | None
    floor: float
    chosen: float | None


@dataclass(frozen=True)
class ParetoPoint:
    latency_ms: float
    drift: float
    quality: float | None
    memory_bytes: int
    pipeline: str
    chosen: bool


@dataclass(frozen=True)
class Quantization:
    """How the written int8 model was quantized."""

    preset: str
    settings: QuantSettings
    float_input_side: float  # the share of the graph kept float to meet the drift budget
    latency_scored_as: str = "the int8 graph"

    def to_dict(self) -> dict:
        return {"preset": self.preset, **vars(self.settings), "latency_scored_as": self.latency_scored_as,
                "float_input_side": self.float_input_side}


@dataclass
class DeploySummary:
    """The deploy check of the chosen model, and the candidates it turned down (pipeline, reason)."""

    target: str
    chosen: DeployCheck | None = None
    note: str = ""
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        rejected = {"rejected": [{"pipeline": p, "reason": r} for p, r in self.rejected]} if self.rejected else {}
        return {"target": self.target, **rejected, "chosen": self.chosen.to_dict() if self.chosen else None,
                "note": self.note}


@dataclass
class OptimizeReport:
    """What `optimize` chose and wrote: the verified model, how it was found and judged. `to_dict()` is the
    JSON report (docs/report-schema.md), the same keys the CLI prints and writes."""

    model: onnx.ModelProto
    run: RunResult  # the chosen pipeline applied to the input and verified
    target: Target
    fidelity: Fidelity  # the policy the search and the verification held the model to
    baseline: EstimateResult
    optimized: EstimateResult
    recipe: dict
    search: SearchSummary
    pareto: list[ParetoPoint]
    measured: dict[str, float] | None  # measured targets: A/B latency (input, optimized, input_quantized)
    holdout: FidelityReport | None  # drift on the held-out inputs, when given
    quantization: Quantization | None
    deploy_check: DeploySummary | None
    warnings: list[str]

    @property
    def latency_reduction(self) -> float:
        before, after = self.baseline.latency_ms, self.optimized.latency_ms
        return 1 - after / before if before else 0.0

    @property
    def pipeline(self) -> str:
        return self.run.pipeline

    @property
    def exact(self) -> bool:
        return self.run.exactness is Exactness.EXACT

    @property
    def verification(self) -> VerificationReport | None:
        return self.run.verification

    @property
    def verified(self) -> bool:
        # a model to retrain was allowed any function: ORT ran it, but nothing about its outputs was checked
        return self.run.verified

    @property
    def precision(self) -> str:
        return "int8" if self.quantization else "float"

    def to_dict(self) -> dict:
        run_dict = self.run.to_dict()
        return {
            "target": self.target.name,
            "target_config": self.target.describe(),
            "baseline": {**self.run.baseline.to_dict(), **self.baseline.to_dict()},
            "optimized": {**self.run.optimized.to_dict(), **self.optimized.to_dict()},
            "latency_reduction": self.latency_reduction,
            "pipeline": self.pipeline,
            "exact": self.exact,
            "verification": run_dict["verification"],
            "verified": self.verified,
            "measured": self.measured,
            "holdout": None if self.holdout is None else {"samples": self.holdout.samples, **self.holdout.to_dict()},
            "precision": self.precision,
            "quantization": self.quantization.to_dict() if self.quantization else None,
            "drift": run_dict["drift"],
            "calibration_split": run_dict["calibration_split"],
            "deploy_check": self.deploy_check.to_dict() if self.deploy_check else None,
            "search": self.search.to_dict(),
            "pareto": [asdict(p) for p in self.pareto],
            "recipe": self.recipe,
            "passes": run_dict["passes"],
            "warnings": self.warnings,
        }


@dataclass
class _Plan:
    """`optimize`'s arguments checked and resolved: what the search and the verification run with."""

    original: onnx.ModelProto
    target: Target
    shapes: dict[str, Shape]
    estimator: LatencyEstimator
    settings: SearchSettings
    calibration: Mapping[str, np.ndarray] | None
    quantize_spec: str | None  # the quantize step every candidate ends with, or None
    quantization: tuple[str, QuantSettings] | None  # its preset and settings
    deploy_check: str | None
    warnings: list[str]

    @property
    def fidelity(self) -> Fidelity:
        return self.settings.limits.fidelity


@dataclass
class _Selection:
    """The candidate that passed verification (and the A/B and deploy checks), and what they measured."""

    chosen: Trial
    run: RunResult
    measured: dict[str, float]
    deploy: DeploySummary | None
    verify_s: float


def optimize(
    model: ModelLike,
    target: str | Target = "npu-32x32",
    *,
    exact: bool | None = None,
    max_drift: float | None = None,
    calibration: Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, Shape] | None = None,
    algorithm: str = "evolution",
    space: str = "curated",
    trials: int = 200,
    time_budget: float | None = None,
    seed: int = 0,
    workers: int | None = None,
    memory_budget: int | None = None,
    max_params: int | None = None,
    max_peak_act: int | None = None,
    estimator: str | os.PathLike | LatencyEstimator | None = None,
    journal: str | os.PathLike | None = None,
    verify: bool = True,
    progress: Callable[[int, object], None] | None = None,
    evaluate_cmd: str | None = None,
    evaluate_timeout: float = 3600.0,
    quality_tolerance: float = 0.01,
    storage: str | None = None,
    holdout: Mapping[str, np.ndarray] | None = None,
    quantize: str | None = None,
    quantize_preset: str | None = None,
    deploy_check: str | None = None,
    job_status: Callable[[object], None] | None = None,
) -> OptimizeReport:
    """Search sequences of passes for the fastest model on `target` within the limits, verify it, report.

    Three stages: `_prepare` checks the arguments and resolves them into the search's settings and one
    fidelity policy (hwnas.verify.policy), `run_search` searches, `_select_and_verify` verifies the best
    feasible candidates in order until one passes; the `OptimizeReport` (`.to_dict()`: the JSON report)
    says what was chosen and how.

    Exact passes only unless `max_drift=X` is given: that allows reconstructed ones while the output
    cosine on the calibration inputs stays >= 1 - X (random inputs, with a warning, if none are given).
    `exact=True` says so explicitly and then refuses `max_drift`; `exact=False` needs it. Memory limits
    are bytes. `journal` keeps every score so that an interrupted search resumes.

    For models that will be trained after the search, `algorithm="zero-shot"` scores candidates with the
    NASWOT trainability proxy and `evaluate_cmd="CMD {model}"` with the command's score (higher is
    better, e.g. accuracy after fine-tuning); reconstructed passes are then allowed, drift is not judged,
    and a candidate's score may fall at most `quality_tolerance` of the original's below it.

    `workers`: evaluation processes (None: one per core). `storage` (an SQLAlchemy URL, e.g.
    "sqlite:///search.db", "postgresql://host/db") evaluates through it, in `workers` local processes
    and any `hwnas worker` (`work`) joined from elsewhere; `workers=0` starts none and waits for those.
    `job_status` hears each batch's progress there (hwnas.search.distributed.JobStatus).

    `holdout`: inputs the search never saw (one array per input, samples first); the report's "holdout"
    gives the chosen model's drift on them (cosine, top-1 agreement), the figure to trust over the
    calibration drift the search was judged by.

    `quantize="int8"` (needs `max_drift`): every candidate is scored as the int8 model it becomes (ONNX
    Runtime's quantizer with `quantize_preset`: cpu, qnn or npu, by default the target's; drift of the
    quantized candidate against the float input), the search may add `equalize`, and the winner is written
    quantized and verified. On a measured target it must not be more than 3 % slower than the input
    quantized alone (measured interleaved). Reconstructed passes stay out: the budget is the quantizer's.

    `deploy_check="qnn-htp"` (with `quantize="int8"`; preset qnn by default): each candidate in the
    verification order is also compiled by Qualcomm's HTP backend (hwnas.targets.qnn_htp) at the
    analysis input shapes; one that does not compile with every node on the NPU is never chosen, the
    next verified one is, and the report's "deploy_check" says why each was passed over and gives the
    chosen model's placement and NPU drift (on `holdout`, else the calibration inputs).
    """
    from hwnas.search.optimize import run_search

    plan = _prepare(model, target, exact=exact, max_drift=max_drift, calibration=calibration,
                    input_shapes=input_shapes, algorithm=algorithm, space=space, trials=trials,
                    time_budget=time_budget, seed=seed, workers=workers, memory_budget=memory_budget,
                    max_params=max_params, max_peak_act=max_peak_act, estimator=estimator, journal=journal,
                    evaluate_cmd=evaluate_cmd, evaluate_timeout=evaluate_timeout, quality_tolerance=quality_tolerance,
                    storage=storage, quantize=quantize, quantize_preset=quantize_preset, deploy_check=deploy_check)
    outcome = run_search(plan.original, plan.target, plan.estimator, plan.shapes, plan.settings, plan.calibration,
                         progress, job_status)
    selection = _select_and_verify(plan, outcome, holdout, verify)
    return _report(plan, outcome, selection, holdout)


def _prepare(model: ModelLike, target: str | Target, *, exact: bool | None, max_drift: float | None,
             calibration: Mapping[str, np.ndarray] | None, input_shapes: Mapping[str, Shape] | None, algorithm: str,
             space: str, trials: int, time_budget: float | None, seed: int, workers: int | None,
             memory_budget: int | None, max_params: int | None, max_peak_act: int | None,
             estimator: str | os.PathLike | LatencyEstimator | None, journal: str | os.PathLike | None,
             evaluate_cmd: str | None, evaluate_timeout: float, quality_tolerance: float, storage: str | None,
             quantize: str | None, quantize_preset: str | None, deploy_check: str | None) -> _Plan:
    """Check and resolve `optimize`'s arguments (BadInputError) into the search's settings and policy."""
    from hwnas.search.algorithms import Limits
    from hwnas.search.optimize import SearchSettings
    from hwnas.verify import random_calibration

    if space not in ("curated", "uncurated"):
        raise BadInputError(f"--space must be curated or uncurated, not {space!r}")
    original = as_model(model)
    the_target = get_target(target) if isinstance(target, str) else target
    shapes = resolve_input_shapes(original, input_shapes)
    latency_model = estimator if isinstance(estimator, LatencyEstimator) else estimator_for(the_target, estimator)
    warnings = machine_warnings(latency_model)
    fidelity = _requested_fidelity(exact, max_drift, retrain=algorithm == "zero-shot" or evaluate_cmd is not None)
    if deploy_check is not None:
        from hwnas.targets.qnn_htp import NAME as QNN_HTP, require_qnn

        if deploy_check != QNN_HTP:
            raise BadInputError(f"--deploy-check {deploy_check!r}: the one backend offered is {QNN_HTP}")
        if quantize is None:
            raise BadInputError(f"--deploy-check {QNN_HTP} compiles the int8 winner: give --quantize int8 too")
        require_qnn()
        quantize_preset = quantize_preset or "qnn"
    quantize_spec, quantization = _quantize_request(quantize, quantize_preset, the_target, fidelity)
    if fidelity.changes_function and calibration is None:
        calibration = random_calibration(original, shapes, samples=4, seed=seed)
        judged = "" if isinstance(fidelity, Retrain) else " and judged"
        what = "the candidates were quantized and judged" if quantize_spec else f"reconstructed passes were fitted{judged}"
        warnings.append(f"no calibration data (--calib): {what} on random inputs")
    settings = SearchSettings(algorithm, trials, time_budget, seed, space == "curated", workers,
                              Limits(fidelity, memory_budget, max_params, max_peak_act),
                              None if journal is None else str(journal), evaluate_cmd, evaluate_timeout,
                              quality_tolerance, storage, quantize_spec)
    return _Plan(original, the_target, shapes, latency_model, settings, calibration, quantize_spec, quantization,
                 deploy_check, warnings)


def _select_and_verify(plan: _Plan, outcome: SearchOutcome, holdout: Mapping[str, np.ndarray] | None,
                       verify: bool) -> _Selection:
    """Verify the best feasible candidates in order (ONNX Runtime under the plan's policy, A/B on measured
    targets, the deploy check) until one passes; CheckFailedError when none does or none is feasible."""
    from hwnas.search.optimize import no_feasible_message, ranked_pipelines, verify_in_order

    original, target, shapes, calibration = plan.original, plan.target, plan.shapes, plan.calibration
    quantize_spec, seed = plan.quantize_spec, plan.settings.seed
    limits = outcome.limits  # with the quality floor the search set
    candidates = ranked_pipelines(outcome, limits)
    if not candidates:
        raise CheckFailedError(no_feasible_message(outcome, limits))
    measured: dict[str, float] = {}
    deploy = DeploySummary(plan.deploy_check) if plan.deploy_check is not None else None

    def accept(pipeline: str) -> RunResult:
        result = run(original, _then(pipeline, quantize_spec), input_shapes=shapes, calibration=calibration,
                     holdout=holdout if quantize_spec else None, fidelity=plan.fidelity, verify=verify, seed=seed,
                     strict_sites=False)
        if not target.simulated:  # the estimator's word is not enough on real hardware: measure A/B
            models = {"input": original, "optimized": result.model}
            if quantize_spec:  # the peer: the input quantized alone, same quantizer and calibration
                models["input_quantized"] = run(original, quantize_spec, input_shapes=shapes,
                                                calibration=calibration, allow_drift=1.0, seed=seed).model
            reference = "input_quantized" if quantize_spec else "input"
            # a second interleaved look before rejecting: on a model of a few ms the medians of two
            # near-identical models (the input's own quantization against quantize alone) differ by ~4 % noise
            for _ in range(2):
                timing = target.compare(models, shapes)
                measured.update({f"{k}_ms": m.latency_ms for k, m in timing.items()})
                if measured["optimized_ms"] <= 1.03 * measured[f"{reference}_ms"]:
                    break
            else:
                raise CheckFailedError(f"measured {measured['optimized_ms']:.3f} ms on {target.name}, "
                                       f"more than 3% over the {reference.replace('_', ' ')}'s "
                                       f"{measured[f'{reference}_ms']:.3f} ms")
        if deploy is not None:
            _deploy_or_reject(result, pipeline, shapes, holdout if holdout is not None else calibration,
                              "held-out" if holdout is not None else "calibration", original, deploy)
        return result

    # the input's own pipeline is the last resort, and only within every limit given: over one, nothing is written
    # when the best reconstructed candidates fail verification, the best exact one (which verifies unless a
    # pass is broken) comes before the baseline: it keeps what the exact passes alone found
    best_exact = next((t for t in candidates if t.score.exact), None)
    fallbacks = [t for t in (best_exact, outcome.baseline if outcome.baseline is not best_exact else None)
                 if t is not None and t not in candidates[:5] and limits.feasible(t.score)]
    verify_start = time.monotonic()
    chosen, run_result = verify_in_order(candidates[:5] + fallbacks, accept)
    return _Selection(chosen, run_result, measured, deploy, time.monotonic() - verify_start)


def _report(plan: _Plan, outcome: SearchOutcome, selection: _Selection,
            holdout: Mapping[str, np.ndarray] | None) -> OptimizeReport:
    """The report of the chosen model: estimates of input and output, the search's summary, the Pareto front."""
    from hwnas.search.algorithms import best_feasible_curve
    from hwnas.search.optimize import expert_candidate, fingerprint, pass_errors
    from hwnas.search.recipe import make_recipe

    settings, limits, chosen, run_result = plan.settings, outcome.limits, selection.chosen, selection.run
    baseline_estimate = estimate(plan.original, plan.target, input_shapes=plan.shapes, estimator=plan.estimator)
    # the written model, int8 included: what the search scored the candidate by
    optimized_estimate = estimate(run_result.model, plan.target, input_shapes=plan.shapes, estimator=plan.estimator)
    floor = limits.fidelity.quality_floor
    search = SearchSummary(
        algorithm=settings.algorithm, space="curated" if settings.curated else "uncurated", seed=settings.seed,
        trials=settings.trials, candidates_evaluated=len(outcome.trials),
        distinct_candidates=len({t.pipeline for t in outcome.trials}), candidates_scored=outcome.scored,
        depth_cache=outcome.depth_cache, fit_cache=outcome.fit_cache, pass_errors=pass_errors(outcome.trials),
        decisions=len(outcome.space.decisions), space_size=outcome.space.size(), wall_s=outcome.wall_s,
        seconds={**{k: round(v, 3) for k, v in outcome.seconds.items()}, "verify_chosen": round(selection.verify_s, 3)},
        best_so_far=best_feasible_curve(outcome.trials, limits),
        quality=None if floor is None else QualitySummary(
            "evaluate-cmd" if settings.evaluate_cmd else "naswot", outcome.baseline.score.quality, floor,
            chosen.score.quality),
        storage=settings.storage,
        expert_seed_latency_ms=next((t.score.latency_ms for t in outcome.trials
                                     if t.candidate == expert_candidate(outcome.space)), None),
    )
    quantization = None
    if plan.quantization is not None:
        preset, quant_settings = plan.quantization
        quantization = Quantization(preset, quant_settings, next(r.stats.get("float_input_side", 0.0)
                                                                 for r in run_result.records if r.spec.startswith("quantize")))
    return OptimizeReport(
        model=run_result.model, run=run_result, target=plan.target, fidelity=plan.fidelity,
        baseline=baseline_estimate, optimized=optimized_estimate,
        recipe=make_recipe(outcome.space, chosen.candidate, run_result.pipeline, fingerprint(plan.original),
                           plan.target.name),
        search=search,
        pareto=[ParetoPoint(t.score.latency_ms, t.score.drift, t.score.quality, t.score.memory_bytes, t.pipeline,
                            t.pipeline == chosen.pipeline) for t in outcome.pareto],
        measured=selection.measured or None,
        holdout=None if holdout is None else (run_result.drift.get("holdout")
                                              or measure_fidelity(plan.original, run_result.model, holdout)),
        quantization=quantization, deploy_check=selection.deploy,
        warnings=plan.warnings + run_result.warnings + [f"search space: {s}" for s in outcome.space.skipped],
    )


def work(storage: str, study: str | None = None, *, once: bool = False, max_candidates: int | None = None,
         evaluate_cmd: str | None = None, on_job: Callable[[str], None] | None = None):
    """Join a search run with `optimize(..., storage=URL)` and evaluate its candidates until it ends.

    The model, settings and seed come from the study (`study`, or the newest open one, waited for);
    `once`: leave when nothing is waiting; `max_candidates`: leave after that many. A search scored by
    an `evaluate_cmd` is joined only with the same command given here (the database does not choose
    what runs on this machine). Returns the hwnas.search.distributed.WorkerRun. Ctrl-C releases the
    candidate in hand to the other workers.
    """
    from hwnas.search.distributed import work as work_loop
    from hwnas.search.optimize import EvaluatorSpec

    if max_candidates is not None and max_candidates < 1:
        raise BadInputError(f"--max-candidates must be at least 1, got {max_candidates}")
    return work_loop(storage, study,
                     build=lambda blobs, shared: EvaluatorSpec.from_blobs(blobs, evaluate_cmd).evaluator(shared).evaluate,
                     once=once, max_candidates=max_candidates, on_job=on_job)


def recipe_pipeline(model: ModelLike, recipe: Mapping, input_shapes: Mapping[str, Shape] | None = None) -> str:
    """The pipeline a recipe gives for `model`: its own pipeline on the model it was found on, else its
    rules transferred site by site (by position, channels and resolution; see hwnas.search.recipe)."""
    from hwnas.search.optimize import fingerprint
    from hwnas.search.recipe import full_pipeline, transfer
    from hwnas.search.space import PREFIX, SpaceOptions, build_space

    original = as_model(model)
    if recipe.get("fingerprint") == fingerprint(original):
        return recipe["pipeline"]
    shapes = resolve_input_shapes(original, input_shapes)
    ctx = PassContext(template=original, input_shapes=shapes)
    prepared = PassManager(parse_pipeline(PREFIX)).run(to_graph(original), ctx).graph
    try:
        pf = int(recipe["parallelism_factor"])
    except (KeyError, TypeError, ValueError):
        raise BadInputError("recipe has no valid parallelism_factor") from None
    space = build_space(prepared, ctx, SpaceOptions(pf, curated=False))
    return full_pipeline(space.compile(transfer(recipe, space)))


def _default_preset(target: Target) -> str:
    """The quantize preset a target runs: npu targets int8 symmetric, QNN its uint8 form, else ORT CPU's."""
    name = target.name.lower()
    return "npu" if name.startswith("npu") else "qnn" if "qnn" in name else "cpu"


def _requested_fidelity(exact: bool | None, max_drift: float | None, retrain: bool) -> Fidelity:
    """The policy `optimize`'s arguments ask for: Retrain for models to train (zero-shot, --evaluate-cmd),
    Drift with a budget, else Exact; BadInputError where `exact` contradicts the rest."""
    if max_drift is not None and not 0 < max_drift < 1:
        raise BadInputError("--max-drift must be between 0 and 1 (it bounds 1 - cosine)")
    if exact and (max_drift is not None or retrain):
        raise BadInputError("exact=True (--exact) allows only exact passes: it cannot be combined with "
                            + ("a drift budget (max_drift / --max-drift)" if max_drift is not None else
                               "a search for models to retrain (zero-shot, --evaluate-cmd), which may change the function"))
    if retrain:  # the candidates will be trained: any function will do, ORT must still run it
        return Retrain()
    if max_drift is not None:
        return Drift(max_drift)
    if exact is False:
        raise BadInputError("exact=False allows reconstructed passes: give the drift budget too (max_drift / --max-drift X)")
    return Exact()


def _quantize_request(quantize: str | None, preset: str | None, target: Target, fidelity: Fidelity):
    """(the quantize step's pipeline text, (its preset, its settings)) for `optimize --quantize`, or (None, None)."""
    from hwnas.passes.quantize import PRESETS, Quantize

    if quantize is None:
        if preset is not None:
            raise BadInputError("--quantize-preset applies with --quantize int8")
        return None, None
    if quantize != "int8":
        raise BadInputError(f"--quantize {quantize!r}: the one precision offered is int8")
    if preset is not None and preset not in PRESETS:
        raise BadInputError(f"--quantize-preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if isinstance(fidelity, Retrain):
        raise BadInputError("--quantize int8 judges candidates by their drift: it cannot search models to retrain")
    if not isinstance(fidelity, Drift):
        raise BadInputError("--quantize int8 changes the function: give the drift budget too (--max-drift X)")
    # the budget goes to the quantizer too: over it, the input side stays float (hwnas.passes.quantize)
    preset = preset or _default_preset(target)
    spec = f"quantize{{preset={preset},max_drift={fidelity.max:g}}}"
    return spec, (preset, Quantize(preset=preset).options.settings())


def _deploy_or_reject(result: RunResult, pipeline: str, shapes: Mapping[str, Shape], feeds, label: str,
                      original: onnx.ModelProto, deployed: DeploySummary) -> None:
    """Compile a verified candidate on qnn-htp; record the result in `deployed`, or raise CheckFailedError
    (the next candidate is tried) when it does not compile with every node on the NPU."""
    from hwnas.targets.qnn_htp import deploy_check as compile_on_npu, shape_text

    check = compile_on_npu(result.model, shapes, feeds, original, label)
    if not check.compiled:
        off = "; ".join(f"{p.node} ({p.op_type}): {p.reason or 'no reason logged'}" for p in check.off_npu[:3])
        why = f"{len(check.off_npu)} node(s) off the NPU: {off}" if check.off_npu else f"does not compile: {check.error}"
        if check.culprit:
            why += f" (bisection: {', '.join(f'{n} ({o})' for n, o in zip(check.culprit.nodes, check.culprit.ops))})"
        deployed.rejected.append((pipeline, why))
        raise CheckFailedError(f"qnn-htp: {why}")
    deployed.chosen = check
    deployed.note = f"checked at {shape_text(shapes)} (HTP needs static shapes; the written model keeps the input's dims)"


def _then(pipeline: str, step: str | None) -> str:
    return ",".join(p for p in (pipeline, step) if p)


"""The Python API: what the CLI calls, and what export scripts and CI jobs call directly.

Every function takes a path or an `onnx.ModelProto`, returns a small typed result, never prints and
never exits. Errors are `hwnas.errors.BadInputError` (bad input) and `CheckFailedError` (a check
failed); the CLI maps them to exit codes 2 and 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from hwnas.errors import BadInputError, CheckFailedError
from hwnas.graph.gsgraph import to_graph, to_model
from hwnas.graph.io import load_model, validate_model
from hwnas.graph.shapes import Shape, resolve_input_shapes
from hwnas.graph.summary import ModelSummary, summarize
from hwnas.passes.base import Exactness, PassContext
from hwnas.passes.manager import PassManager, PassRecord, VerificationOutcome
from hwnas.passes.pipeline import Pipeline, parse_pipeline
from hwnas.verify import Tolerance, VerificationReport, verify_equivalence

ModelLike = str | os.PathLike | onnx.ModelProto


def as_model(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        validate_model(model)
        return model
    return load_model(model)


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

    @property
    def verified(self) -> bool:
        return self.verification is not None and self.verification.equivalent

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
            "warnings": self.warnings,
        }


def run(
    model: ModelLike,
    pipeline: str | Pipeline,
    *,
    input_shapes: Mapping[str, Shape] | None = None,
    calibration: Mapping[str, np.ndarray] | None = None,
    tolerance: Tolerance = Tolerance(),
    allow_drift: float | None = None,
    disabled: Iterable[str] = (),
    verify: bool = True,
    verify_each: bool = False,
    dry_run: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Apply a pipeline and check the result with ONNX Runtime.

    An exact pipeline must be equivalent at the tolerance; a reconstructed one must keep every output's
    cosine ≥ 1 − allow_drift. Otherwise CheckFailedError names the first pass that broke it. With
    `verify=False` the model is returned unchecked and a warning says so.
    """
    original = as_model(model)
    pipe = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    shapes = resolve_input_shapes(original, input_shapes)
    ctx = PassContext(template=original, input_shapes=shapes, calibration=calibration, seed=seed)
    baseline = summarize(original, shapes)

    def check(candidate: onnx.ModelProto) -> VerificationReport:
        return verify_equivalence(original, candidate, shapes, calibration, tolerance, seed)

    def step_verifier(graph) -> VerificationOutcome:
        report = check(to_model(graph.copy(), original))
        return _judge(report, exact=allow_drift is None, allow_drift=allow_drift)

    manager = PassManager(pipe, set(disabled), step_verifier if verify_each and verify else None)
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
    if exactness is not Exactness.EXACT and allow_drift is None and verify:
        raise BadInputError(
            f"pipeline is {exactness.value} (it changes the function); give --allow-drift X to accept output "
            "cosine >= 1 - X"
        )
    if not verify:
        result.warnings.append("not verified (--no-verify): the output was not checked with ONNX Runtime")
        return result
    try:
        report = check(candidate)
    except CheckFailedError as e:
        raise CheckFailedError(f"{e}; use --no-verify to write the model unchecked") from None
    result.verification = report
    outcome = _judge(report, exact=exactness is Exactness.EXACT, allow_drift=allow_drift)
    if not outcome.ok:
        if not verify_each:
            # run again, verifying after every pass, to name the first pass that broke the model
            run(original, pipe, input_shapes=shapes, calibration=calibration, tolerance=tolerance,
                allow_drift=allow_drift, disabled=disabled, verify_each=True, seed=seed)
        raise CheckFailedError(f"verification failed: {outcome.detail}")
    return result


def _judge(report: VerificationReport, exact: bool, allow_drift: float | None) -> VerificationOutcome:
    if exact:
        if report.equivalent:
            return VerificationOutcome(True, "equivalent")
        bad = next(o for o in report.outputs if not o.within_tolerance)
        return VerificationOutcome(
            False,
            f"output {bad.name!r} differs: max abs {bad.max_abs:.3g}, max rel {bad.max_rel:.3g} "
            f"(tolerance atol {report.tolerance.atol:g} + rtol {report.tolerance.rtol:g}·|ref|)",
        )
    budget = 1.0 - (allow_drift or 0.0)
    if report.cosine >= budget:
        return VerificationOutcome(True, f"cosine {report.cosine:.6f} >= {budget:.6f}")
    return VerificationOutcome(False, f"output cosine {report.cosine:.6f} < 1 - allow_drift = {budget:.6f}")

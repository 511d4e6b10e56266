"""What a result must keep of the original's function: one typed policy, judged in one place.

- `Exact(tolerance)`: the same function. Every output of every sample (and every other input size the
  original accepts) within atol + rtol·|ref| (`verify_equivalence`).
- `Drift(max, metric="cosine")`: a changed function, within a budget. The one drift metric: 1 − the
  smallest cosine of any output on any single held-back calibration sample (the samples the fits did
  not use: `hwnas.verify.calibration.split_calibration`) must stay ≤ `max`.
- `Retrain(floor)`: a model that will be trained after the search. Its function is not judged: ONNX
  Runtime must run it and its outputs must be numbers. A search keeps candidates whose quality (the
  zero-shot proxy or the --evaluate-cmd score) is ≥ `floor`; None until the search has scored the
  original (`with_floor`).

`judge(report)` turns a `VerificationReport` into a `Verdict`; nothing else decides whether a result
passed. A pipeline is judged by its policy, but an exact step is always judged `Exact`, whatever the
policy of the pipeline around it (hwnas.api.run): a drift budget never absorbs a broken exact pass.

For the search (hwnas.search.algorithms.Limits) a policy also gives the drift limit a candidate's
measured drift is held to, the quality floor, and what the search minimises besides latency (`loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Union

from hwnas.errors import BadInputError
from hwnas.verify.equivalence import Tolerance, VerificationReport

DRIFT_METRICS = ("cosine",)  # 1 − the worst output's cosine on the worst single sample
# an exact or retrain search holds candidates to no drift: the limit a relative excess is taken against
# (an unmeasured drift is 0, so it is within it; a measured one of an exact candidate must be ~0)
NO_DRIFT = 1e-12


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str
    function_checked: bool = True  # False: Retrain, only that ONNX Runtime runs the model was checked


@dataclass(frozen=True)
class Exact:
    tolerance: Tolerance = Tolerance()

    kind: ClassVar[str] = "exact"
    changes_function: ClassVar[bool] = False  # reconstructed passes are not allowed
    drift_limit: ClassVar[float] = NO_DRIFT
    quality_floor: ClassVar[float | None] = None

    def judge(self, report: VerificationReport) -> Verdict:
        if report.equivalent:
            return Verdict(True, "equivalent")
        bad = next(o for o in report.outputs if not o.within_tolerance)
        return Verdict(False, f"output {bad.name!r} differs: max abs {bad.max_abs:.3g}, max rel {bad.max_rel:.3g} "
                              f"(tolerance atol {report.tolerance.atol:g} + rtol {report.tolerance.rtol:g}·|ref|)")

    def loss(self, drift: float, quality: float | None) -> float:
        return drift

    def to_json(self) -> dict:
        return {"kind": self.kind, "atol": self.tolerance.atol, "rtol": self.tolerance.rtol}


@dataclass(frozen=True)
class Drift:
    max: float
    metric: str = "cosine"

    kind: ClassVar[str] = "drift"
    changes_function: ClassVar[bool] = True
    quality_floor: ClassVar[float | None] = None

    def __post_init__(self) -> None:
        if self.metric not in DRIFT_METRICS:
            raise BadInputError(f"drift metric {self.metric!r}; the one offered: {', '.join(DRIFT_METRICS)}")
        if not self.max >= 0:  # NaN fails too
            raise BadInputError(f"a drift budget must be a number >= 0, got {self.max!r}")

    @property
    def drift_limit(self) -> float:
        return self.max

    def judge(self, report: VerificationReport) -> Verdict:
        # the report's cosine is the worst output's on the worst sample (verify_equivalence compares sample by sample)
        budget = 1.0 - self.max
        if report.cosine >= budget:
            return Verdict(True, f"cosine {report.cosine:.6f} >= {budget:.6f}")
        return Verdict(False, f"output cosine {report.cosine:.6f} < 1 - allow_drift = {budget:.6f}")

    def loss(self, drift: float, quality: float | None) -> float:
        return drift

    def to_json(self) -> dict:
        return {"kind": self.kind, "max": self.max, "metric": self.metric}


@dataclass(frozen=True)
class Retrain:
    floor: float | None = None

    kind: ClassVar[str] = "retrain"
    changes_function: ClassVar[bool] = True
    drift_limit: ClassVar[float] = NO_DRIFT  # drift is never measured (0): quality judges

    @property
    def quality_floor(self) -> float | None:
        return self.floor

    def with_floor(self, floor: float) -> Retrain:
        return Retrain(floor)

    def judge(self, report: VerificationReport) -> Verdict:
        # any function will do (it will be trained); NaN outputs (cosine NaN) are not a function
        if math.isnan(report.cosine):
            return Verdict(False, "the outputs are not numbers (NaN)", function_checked=False)
        return Verdict(True, "ONNX Runtime runs it; its outputs are not judged (a model to retrain)",
                       function_checked=False)

    def loss(self, drift: float, quality: float | None) -> float:
        """−quality (higher is better); a score without one (a candidate that could not be built) is worst."""
        return -quality if quality is not None else math.inf

    def to_json(self) -> dict:
        return {"kind": self.kind, "floor": self.floor}


Fidelity = Union[Exact, Drift, Retrain]


def fidelity_from_json(data: dict) -> Fidelity:
    """The policy `to_json` wrote; BadInputError for anything else."""
    try:
        kind = data["kind"]
        if kind == Exact.kind:
            return Exact(Tolerance(float(data["atol"]), float(data["rtol"])))
        if kind == Drift.kind:
            return Drift(float(data["max"]), str(data["metric"]))
        if kind == Retrain.kind:
            return Retrain(None if data["floor"] is None else float(data["floor"]))
    except (KeyError, TypeError, ValueError) as e:
        raise BadInputError(f"malformed fidelity policy {data!r} ({type(e).__name__}: {e})") from None
    raise BadInputError(f"unknown fidelity policy kind {kind!r}")

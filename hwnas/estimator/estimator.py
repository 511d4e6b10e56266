"""The subgraph latency estimator: model → kernels → one regressor per kernel kind → sum.

Like the reference work's performance estimator and nn-Meter, it never deploys the model: it cuts it
into the kernels the target runs fused (`kernels.decompose` under the target's fusion rules), predicts
each kernel's latency with the regressor trained on measurements of that kernel kind on that target,
and adds them up. Unlike nn-Meter it never counts an op as 0 ms silently, and it does not extrapolate
blindly: a kernel whose kind has no trained regressor, or whose sizes lie beyond those its kind was
profiled at, is costed by physical terms taken from the target's measurements (`roofline.py`), and
flagged (`fallback`, `in_distribution`) with a warning that names it.

Storage: an estimator is its measurements plus its settings, as JSON, and beside it (`*.fitted.npz`,
plain arrays, loaded with `allow_pickle=False`) the fitted trees. Loading uses the arrays only when they
were fitted by the same scikit-learn version from the same measurements; otherwise it refits from the
measurements. No pickle is ever loaded, and a scikit-learn upgrade cannot break a stored estimator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from hwnas.errors import BadInputError
from hwnas.estimator.features import FEATURES_VERSION, SHAPE_FEATURES, WORK_FEATURES, feature_matrix, input_rank
from hwnas.estimator.regressor import KernelRegressor
from hwnas.estimator.roofline import Roofline
from hwnas.graph.control_flow import flatten_control_flow
from hwnas.graph.shapes import Shape
from hwnas.report.json_report import read_json

from hwnas.targets.fusion_rules import FusionRules
from hwnas.targets.kernels import GemmShape, Kernel, decompose, denormal_uses
from hwnas.targets.npu import computes_in_int8

# the version the fitted arrays are tied to, read without importing scikit-learn (a second of start-up
# that only fitting needs)
_SKLEARN_VERSION = importlib.metadata.version("scikit-learn")

FORMAT = "hwnas-estimator"
FORMAT_VERSION = 1
# The size features a kernel must lie within, per kind, to be inside the profiled distribution (the
# residues and ratios always are); the slack is ~5 % on the log features, none on the counts.
_SIZE_FEATURES = ("log_fold_steps", "log_vector_steps", "log_elements", "log_macs", "log_weights", "log_p", "log_k",
                  "log_n", "kernel_h", "kernel_w", "log_inner")
# Beyond its profiled sizes a Gemm/MatMul takes the linear baseline of the conv kind: it is a 1x1 conv on
# P pixels, and the conv kind was profiled over P, K and N alike, the gemm kind (classifier heads) only
# at P = 1, so its baseline cannot tell MACs from rows (a 4096x768x768 MatMul: 93x the simulated
# npu-32x32 time with the gemm kind's baseline).
_BASELINE_KIND = {"gemm": "conv"}
# Kinds whose ops are told apart by a regressor each (and a range each): their ops share nothing but the
# kind. Everywhere the catch-all kind "other" (a Transpose is a copy, a Softmax exponentials); on a target run
# by ONNX Runtime also the elementwise ops, which are unrelated code there: ORT's CPU runs an Add at ~0.03 ns
# per element, Erf at ~0.5 and Softplus at ~11 (a scalar log(1 + exp x)); pooled, the 32 Softplus samples of
# a profile that had them were averaged away (1x2x320x320 predicted 0.06 ms, 2.3 ms in context), and
# cross-validated by network on the shipped cpu samples the non-compute kernels' median error goes 0.318 ->
# 0.275 in log (`benchmarks/studies/estimator_cv.py`). A simulated npu runs every elementwise op as a vector
# pass of the same cost, where a split only thins the samples (held-out npu-32x32 kernels within ±5 %:
# 98.7 -> 97.2 %).
_PER_OP = ("other",)
_PER_OP_ORT = ("other", "elementwise")
# Ops whose input rank is part of their profiled range: a 6-D Transpose (a pixel shuffle's) gathers 2-wide
# innermost strides at 4-8x a 3-/4-D one's time per element (features.py), so sizes inside a profile of
# lower-rank Transposes do not make it inside. Elsewhere the rank says nothing about the cost (an Add on 3 or
# 4 axes), nor on a simulated npu.
_RANK_MATTERS = ("Transpose",)
_SIZE_COLUMNS = [SHAPE_FEATURES.index(f) for f in _SIZE_FEATURES]
_P_COLUMN = _SIZE_FEATURES.index("log_p")
_RANGE_SLACK = np.array([0.05 if f.startswith("log_") else 0.0 for f in _SIZE_FEATURES])


# A kernel inside a network whose plain run takes under this many ms runs ~20 % faster than the same kernel in a
# network of 4-12 ms (one MobileNetV2 conv timed in 17 networks: 40-42 us against 47-55; what a run touches stays
# cached from one run to the next): a profiling sample's network, and a model (by a first pass of the estimate), is
# "small" below it, a feature of its own (`small_network`). estimator-history.md, 2026-12-06.
SMALL_NETWORK_MS = 2.0


@dataclass(frozen=True)
class Sample:
    kernel: Kernel
    latency_ms: float
    network: int | None = None  # in-context profiling: which profiled network the kernel ran in
    network_ms: float | None = None  # in-context profiling: that network's plain run (median)

    @property
    def small_network(self) -> bool:
        return self.network_ms is not None and self.network_ms < SMALL_NETWORK_MS


@dataclass(frozen=True)
class KernelEstimate:
    name: str
    op: str
    kind: str
    nodes: tuple[str, ...]
    latency_ms: float
    fallback: bool = False
    # its op and precision (float, int8) were measured and every size feature lies within its kind's profiled range
    in_distribution: bool = True


@dataclass
class LatencyEstimate:
    target: str
    latency_ms: float
    kernels: list[KernelEstimate]
    warnings: list[str] = field(default_factory=list)
    inlined: onnx.ModelProto | None = None  # the model as costed, where If/Loop bodies were inlined

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "latency_ms": self.latency_ms,
            "kernels": [{"name": k.name, "op": k.op, "kind": k.kind, "latency_ms": k.latency_ms, "fallback": k.fallback,
                         "in_distribution": k.in_distribution} for k in self.kernels],
            "warnings": self.warnings,
        }


# On a measured target (an estimator whose `target_config` names its machine) the boosted correction fits this
# quantile of the log ratio, not its mean: a kernel's time in a random profiling network spreads with what its
# features cannot see (neighbours' layouts, the caches they leave, a neighbouring VM's burst), all of which only
# slow it, and real models run at the fast end of that spread. With the mean, each of 7 profiles overestimated
# the held-out models (median +7.6 %); how the 40th percentile was chosen: estimator-history.md, 2026-12-06.
MEASURED_QUANTILE = 0.40

# A handful of samples fits a baseline that can be anything beyond them: 4 int8 ConvTranspose samples put a 24 -> 1
# one at 640² at 104 ms (the float kind's regressor: 1.5). 8-9 float ConvTranspose samples kept the PP-OCR detectors
# within their held-out errors, so the floor is below that. Fewer: the next regressor in `_predict`'s order, flagged.
MIN_SAMPLES_PER_REGRESSOR = 5


class LatencyEstimator:
    """Per-kind regressors for one target. `fit(samples)` learns them; `estimate(model, shapes)` uses them."""

    def __init__(self, target: str, parallelism_factor: int, rules: FusionRules, target_config: dict | None = None,
                 random_state: int = 0, kernel_offset_ms: float = 0.0):
        self.target = target
        self.parallelism_factor = parallelism_factor
        self.rules = rules
        self.target_config = dict(target_config or {})
        self.random_state = random_state
        # in-context measurements: what attributing a network's nodes to kernels adds per kernel beyond the
        # network's plain run (`profile.per_kernel_offset`); taken off every prediction
        self.kernel_offset_ms = kernel_offset_ms

    def fit(self, samples: Sequence[Sample]) -> LatencyEstimator:
        self.samples_ = list(samples)
        by_key: dict[str, list[Sample]] = {}
        for s in self.samples_:
            key = self._regressor_key(s.kernel)
            by_key.setdefault(key, []).append(s)
            if s.kernel.kind in self.per_op_kinds:  # and pooled over the kind's ops: for an op never profiled
                by_key.setdefault(key.replace(self._range_key(s.kernel), s.kernel.kind, 1), []).append(s)
        self.fitted_quantile_ = self.correction_quantile
        self.regressors_ = {key: self._fit(group) for key, group in by_key.items()
                            if len(group) >= MIN_SAMPLES_PER_REGRESSOR}
        return self._derive()

    def refitted(self, samples: Sequence[Sample]) -> LatencyEstimator:
        """An estimator of this one's settings (target, rules, config, seed, per-kernel offset) fitted on `samples`."""
        return LatencyEstimator(self.target, self.parallelism_factor, self.rules, self.target_config, self.random_state,
                                self.kernel_offset_ms).fit(samples)

    def _regressor_key(self, kernel: Kernel) -> str:
        """The regressor a kernel is learnt and predicted by: its kind (`KIND:OP` within the kinds whose ops
        share nothing, `per_op_kinds`: a Transpose is a copy, a Softmax exponentials), and `KEY/int8` for an int8
        kernel on a target whose float and int8 kernels differ (ORT CPU runs DQ → Conv → Q as QLinearConv:
        other code, other costs); an npu of 1 byte per element runs everything as int8, so precision is no
        key there."""
        int8_kernel = kernel.int8 and kernel.kind != "free" and not computes_in_int8(self.target_config)
        return f"{self._range_key(kernel)}/int8" if int8_kernel else self._range_key(kernel)

    def _predicting_key(self, kernel: Kernel) -> str:
        """The regressor that predicts a kernel: its own (`_regressor_key`), except for an op whose rank bounds its
        range (`_RANK_MATTERS`) at a rank profiled only at the other precision: that precision's, still flagged as
        outside. A Transpose is a gather, whose cost per element its rank and permutation set, not its element type:
        6-D ones (pixel shuffles) ran at ~4 ns per element in float and int8 alike on both machines, and the AMD
        EPYC's float Transposes, of ranks 3-5 only, put rapidocrlite det's at 0.09 ms against 1.57 in context."""
        key = self._regressor_key(kernel)
        if not self._rank_matters(kernel) or input_rank(kernel) in self.ranks_.get(key, frozenset()):
            return key
        other = key.removesuffix("/int8") if key.endswith("/int8") else f"{key}/int8"
        return other if other in self.regressors_ and input_rank(kernel) in self.ranks_.get(other, frozenset()) else key

    def _rank_matters(self, kernel: Kernel) -> bool:
        """Whether the kernel's input rank bounds its profiled range (`_RANK_MATTERS`): on ONNX Runtime only; a
        simulated npu moves a Transpose's elements at one cost whatever the rank."""
        return kernel.op in _RANK_MATTERS and "provider" in self.target_config

    @property
    def per_op_kinds(self) -> tuple[str, ...]:
        return _PER_OP_ORT if "provider" in self.target_config else _PER_OP

    def _range_key(self, kernel: Kernel) -> str:
        """What a profiled range and a regressor are kept per: the kernel's kind; within a kind of unrelated
        ops (`per_op_kinds`: a Transpose's sizes say nothing about a Softmax's), its op."""
        return f"{kernel.kind}:{kernel.op}" if kernel.kind in self.per_op_kinds else kernel.kind

    @property
    def correction_quantile(self) -> float | None:
        """What the boosted corrections fit: the `MEASURED_QUANTILE` of the log ratio on a measured target (its
        `target_config` names the machine), the mean (None) on a simulated one."""
        return MEASURED_QUANTILE if self.target_config.get("machine") else None

    def _fit(self, samples: list[Sample]) -> KernelRegressor:
        X = self._features([s.kernel for s in samples], [s.small_network for s in samples])
        y = np.array([s.latency_ms for s in samples])
        return KernelRegressor(len(WORK_FEATURES), random_state=self.random_state,
                               quantile=self.fitted_quantile_).fit(X, y)

    def _features(self, kernels: Sequence[Kernel], small: Sequence[bool]) -> np.ndarray:
        work, shape = feature_matrix(list(kernels), self.parallelism_factor)
        return np.hstack([work, shape, np.asarray(small, dtype=np.float64).reshape(len(kernels), 1)])

    def predict_kernels(self, kernels: Sequence[Kernel], small: bool | Sequence[bool] | None = None) -> list[KernelEstimate]:
        """Latency of each kernel. Beyond the sizes its kind was profiled at, and for a kind never
        profiled (flagged `fallback`), the physical terms instead of the regressor (`roofline.py`).

        `small`: whether the kernels run in a network of under `SMALL_NETWORK_MS` (one flag, or one per kernel);
        by default the kernels are one model's, small when a first estimate of them all says so."""
        if small is not None:
            return self._predict(kernels, [small] * len(kernels) if isinstance(small, bool) else list(small))
        first = self._predict(kernels, [False] * len(kernels))
        if not self.small_networks_ or sum(e.latency_ms for e in first) >= SMALL_NETWORK_MS:
            return first
        return self._predict(kernels, [True] * len(kernels))

    def _predict(self, kernels: Sequence[Kernel], small: list[bool]) -> list[KernelEstimate]:
        out: list[KernelEstimate | None] = [None] * len(kernels)
        by_key: dict[str, list[int]] = {}
        for i, k in enumerate(kernels):
            by_key.setdefault(self._predicting_key(k), []).append(i)
        for key, idx in by_key.items():
            group = [kernels[i] for i in idx]
            kind = group[0].kind
            # an int8 kernel of a kind never profiled in int8: the float kind's regressor (flagged below); a float
            # op of a per-op kind profiled in int8 networks only: its int8 regressor (flagged: an op ORT cannot
            # quantize, e.g. Softplus at ~11 ns per element, runs in float between its DequantizeLinear and
            # QuantizeLinear there, far from the ~0.1 ns of the ops pooled with it); an op of the catch-all kind
            # never profiled: the one pooled over its profiled ops (flagged as a guess). A Transpose of a rank profiled
            # only at the other precision arrives here keyed by that precision's regressor (`_predicting_key`).
            other_precision = f"{key}/int8" if kind in self.per_op_kinds and not key.endswith("/int8") else None
            found = next((k for k in (key, key.removesuffix("/int8"), other_precision, kind) if k in self.regressors_), None)
            regressor = self.regressors_[found] if found is not None else None
            # inside: a measured op (a Resize: of a measured interpolation) at sizes its kind (its op, for the
            # catch-all kind) was profiled at, at its precision
            inside = self._in_range(kind, group) & np.array([
                kind == "free" or k.op in self.measured_ops_ and self._interpolation_profiled(k) for k in group])
            if found is not None and found != key:  # another precision's or op's regressor stands in
                inside[:] = False
            if regressor is None and kind == "free":
                values, fallback = np.zeros(len(group)), False  # moves no data (kernels.py)
            elif regressor is not None:
                X = self._features(group, [small[i] for i in idx])
                values, fallback = regressor.predict(X), False
                if not inside.all():
                    # the boosted correction holds its edge value out there, on its kind's baseline that keeps
                    # growing: the largest of that, the linear baseline alone (where the edge corrects downwards)
                    # and the physical term. Held-out (docs/estimator.md): the 960² detector −17 → −8 %, the LSTM
                    # recogniser's 8k-class Gemm and per-step LSTM within ~10 % of their in-context times. Not
                    # where the kind's baseline never saw the kernel's rows (a gemm kind profiled at P = 1 only:
                    # the conv kind's baseline stands in, `_BASELINE_KIND`)
                    # of the kernel's precision: an int8 conv's baseline is the int8 convs' (~2x the float's throughput)
                    precision = "/int8" if key.endswith("/int8") else ""
                    linear = self.regressors_.get(_BASELINE_KIND.get(kind, kind) + precision, regressor)
                    edge = values if kind not in _BASELINE_KIND else np.where(self._rows_profiled(key, group), values, 0.0)
                    beyond = np.maximum(np.maximum(edge, linear.baseline(X)), self.roofline_.predict(group))
                    values = np.where(inside, values, beyond)
            else:
                values, fallback = self.roofline_.predict(group), True
            if kind != "free" and self.kernel_offset_ms:
                # never more than half a kernel: the offset is a per-network average, not a floor every kernel has
                values = np.maximum(values - self.kernel_offset_ms, 0.5 * values)
            # an int8 kernel of a kind profiled in float only keeps the float estimate, flagged
            inside &= self._precision_profiled(kind, group)
            for i, k, v, ok in zip(idx, group, values, inside):
                # an op never measured under the catch-all kind is a guess however it was made: flag it
                guessed = fallback or (kind == "other" and k.op not in self.measured_ops_)
                out[i] = KernelEstimate(k.name, k.op, k.kind, k.nodes, float(max(v, 0.0)), guessed, bool(ok) and not guessed)
        return out  # type: ignore[return-value]

    def estimate(self, model: onnx.ModelProto, input_shapes: Mapping[str, Shape]) -> LatencyEstimate:
        """The model's latency, If/Loop bodies included (`hwnas.graph.control_flow`)."""
        flat = flatten_control_flow(model, input_shapes, cost=lambda m: self._top_level_ms(m, input_shapes))
        kernels = decompose(flat.model, input_shapes, self.rules)
        assists = self._denormal_assists_ms(flat.model, kernels)
        estimates = [
            dataclasses.replace(e, latency_ms=(e.latency_ms + assists.get(e.name, 0.0)) * flat.repeats.get(e.nodes[0], 1))
            for e in self.predict_kernels(kernels)
        ]
        warnings = flat.warnings + [
            f"{e.op} {e.name}: no {self.target} measurements of this op; fallback estimate {e.latency_ms:.4f} ms"
            for e in estimates if e.fallback
        ]
        outside = [e.name for e in estimates if not e.in_distribution and not e.fallback]
        if outside:
            shown = ", ".join(outside[:8]) + (f" and {len(outside) - 8} more" if len(outside) > 8 else "")
            warnings.append(f"{len(outside)} kernel(s) outside the ops, precisions and sizes {self.target} was "
                            f"profiled at (beyond the ops and sizes costed by the roofline fallback, an int8 kernel "
                            f"profiled in float only by its float estimate): {shown}")
        if sum(assists.values()) > 0.01 * sum(e.latency_ms for e in estimates):
            warnings.append(f"{len(assists)} kernel(s) read denormal weights, {sum(assists.values()):.3g} ms of microcode "
                            f"assists on the machine {self.target} was profiled on (pass flush-denormals zeroes them, "
                            f"exactly): {', '.join(list(assists)[:8])}")
        return LatencyEstimate(self.target, float(sum(e.latency_ms for e in estimates)), estimates, warnings,
                               flat.model if flat.model is not model else None)

    def _denormal_assists_ms(self, model: onnx.ModelProto, kernels: Sequence[Kernel]) -> dict[str, float]:
        """By kernel, the time its reads of denormal weights cost at the profiled machine's price per assist
        (`hwnas.estimator.denormal`; none where the profile did not measure it, the simulated targets)."""
        assist_ns = (self.target_config.get("profiling") or {}).get("denormal_assist_ns")
        if not assist_ns:
            return {}
        return {name: uses * assist_ns * 1e-6 for name, uses in denormal_uses(model, kernels, self.parallelism_factor).items()}

    def _top_level_ms(self, model: onnx.ModelProto, input_shapes: Mapping[str, Shape]) -> float:
        return float(sum(e.latency_ms for e in self.predict_kernels(decompose(model, input_shapes, self.rules))))

    # ---- storage: measurements + settings, never a pickle ------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "target": self.target,
            "parallelism_factor": self.parallelism_factor,
            "target_config": self.target_config,
            "fusion_rules": self.rules.to_dict(),
            "random_state": self.random_state,
            # written only when used, so that estimators without one keep their files unchanged
            **({"kernel_offset_ms": self.kernel_offset_ms} if self.kernel_offset_ms else {}),
            "fitted_with": {"scikit-learn": _SKLEARN_VERSION},
            "samples": [_sample_to_dict(s) for s in self.samples_],
        }

    def save(self, path: str | Path) -> None:
        """Write the measurements (JSON) and the fitted arrays (`.fitted.npz` beside it)."""
        from hwnas.report.json_report import write_json

        data = self.to_dict()
        write_json(path, data)
        np.savez_compressed(_fitted_path(path), **self.fitted_arrays(data))

    def fitted_arrays(self, data: Mapping | None = None) -> dict[str, np.ndarray]:
        """The fitted regressors as plain arrays (`from_dict`'s `fitted`), tagged with the samples they fit
        (`data`: this estimator's `to_dict()`, when already made)."""
        samples = (data or self.to_dict())["samples"]
        arrays = {f"{kind}/{key}": value for kind, reg in self.regressors_.items() for key, value in reg.to_arrays().items()}
        meta = {"scikit-learn": _SKLEARN_VERSION, "samples_sha256": _samples_digest(samples), "features": FEATURES_VERSION,
                "quantile": self.fitted_quantile_}
        return {"meta": np.array(json.dumps(meta)), **arrays}

    @classmethod
    def from_dict(cls, data: Mapping, origin: str = "estimator", fitted: Mapping[str, np.ndarray] | None = None) -> LatencyEstimator:
        """Settings and measurements from `data`; fitted arrays from `fitted` when they match, else a refit."""
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise BadInputError(f"{origin} is not an hwnas estimator file (format {FORMAT} v{FORMAT_VERSION})")
        try:
            estimator = cls(
                data["target"], int(data["parallelism_factor"]),
                FusionRules.from_dict(data["fusion_rules"], origin=origin), data.get("target_config", {}),
                int(data.get("random_state", 0)), float(data.get("kernel_offset_ms", 0.0)),
            )
            samples = [Sample(_kernel_from_dict(s["kernel"]), float(s["latency_ms"]),
                              None if s.get("network") is None else int(s["network"]),
                              None if s.get("network_ms") is None else float(s["network_ms"])) for s in data["samples"]]
        except (KeyError, TypeError, ValueError) as e:
            raise BadInputError(f"{origin}: malformed estimator data ({type(e).__name__}: {e})") from None
        if fitted is not None and _fitted_matches(fitted, data["samples"], estimator.correction_quantile):
            return estimator._restore(samples, fitted)
        return estimator.fit(samples)

    def _restore(self, samples: list[Sample], fitted: Mapping[str, np.ndarray]) -> LatencyEstimator:
        self.samples_ = samples
        self.fitted_quantile_ = self.correction_quantile  # what `_fitted_matches` checked the arrays were fitted with
        by_kind: dict[str, dict[str, np.ndarray]] = {}
        for key, value in fitted.items():
            if "/" in key:  # REGRESSOR/ARRAY, the regressor's key itself may be KIND/int8
                kind, name = key.rsplit("/", 1)
                by_kind.setdefault(kind, {})[name] = value
        self.regressors_ = {kind: KernelRegressor.from_arrays(len(WORK_FEATURES), arrays) for kind, arrays in by_kind.items()}
        return self._derive()

    def _derive(self) -> LatencyEstimator:
        """State that follows from the samples and regressors: the roofline, the ops ever measured, the
        profiled range of each kind's size features."""
        self.roofline_ = Roofline.from_measurements([s.kernel for s in self.samples_], [s.latency_ms for s in self.samples_],
                                                    {kind: r.fixed_ms for kind, r in self.regressors_.items()},
                                                    int(self.target_config.get("config", {}).get("bytes_per_element", 4)))
        self.measured_ops_ = frozenset(s.kernel.op for s in self.samples_)
        self.small_networks_ = any(s.small_network for s in self.samples_)
        # per regressor: an int8 half profiled after `Kernel.interpolation` was added, on float samples from before
        interpolations: dict[str, set[str]] = {}
        for s in self.samples_:
            if s.kernel.interpolation:
                interpolations.setdefault(self._regressor_key(s.kernel), set()).add(s.kernel.interpolation)
        self.interpolations_ = {key: frozenset(found) for key, found in interpolations.items()}
        by_kind: dict[str, list[Kernel]] = {}
        for s in self.samples_:
            by_kind.setdefault(s.kernel.kind, []).append(s.kernel)
        # an npu with 1 byte per element ran every profiled kernel as int8; elsewhere only int8 samples count
        self.int8_kinds_ = frozenset(by_kind) if computes_in_int8(self.target_config) else frozenset(
            s.kernel.kind for s in self.samples_ if s.kernel.int8)
        self.ranges_ = {}
        self.ranks_ = {}
        for kind, kernels in by_kind.items():
            # per regressor: an int8 kernel is inside only where int8 kernels of its kind were profiled
            for key in {self._regressor_key(k) for k in kernels}:
                profiled = [k for k in kernels if self._regressor_key(k) == key]
                sizes = self._sizes(profiled)
                self.ranges_[key] = (sizes.min(axis=0) - _RANGE_SLACK, sizes.max(axis=0) + _RANGE_SLACK)
                self.ranks_[key] = frozenset(input_rank(k) for k in profiled if self._rank_matters(k))
        return self

    def _sizes(self, kernels: Sequence[Kernel]) -> np.ndarray:
        return feature_matrix(list(kernels), self.parallelism_factor)[1][:, _SIZE_COLUMNS]

    def _in_range(self, kind: str, kernels: Sequence[Kernel]) -> np.ndarray:
        """Per kernel: whether every size feature lies within the range its kind (`_range_key`) was profiled at."""
        if kind == "free":
            return np.ones(len(kernels), bool)
        sizes = self._sizes(kernels)
        inside = np.zeros(len(kernels), bool)
        for i, k in enumerate(kernels):
            # an int8 kernel of a kind profiled in float only: the float range (flagged by its precision)
            key = next((key for key in (self._regressor_key(k), self._range_key(k)) if key in self.ranges_), None)
            if key is not None:
                lo, hi = self.ranges_[key]
                inside[i] = bool(np.all((sizes[i] >= lo) & (sizes[i] <= hi)))
                if self._rank_matters(k) and input_rank(k) not in self.ranks_[key]:
                    inside[i] = False
        return inside

    def _interpolation_profiled(self, kernel: Kernel) -> bool:
        """Whether a Resize's interpolation was profiled by its regressor's samples (samples that do not record it: any)."""
        profiled = self.interpolations_.get(self._regressor_key(kernel))
        return not kernel.interpolation or not profiled or kernel.interpolation in profiled

    def _rows_profiled(self, key: str, kernels: Sequence[Kernel]) -> np.ndarray:
        """Per kernel: whether its GEMM rows (P) lie within those regressor `key` was profiled at."""
        if key not in self.ranges_:
            return np.zeros(len(kernels), bool)
        lo, hi = (bound[_P_COLUMN] for bound in self.ranges_[key])
        rows = self._sizes(kernels)[:, _P_COLUMN]
        return (rows >= lo) & (rows <= hi)

    def _precision_profiled(self, kind: str, kernels: Sequence[Kernel]) -> np.ndarray:
        """Per kernel: whether its kind was profiled at its precision (int8 or float)."""
        return np.array([kind == "free" or kind in self.int8_kinds_ or not k.int8 for k in kernels], bool)

    @classmethod
    def load(cls, path: str | Path) -> LatencyEstimator:
        p = Path(path)
        data = read_json(p, "estimator")
        fitted = None
        if _fitted_path(p).is_file():
            try:
                with np.load(_fitted_path(p), allow_pickle=False) as npz:
                    fitted = {k: npz[k] for k in npz.files}
            except (OSError, ValueError):
                fitted = None  # unreadable arrays: refit from the measurements
        return cls.from_dict(data, origin=str(p), fitted=fitted)


def _fitted_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.stem + ".fitted.npz")


def _samples_digest(samples: list) -> str:
    return hashlib.sha256(json.dumps(samples, sort_keys=True).encode()).hexdigest()


def _fitted_matches(fitted: Mapping[str, np.ndarray], samples: list, quantile: float | None) -> bool:
    """Whether the stored arrays are what fitting `samples` here would give. Arrays written before the version
    was recorded are of version 1, before the quantile was, of an unknown one."""
    try:
        meta = json.loads(str(fitted["meta"]))
    except (KeyError, ValueError):
        return False
    return (meta.get("scikit-learn") == _SKLEARN_VERSION and meta.get("samples_sha256") == _samples_digest(samples)
            and meta.get("features", 1) == FEATURES_VERSION and meta.get("quantile", "unknown") == quantile)


def _sample_to_dict(sample: Sample) -> dict:
    data = {"kernel": _kernel_to_dict(sample.kernel), "latency_ms": sample.latency_ms}
    if sample.network is not None:  # absent for one-kernel measurements (the npu estimators' files)
        data["network"] = sample.network
    if sample.network_ms is not None:
        data["network_ms"] = sample.network_ms
    return data


def _kernel_to_dict(kernel: Kernel) -> dict:
    data = dataclasses.asdict(kernel)
    if not data["quantize_elements"]:  # written only when used: files of samples without any stay as they were
        del data["quantize_elements"]
    return data


def _kernel_from_dict(data: Mapping) -> Kernel:
    values = dict(data)
    if "inner" not in values and values.get("op") in ("Softmax", "LogSoftmax", "Hardmax") and values.get("input_shapes"):
        # written before `inner` was: the profiling networks of then had Softmax on heads alone, over the
        # channels (axis 1) of an NCHW map
        values["inner"] = math.prod(values["input_shapes"][0][2:])
    values["gemm"] = GemmShape(**values["gemm"]) if values.get("gemm") else None
    for key in ("nodes", "ops"):
        values[key] = tuple(values[key])
    for key in ("input_shapes", "output_shapes"):
        values[key] = tuple(tuple(s) for s in values[key])
    return Kernel(**values)


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> np.ndarray:
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    return np.abs(p - m) / np.maximum(m, 1e-12)


def accuracy_summary(predicted: Sequence[float], measured: Sequence[float]) -> dict:
    """±5 % / ±10 % hit rates, MAPE, RMSPE and Spearman ρ (the figures nn-Meter reports)."""
    from scipy.stats import spearmanr

    err = relative_errors(predicted, measured)
    rho = float(spearmanr(predicted, measured).statistic) if len(err) > 2 else math.nan
    return {
        "n": int(len(err)),
        "within_5pct": float(np.mean(err <= 0.05)) if len(err) else math.nan,
        "within_10pct": float(np.mean(err <= 0.10)) if len(err) else math.nan,
        "mape": float(np.mean(err)) if len(err) else math.nan,
        "rmspe": float(np.sqrt(np.mean(err**2))) if len(err) else math.nan,
        "spearman": rho,
    }

"""The pre-deployment gate behind `hwnas check`: budgets a model must meet on a target, one verdict each.

Budgets (each optional; at least one must be given):

    max-latency-ms     estimated latency on the target ≤ X ms. The number comes from the target's
                       subgraph estimator (`hwnas.api.estimate`), not from running the model; the
                       message says so and names the target.
    max-params         parameter bytes (every constant tensor, counted once) ≤ SIZE
    max-peak-act       peak live activation bytes over the execution order ≤ SIZE
    require-multiple   every Conv's input and output channel count is a multiple of N. A depthwise or
                       grouped conv counts its full channel count (not the per-group 1). Channel counts
                       fixed by the model's signature — a conv reading a graph input (3 for RGB) or
                       writing a graph output — cannot be changed by any rewrite and are exempt; the
                       item says how many were. A count the gate cannot read (a weight that is not
                       constant, without --input-shape) fails the item: it was not checked.
    max-regression     (IN − REF) / REF · 100 ≤ PCT, for the estimated latencies of IN and of the
                       baseline model REF on the same target and estimator.

On the `qnn-htp` target (hwnas.targets.qnn_htp: Qualcomm's NPU backend, needs onnxruntime-qnn), two
more, both from compiling the model with the backend rather than from an estimate:

    require-npu        the graph compiles for the NPU with every node on it (JUnit/JSON name
                       `qnn-htp-placement`); a failure names each node off the NPU with the backend's
                       reason, or the backend's error and the bisected culprit nodes.
    max-drift          the NPU's outputs keep cosine ≥ 1 − X against `reference` (the float model;
                       default: the same model on ORT's CPU) on the given inputs (`qnn-htp-drift`).

SIZE is bytes or a number with a unit: KB/MB/GB are decimal (1000), KiB/MiB/GiB binary (1024).
`check` returns a `CheckResult` with one `CheckItem` per requested budget and never raises for a
failed budget: the CLI turns `passed=False` into exit code 1. Bad input (an unreadable model, an
unknown unit, a missing baseline) raises `BadInputError`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx

from hwnas.errors import BadInputError
from hwnas.estimator.estimate import estimate
from hwnas.estimator.memory import footprint
from hwnas.graph.constants import lift_constants
from hwnas.graph.io import as_model, graph_inputs
from hwnas.graph.shapes import Shape, resolve_input_shapes, tensor_shapes
from hwnas.targets import get_target

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)

# names of the budgets, as the CLI spells their options; JUnit test cases and JSON items use them too
LATENCY, PARAMS, PEAK_ACT, MULTIPLE, REGRESSION = (
    "max-latency-ms", "max-params", "max-peak-act", "require-multiple", "max-regression")
PLACEMENT, DRIFT = "qnn-htp-placement", "qnn-htp-drift"  # the qnn-htp target's (--require-npu, --max-drift)


def parse_size(text: str | int) -> int:
    """Bytes from `1000`, `512KB`, `4MB`, `3.5MiB`, `1 GiB` (KB/MB/GB decimal, KiB/MiB/GiB binary).

    Units are case-insensitive; fractional byte counts are rounded down. Anything else, negative
    values and non-finite values raise BadInputError.
    """
    if isinstance(text, bool):
        raise BadInputError(f"bad size {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise BadInputError(f"bad size {text}: must not be negative")
        return text
    match = _SIZE.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise BadInputError(f"bad size {text!r}: give bytes or a number with a unit (512KB, 4MB, 3.5MiB; "
                            "KB/MB/GB = 1000, KiB/MiB/GiB = 1024)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    """`1,234,567 B (1.18 MiB)`: exact bytes plus a readable binary size."""
    if n < 1024:
        return f"{n:,} B"
    value, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{n:,} B ({value:.2f} {unit})"


@dataclass(frozen=True)
class Budgets:
    """What `check` enforces; None = not checked. Sizes may be given as text (`"4MB"`) and become bytes."""

    max_latency_ms: float | None = None
    max_params_bytes: int | None = None
    max_peak_act_bytes: int | None = None
    require_multiple: int | None = None
    baseline: str | os.PathLike | onnx.ModelProto | None = None  # the reference model for max_regression_pct
    max_regression_pct: float | None = None
    require_npu: bool = False
    max_drift: float | None = None
    reference: str | os.PathLike | onnx.ModelProto | None = None  # the float model the NPU's drift is against

    def __post_init__(self):
        for name in ("max_params_bytes", "max_peak_act_bytes"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse_size(value))
        for name, flag in (("max_latency_ms", LATENCY), ("max_regression_pct", REGRESSION)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not math.isfinite(value)):
                raise BadInputError(f"--{flag} must be a finite number, not {value!r}")
        if self.max_latency_ms is not None and self.max_latency_ms <= 0:
            raise BadInputError(f"--{LATENCY} must be positive, not {self.max_latency_ms:g}")
        if self.require_multiple is not None and (
                isinstance(self.require_multiple, bool) or not isinstance(self.require_multiple, int)
                or self.require_multiple < 1):
            raise BadInputError(f"--{MULTIPLE} must be a positive integer, not {self.require_multiple!r}")
        if self.max_drift is not None and (isinstance(self.max_drift, bool) or not isinstance(self.max_drift, (int, float))
                                           or not 0 < self.max_drift < 1):
            raise BadInputError(f"--max-drift must be a number in (0, 1) (cosine >= 1 - X), not {self.max_drift!r}")
        if self.reference is not None and self.max_drift is None:
            raise BadInputError("--reference FLOAT.onnx is what --max-drift X compares against: give --max-drift too")
        if (self.baseline is None) != (self.max_regression_pct is None):
            raise BadInputError("--baseline REF.onnx and --max-regression PCT go together: give both or neither")

    @property
    def requested(self) -> list[str]:
        """The budgets to check, by name, in report order."""
        given = [(LATENCY, self.max_latency_ms), (PARAMS, self.max_params_bytes),
                 (PEAK_ACT, self.max_peak_act_bytes), (MULTIPLE, self.require_multiple),
                 (REGRESSION, self.max_regression_pct), (PLACEMENT, self.require_npu or None),
                 (DRIFT, self.max_drift)]
        return [name for name, value in given if value is not None]


@dataclass(frozen=True)
class CheckItem:
    """One budget's verdict. `value` and `limit` are in the budget's unit (ms, bytes, %, channels).

    For require-multiple, `value` is the number of convs with an offending channel count, `limit` is N
    and `details` lists each offender.
    """

    name: str
    passed: bool
    value: float | int | None
    limit: float | int
    message: str
    unit: str = ""
    details: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "value": self.value, "limit": self.limit,
                "unit": self.unit, "message": self.message, "details": list(self.details)}


@dataclass
class CheckResult:
    target: str
    items: list[CheckItem]
    input_shapes: dict[str, Shape] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    deploy: dict | None = None  # the qnn-htp deployability check (DeployCheck.to_dict), when one ran

    @property
    def passed(self) -> bool:
        return all(item.passed for item in self.items)

    @property
    def failed(self) -> list[CheckItem]:
        return [item for item in self.items if not item.passed]

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "passed": self.passed,
            "failed": [item.name for item in self.failed],
            "checks": [item.to_dict() for item in self.items],
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "warnings": self.warnings,
            **({"deploy": self.deploy} if self.deploy is not None else {}),
        }


def check(
    model,
    target,
    budgets: Budgets,
    input_shapes: Mapping[str, Shape] | None = None,
    estimator=None,
    feeds=None,
    feeds_label: str = "calibration",
) -> CheckResult:
    """Check `model` (path or ModelProto) against `budgets` on `target` (name or Target).

    `feeds` (input name -> samples) are the inputs the qnn-htp drift is measured on (`feeds_label` says
    which set they are); None: seeded random ones, with a warning.

    `estimator` is an estimator file (or LatencyEstimator) for the target; default: the shipped one.
    The latency estimator is loaded only when a latency or regression budget asks for it, so a
    memory-only or channel-only check works on targets without a shipped estimator, and a
    channel-only check of a model with dynamic dims needs no input shapes when its weights are constant.
    """
    names = budgets.requested
    if not names:
        raise BadInputError("check: give at least one budget (--max-latency-ms, --max-params, --max-peak-act, "
                            "--require-multiple, --baseline with --max-regression, --require-npu, --max-drift)")
    onnx_model = as_model(model)
    the_target = get_target(target) if isinstance(target, str) else target
    if names == [MULTIPLE] and not input_shapes:
        try:
            shapes = resolve_input_shapes(onnx_model)
        except BadInputError:  # dynamic dims: only needed for convs whose weights are computed
            shapes = None
    else:
        shapes = resolve_input_shapes(onnx_model, input_shapes)
    needs_latency = LATENCY in names or REGRESSION in names
    est = estimate(onnx_model, the_target, input_shapes=shapes, estimator=estimator) if needs_latency else None
    memory = est.memory if est is not None else (
        footprint(onnx_model, shapes) if PARAMS in names or PEAK_ACT in names else None)
    where = f"on {the_target.name} (estimated by the target's subgraph estimator, not measured)"

    items: list[CheckItem] = []
    if LATENCY in names:
        items.append(_at_most(LATENCY, est.latency_ms, budgets.max_latency_ms, "ms",
                              f"estimated latency {est.latency_ms:.4g} ms {where}",
                              f"{budgets.max_latency_ms:g} ms"))
    if PARAMS in names:
        items.append(_at_most(PARAMS, memory.params_bytes, budgets.max_params_bytes, "bytes",
                              f"parameters {format_size(memory.params_bytes)}",
                              format_size(budgets.max_params_bytes)))
    if PEAK_ACT in names:
        items.append(_at_most(PEAK_ACT, memory.peak_activation_bytes, budgets.max_peak_act_bytes, "bytes",
                              f"peak activations {format_size(memory.peak_activation_bytes)} "
                              f"(peak at node {memory.peak.node}, in graph order)",
                              format_size(budgets.max_peak_act_bytes)))
    if MULTIPLE in names:
        items.append(_multiple_item(onnx_model, shapes, budgets.require_multiple))
    if REGRESSION in names:
        items.append(_regression_item(est, budgets, the_target, input_shapes, estimator, where))
    deploy = None
    if PLACEMENT in names or DRIFT in names:
        deploy = _deploy_items(onnx_model, the_target, budgets, shapes, feeds, feeds_label, items)
    warnings = (list(est.warnings) if est is not None else []) + (list(deploy.warnings) if deploy else [])
    return CheckResult(the_target.name, items, dict(shapes or {}), warnings,
                       deploy.to_dict() if deploy is not None else None)


def _deploy_items(model: onnx.ModelProto, target, budgets: Budgets, shapes, feeds, feeds_label: str,
                  items: list[CheckItem]):
    """Compile on the qnn-htp backend; append the placement and/or drift verdicts to `items`."""
    from hwnas.targets.qnn_htp import NAME, QnnHtpTarget, deploy_check

    if not isinstance(target, QnnHtpTarget):
        raise BadInputError(f"--require-npu and --max-drift compile the model on a real NPU backend: use --target {NAME} "
                            f"(not {target.name})")
    reference = None
    if budgets.reference is not None:
        try:
            reference = as_model(budgets.reference)
        except BadInputError as e:
            raise BadInputError(f"--reference {_label(budgets.reference)}: {e}") from None
    result = deploy_check(model, shapes, feeds, reference, feeds_label, drift=budgets.max_drift is not None)
    if budgets.require_npu:
        off = result.off_npu
        if result.compiled:
            message = f"{PLACEMENT}: compiled for the NPU, all {result.on_npu} nodes on the NPU"
        elif off:
            shown = "; ".join(f"{p.node} ({p.op_type}): {p.reason or 'no reason logged'}" for p in off[:5])
            more = f"; ... and {len(off) - 5} more" if len(off) > 5 else ""
            message = (f"{PLACEMENT}: {len(off)} of {len(result.placement)} nodes fall off the NPU: {shown}{more}")
        else:
            message = f"{PLACEMENT}: does NOT compile for the NPU: {result.error}"
            if result.culprit:
                c = result.culprit
                message += (f"; bisection: the smallest failing part is {len(c.nodes)} node(s) "
                            f"{', '.join(f'{n} ({o})' for n, o in zip(c.nodes, c.ops))}")
        details = tuple(f"{p.node} ({p.op_type}) on {p.device}: {p.reason or 'no reason logged'}" for p in off)
        details += tuple(result.culprit.quantization) if result.culprit else ()
        items.append(CheckItem(PLACEMENT, result.compiled, len(off), 0, message, "nodes off the NPU", details))
    if budgets.max_drift is not None:
        d = result.drift
        if d is None:
            items.append(CheckItem(DRIFT, False, None, budgets.max_drift,
                                   f"{DRIFT}: not measured: the model does not compile for the NPU", "1 - cosine"))
        else:
            drift = 1 - d.cosine
            ok = drift <= budgets.max_drift
            top1 = f", top-1 agreement {d.top1_agreement:.3f}" if d.top1_agreement is not None else ""
            items.append(CheckItem(
                DRIFT, ok, drift, budgets.max_drift,
                f"{DRIFT}: NPU outputs vs {d.reference} on {d.samples} {d.inputs} sample(s): cosine {d.cosine:.5f} "
                f"(worst sample {d.min_sample_cosine:.5f}), max abs {d.max_abs:.4g}{top1}; "
                f"{'within' if ok else 'EXCEEDS'} the budget of cosine >= {1 - budgets.max_drift:g}", "1 - cosine"))
    return result


def _at_most(name: str, value, limit, unit: str, what: str, limit_text: str) -> CheckItem:
    ok = value <= limit
    verdict = "within" if ok else "EXCEEDS"
    return CheckItem(name, ok, value, limit, f"{name}: {what} {verdict} the budget of {limit_text}", unit)


def _regression_item(est, budgets: Budgets, target, input_shapes, estimator, where: str) -> CheckItem:
    try:
        reference = as_model(budgets.baseline)
        ref = estimate(reference, target, input_shapes=_shapes_for(reference, input_shapes), estimator=estimator)
    except BadInputError as e:
        raise BadInputError(f"--baseline {_label(budgets.baseline)}: {e}") from None
    if ref.latency_ms <= 0:
        raise BadInputError(f"--baseline {_label(budgets.baseline)}: estimated latency is 0 ms; cannot compare")
    pct = (est.latency_ms - ref.latency_ms) / ref.latency_ms * 100
    ok = pct <= budgets.max_regression_pct
    verdict = "within" if ok else "EXCEEDS"
    return CheckItem(
        REGRESSION, ok, pct, budgets.max_regression_pct,
        f"{REGRESSION}: estimated latency {est.latency_ms:.4g} ms vs baseline {_label(budgets.baseline)} "
        f"{ref.latency_ms:.4g} ms = {pct:+.2f}% {where}; {verdict} the budget of +{budgets.max_regression_pct:g}%",
        "%",
    )


def _shapes_for(model: onnx.ModelProto, input_shapes: Mapping[str, Shape] | None) -> dict[str, Shape] | None:
    """The user's input shapes for the inputs this model has (the baseline may name fewer)."""
    if not input_shapes:
        return None
    names = {v.name for v in graph_inputs(model)}
    return {k: v for k, v in input_shapes.items() if k in names or k == ""} or None


def _label(model) -> str:
    return "(model)" if isinstance(model, onnx.ModelProto) else str(model)


@dataclass(frozen=True)
class _ConvChannels:
    node: str
    inputs: int | None
    outputs: int | None
    groups: int
    input_fixed: bool  # read from a graph input: the signature fixes it
    output_fixed: bool  # written to a graph output


def conv_channels(model: onnx.ModelProto, shapes: Mapping[str, Shape] | None) -> list[_ConvChannels]:
    """Input and output channel counts of every top-level Conv (full counts, not per group).

    From the weight's shape [M, C/g, kH, kW] where the weight is constant (initializer or Constant
    node), else from the inferred shapes of the conv's input and output tensors (None without
    `shapes`: unknown).
    """
    lifted = lift_constants(model)
    weights = {t.name: tuple(t.dims) for t in lifted.graph.initializer}
    graph_in = {v.name for v in graph_inputs(model)}
    graph_out = {o.name for o in model.graph.output}
    inferred: dict[str, Shape] | None = None
    out = []
    for i, node in enumerate(lifted.graph.node):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        groups = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
        w = weights.get(node.input[1]) if len(node.input) > 1 else None
        if w is not None and len(w) >= 2:
            c_in, c_out = w[1] * groups, w[0]
        else:
            if inferred is None:
                inferred = tensor_shapes(model, shapes) if shapes is not None else {}
            x, y = inferred.get(node.input[0]), inferred.get(node.output[0])
            c_in = x[1] if x is not None and len(x) > 1 else None
            c_out = y[1] if y is not None and len(y) > 1 else None
        out.append(_ConvChannels(node.name or f"Conv#{i}", c_in, c_out, groups,
                                 node.input[0] in graph_in, node.output[0] in graph_out))
    return out


def _multiple_item(model: onnx.ModelProto, shapes: Mapping[str, Shape] | None, n: int) -> CheckItem:
    convs = conv_channels(model, shapes)
    offenders, exempt, unknown = [], 0, 0
    for c in convs:
        bad = []
        for side, count, fixed in (("input", c.inputs, c.input_fixed), ("output", c.outputs, c.output_fixed)):
            if count is not None and count % n == 0:
                continue
            if fixed:  # no rewrite can change it, known or not
                exempt += 1
            elif count is None:  # the gate fails closed: what it could not check is not passed
                unknown += 1
                bad.append(f"unknown {side}")
            else:
                bad.append(f"{count} {side}")
        if bad:
            kind = "depthwise " if c.groups > 1 and c.groups == c.inputs == c.outputs else (
                f"grouped (group={c.groups}) " if c.groups > 1 else "")
            offenders.append(f"{kind}conv {c.node}: {' and '.join(bad)} channels")
    notes = []
    if exempt:
        notes.append(f"{exempt} channel count(s) fixed by the model's inputs/outputs exempt")
    if unknown:
        notes.append(f"{unknown} channel count(s) unknown: weights not constant, give --input-shape")
    suffix = f" ({'; '.join(notes)})" if notes else ""
    if not offenders:
        message = f"{MULTIPLE}: all {len(convs)} Conv channel counts are multiples of {n}{suffix}"
    else:
        shown = "; ".join(offenders[:5]) + (f"; ... and {len(offenders) - 5} more" if len(offenders) > 5 else "")
        message = (f"{MULTIPLE}: {len(offenders)} of {len(convs)} Convs have channel counts that are not "
                   f"multiples of {n}{' or are unknown' if unknown else ''}: {shown}{suffix}")
    return CheckItem(MULTIPLE, not offenders, len(offenders), n, message, "convs", tuple(offenders))

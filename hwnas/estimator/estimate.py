"""A model's estimated latency, memory footprint and lane warnings on a target.

What `hwnas estimate` prints and what the gate's latency and regression budgets compare; `hwnas.api`
re-exports it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx

from hwnas.errors import BadInputError
from hwnas.estimator.defaults import estimator_for, machine_warnings
from hwnas.estimator.estimator import KernelEstimate, LatencyEstimator
from hwnas.estimator.memory import MemoryFootprint, footprint
from hwnas.graph.io import ModelLike, as_model
from hwnas.graph.shapes import Shape, resolve_input_shapes
from hwnas.targets import Target, get_target
from hwnas.targets.kernels import decompose
from hwnas.targets.npu import LaneUse, computes_in_int8

if TYPE_CHECKING:
    from hwnas.estimator.quiet import SpeedLevel


_QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                            "MatMulInteger"})


@dataclass
class EstimateResult:
    """Estimated latency on a target, per kernel, with the memory footprint and advice-worthy warnings."""

    target: dict
    latency_ms: float
    cycles: int | None
    kernels: list[KernelEstimate]
    memory: MemoryFootprint
    warnings: list[str]
    measured_ms: float | None = None
    speed: SpeedLevel | None = None  # `at_speed_now`: the machine's speed level, which the latencies are scaled by

    @property
    def params_bytes(self) -> int:
        return self.memory.params_bytes

    @property
    def peak_activation_bytes(self) -> int:
        return self.memory.peak_activation_bytes

    def to_dict(self) -> dict:
        return {
            "target": self.target["name"],
            "target_config": self.target,
            "latency_ms": self.latency_ms,
            "cycles": self.cycles,
            "measured_ms": self.measured_ms,
            "speed": None if self.speed is None else {"now_ms": self.speed.now_ms, "profiled_ms": self.speed.profiled_ms,
                                                      "scale": self.speed.scale},
            "params_bytes": self.params_bytes,
            "peak_activation_bytes": self.peak_activation_bytes,
            "memory": self.memory.to_dict(),
            "kernels": [
                {"name": k.name, "op": k.op, "kind": k.kind, "nodes": list(k.nodes), "latency_ms": k.latency_ms,
                 "fallback": k.fallback, "in_distribution": k.in_distribution}
                for k in self.kernels
            ],
            "warnings": self.warnings,
        }


def estimate(
    model: ModelLike,
    target: str | Target = "npu-32x32",
    *,
    input_shapes: Mapping[str, Shape] | None = None,
    estimator: str | os.PathLike | LatencyEstimator | None = None,
    measure: bool = False,
    at_speed_now: bool = False,
) -> EstimateResult:
    """Latency from the target's subgraph estimator (not the target itself), plus memory footprint.

    `measure=True` also measures the model on the target, for comparison. `at_speed_now=True` (a measured target
    whose profile recorded its speed level) scales the estimate by how much slower or faster than while it was
    profiled the machine runs now: a shared VM's host moves its speed by up to 1.5x for minutes to hours, and the
    profile holds the level it was taken at (`SpeedLevel`, ~0.1 s of a small reference model).
    """
    onnx_model = as_model(model)
    the_target = get_target(target) if isinstance(target, str) else target
    shapes = resolve_input_shapes(onnx_model, input_shapes)
    latency_model = estimator if isinstance(estimator, LatencyEstimator) else estimator_for(the_target, estimator)
    speed = _speed_now(latency_model, the_target) if at_speed_now else None
    result = latency_model.estimate(onnx_model, shapes)
    scale = speed.scale if speed is not None else 1.0
    latency_ms = result.latency_ms * scale
    clock = the_target.describe().get("config", {}).get("clock_ghz")
    return EstimateResult(
        target=the_target.describe(),
        latency_ms=latency_ms,
        cycles=round(latency_ms * clock * 1e6) if clock else None,
        kernels=[dataclasses.replace(k, latency_ms=k.latency_ms * scale) for k in result.kernels] if speed else result.kernels,
        memory=footprint(result.inlined or onnx_model, shapes),
        warnings=[the_target.latency_note] * bool(the_target.latency_note)
        + machine_warnings(latency_model) + result.warnings
        + _precision_warnings(the_target, onnx_model) + lane_warnings(the_target, onnx_model, shapes)
        + _speed_warnings(speed),
        measured_ms=the_target.measure(onnx_model, shapes).latency_ms if measure else None,
        speed=speed,
    )


def _speed_now(estimator: LatencyEstimator, target: Target) -> SpeedLevel:
    # profiling's modules (its networks, the speed reference) load only where they are used: `estimate` stays quick
    from hwnas.estimator.profile import profiled_reference_ms
    from hwnas.estimator.quiet import SpeedLevel

    profiled = profiled_reference_ms(estimator)
    if profiled is None or not hasattr(target, "settings"):
        raise BadInputError(f"the {target.name} estimator records no speed level to scale by (a measured target's "
                            "profile taken with the quiet gate does: 'hwnas profile --target cpu -o DIR')")
    return SpeedLevel.now(profiled, target.settings, tuple(target.providers))


# this far from its profile-time level (either way) the speed reference has not told how the models moved: on a
# 2-core Xeon once at 1.23x while the models had not slowed, once at 1/1.38x while they ran 1.2-1.75x faster
SPEED_WARNING_SCALE = 1.15


def _speed_warnings(speed: SpeedLevel | None) -> list[str]:
    if speed is None or 1 / SPEED_WARNING_SCALE <= speed.scale <= SPEED_WARNING_SCALE:
        return []
    return [f"the speed reference runs {speed.scale:.2f}x its level when the estimator was profiled: on a shared "
            f"machine the models do not always move with it, so the scaled estimate may be further off than the "
            f"unscaled one; compare with --measure (docs/estimator.md)"]


def _precision_warnings(target: Target, model: onnx.ModelProto) -> list[str]:
    """An npu of 1 byte per element computes in int8: a float model's estimate is that of its int8 form."""
    if not computes_in_int8(target.describe()):
        return []
    if any(n.op_type in _QUANTIZED_OPS for n in model.graph.node):
        return []
    return [f"the model is float: the estimate assumes int8 execution on {target.name} (1 byte per element); "
            "quantize it (pass quantize, optimize --quantize int8) to deploy and verify what the chip runs"]


def lane_warnings(target: Target, model: onnx.ModelProto, shapes: Mapping[str, Shape], limit: int = 12) -> list[str]:
    """Kernels whose channel counts leave lanes idle on the target, the most wasted MACs first.

    Targets that know how they spread a kernel over lanes (`lane_use`, the npu) say so; for the others the
    output channels (per group) are compared with the parallelism factor.
    """
    wasted = []
    for k in decompose(model, shapes, target.rules):
        if k.gemm is None or k.kind == "free":
            continue
        # targets without their own lane model (cpu, ort:) block depthwise convs by channel, like ORT's NCHWc
        size, what = (k.c_out, "channels") if k.kind == "dwconv" else (
            k.gemm.n, "output channels" + (" per group" if k.gemm.groups > 1 else ""))
        use = target.lane_use(k) if hasattr(target, "lane_use") else LaneUse(
            k.name, k.kind, what, size, target.parallelism_factor)
        if use is not None and use.idle_in_last_fold:
            wasted.append(((1 - use.utilization) * k.macs, use.message()))
    wasted.sort(key=lambda item: -item[0])
    messages = [m for _, m in wasted[:limit]]
    if len(wasted) > limit:
        messages.append(f"... and {len(wasted) - limit} more kernels that leave lanes idle")
    return messages

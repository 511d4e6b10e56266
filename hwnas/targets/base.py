"""What a target is: something that measures a model's latency (and cycles where it has them).

Targets are how hwnas meets hardware: `cpu` (ONNX Runtime CPU, measured), `ort:<EP>` (any ORT
execution provider), `cmd:<command>` (an external program that measures on a device) and `npu-RxC`
(a simulated systolic array). The estimator is trained on a target's measurements; the search asks the
estimator, and the final model can be measured on the target itself.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx

from hwnas.graph.shapes import Shape
from hwnas.targets.fusion_rules import FusionRules, builtin_rules


@dataclass(frozen=True)
class Measurement:
    latency_ms: float
    cycles: int | None = None  # simulated targets only
    samples_ms: tuple[float, ...] = ()  # the individual timed runs, for measured targets
    details: dict = field(default_factory=dict, compare=False)


class Target(abc.ABC):
    """A named thing that measures latency. `parallelism_factor` is how many channels it processes at once."""

    name: str
    parallelism_factor: int
    simulated: bool = False  # a simulator gives the same number every time; measured targets are noisy
    latency_note: str = ""  # where a target's latency comes from when not from itself (every estimate says it)

    @property
    def estimator_name(self) -> str:
        """The shipped estimator this target's latency comes from: its own, unless it has no latency model."""
        return self.name

    def compare(self, models: Mapping[str, onnx.ModelProto], input_shapes: Mapping[str, Shape]) -> dict[str, Measurement]:
        """Measure several models for an A/B comparison (measured targets interleave them, sharing the noise)."""
        return {key: self.measure(model, input_shapes) for key, model in models.items()}

    @property
    def rules(self) -> FusionRules:
        """Which ops this target runs fused into one kernel (the estimator's decomposition).

        The default is what ONNX Runtime's CPU provider fuses at ORT_ENABLE_ALL (Conv+BN, Conv+activation,
        Conv+per-channel Mul/Add, Conv+Add): the closest guess for an unknown device.
        """
        return builtin_rules("cpu")

    @abc.abstractmethod
    def measure(self, model: onnx.ModelProto, input_shapes: Mapping[str, Shape]) -> Measurement:
        """Latency of `model` at the given input shapes."""

    def describe(self) -> dict:
        """The configuration every reported number names (DESIGN.md: numbers name their target config)."""
        return {"name": self.name, "parallelism_factor": self.parallelism_factor}

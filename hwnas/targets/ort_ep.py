"""`ort:<EP>[,key=value...]`: any ONNX Runtime execution provider, measured with the shared protocol.

This is how real NPUs and GPUs plug in (CUDA, TensorRT, QNN, CoreML, OpenVINO...):
`ort:CUDAExecutionProvider,device_id=0`. Options named like a measurement setting (warmup, repeats,
threads, isolate, min_seconds) and `pf` (the parallelism factor) are hwnas's; every other option is
handed to the provider as a provider option, as text.

The default parallelism factor is 8 for an EP hwnas knows nothing about, and for the CPU provider
the channel block of ORT's NCHWc kernels on this machine, read from ORT itself (`nchwc_block_size`).
The provider must be one that this onnxruntime build offers; if it then fails to initialise,
measuring fails rather than silently timing ORT's CPU fallback.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from hwnas.errors import BadInputError
from hwnas.graph.shapes import Shape
from hwnas.targets.base import Measurement, Target
from hwnas.targets.measure import (
    CPU_PROVIDER,
    MeasureSettings,
    Providers,
    environment,
    measure_interleaved,
    measure_model,
    parse_options,
    positive_int,
    profile_nodes,
    split_settings,
)

DEFAULT_PF = 8  # nothing is known about an arbitrary EP; 8 is the commonest SIMD width in float32 lanes


@functools.cache  # a fact about this machine and this onnxruntime build; it cannot change while we run
def nchwc_block_size() -> int:
    """How many channels ORT's CPU conv kernels process at once here: 8 with AVX2, 16 with AVX-512.

    With ORT_ENABLE_ALL, ORT rewrites convs to its blocked NCHWc layout and pads their channels to a
    multiple of the block (cpu.py says why that matters). Rather than guess the block from CPU flags,
    profile a 4-channel 1×1 conv (4: the alignment NCHWc needs) and read the width ORT padded its
    weight to. Where ORT does not use NCHWc (non-x86 builds) the weight stays 4 wide and the factor
    falls back to DEFAULT_PF.
    """
    channels = 4
    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [conv], "nchwc-probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 4, 4])],
        [numpy_helper.from_array(np.ones((channels, channels, 1, 1), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    timings = profile_nodes(model, {}, MeasureSettings(warmup=0, repeats=1, min_seconds=0))
    padded = max((t.input_shapes[1][0] for t in timings if t.op_type == "Conv"), default=channels)
    return padded if padded > channels else DEFAULT_PF


def default_parallelism_factor(provider: str) -> int:
    return nchwc_block_size() if provider == CPU_PROVIDER else DEFAULT_PF


def parse_ort_options(text: str, where: str) -> tuple[MeasureSettings, int | None, tuple[tuple[str, str], ...]]:
    """`repeats=50,pf=16,device_id=0` -> (measurement settings, pf or None, the provider options)."""
    settings, rest = split_settings(parse_options(text, where), where)
    pf = positive_int(rest, "pf", where)
    return settings, pf, tuple((k, v) for k, v in rest.items() if k != "pf")


@dataclass(frozen=True)
class OrtTarget(Target):
    provider: str
    provider_options: tuple[tuple[str, str], ...] = ()
    settings: MeasureSettings = MeasureSettings()
    pf: int | None = None  # None: the provider's default

    @property
    def parallelism_factor(self) -> int:
        return self.pf if self.pf is not None else default_parallelism_factor(self.provider)

    @property
    def providers(self) -> Providers:
        return ((self.provider, dict(self.provider_options)),) if self.provider_options else (self.provider,)

    @property
    def name(self) -> str:
        """The canonical spec: `get_target(t.name)` gives back an equal target."""
        return ",".join([f"ort:{self.provider}", *self.options()])

    def options(self) -> list[str]:
        """The spec's `key=value` options: provider options, then settings and pf where not the default."""
        pf = [f"pf={self.pf}"] if self.pf is not None else []
        return [f"{k}={v}" for k, v in self.provider_options] + self.settings.as_options() + pf

    @classmethod
    def from_spec(cls, spec: str) -> OrtTarget:
        head, _, text = spec.partition(":")
        if head.strip() != "ort":
            raise BadInputError(f"not an ort target: {spec!r}")
        provider, _, option_text = text.partition(",")
        provider = provider.strip()
        available = ort.get_available_providers()
        if not provider:
            raise BadInputError(f"ort: name an execution provider after 'ort:'; available: {', '.join(available)}")
        if provider not in available:
            raise BadInputError(
                f"ort: execution provider {provider!r} is not available in onnxruntime {ort.__version__}; "
                f"available: {', '.join(available)}"
            )
        settings, pf, provider_options = parse_ort_options(option_text, f"ort:{provider}")
        return cls(provider=provider, provider_options=provider_options, settings=settings, pf=pf)

    def measure(self, model: onnx.ModelProto, input_shapes: Mapping[str, Shape]) -> Measurement:
        return measure_model(model, input_shapes, self.settings, self.providers)

    def compare(self, models: Mapping[str, onnx.ModelProto], input_shapes: Mapping[str, Shape]) -> dict[str, Measurement]:
        return measure_interleaved(models, input_shapes, self.settings, self.providers)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "provider": self.provider,
            "provider_options": dict(self.provider_options),
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "threads": self.settings.threads,
            **environment(),
            "settings": dataclasses.asdict(self.settings),
        }

"""`cpu`: ONNX Runtime's CPU execution provider on this machine, measured (docs/measurement.md).

The same thing as `ort:CPUExecutionProvider` under its short name: ORT's default graph optimizations
(ORT_ENABLE_ALL) and 1 intra-op thread unless the spec says otherwise:
`cpu:threads=2,repeats=50,warmup=10,min_seconds=0.5,isolate=1` (and `pf=N` to override the
parallelism factor below).

Parallelism factor: the channel block of ORT's NCHWc kernels on this machine (`nchwc_block_size`,
read from ORT): 8 with AVX2 (one 256-bit register of float32), 16 with AVX-512. With ORT_ENABLE_ALL,
ORT rewrites convs to this blocked layout when their channel counts are multiples of 4 and pads the
channels to a multiple of the block internally; other convs take a plain path on which a 3×3
depthwise conv is ~2.8× slower per MAC (DESIGN.md, measured facts). So latency steps at multiples of
the block: on an AVX-512 host a 3×3 depthwise conv at 56×56 takes ~185 µs for 36 to 48 channels,
~230 µs for 52 to 64, and 480 µs for 65; 1×1 convs step the same way. The factor is the block, not
a fixed 8, because the same wheel runs 8-wide on one machine and 16-wide on the next.
"""

from __future__ import annotations

from dataclasses import dataclass

from hwnas.errors import BadInputError
from hwnas.targets.measure import CPU_PROVIDER, MEASURE_OPTIONS
from hwnas.targets.ort_ep import OrtTarget, parse_ort_options


@dataclass(frozen=True)
class CpuTarget(OrtTarget):
    provider: str = CPU_PROVIDER  # parallelism_factor: nchwc_block_size(), for the reason above

    @property
    def name(self) -> str:
        """The canonical spec: `get_target(t.name)` gives back an equal target."""
        options = self.options()
        return "cpu" + (":" + ",".join(options) if options else "")

    @classmethod
    def from_spec(cls, spec: str) -> CpuTarget:
        head, _, text = spec.partition(":")
        if head.strip() != "cpu":
            raise BadInputError(f"not a cpu target: {spec!r}")
        settings, pf, unknown = parse_ort_options(text, "cpu")
        if unknown:
            allowed = ", ".join([*MEASURE_OPTIONS, "pf"])
            raise BadInputError(f"cpu: unknown option(s) {', '.join(k for k, _ in unknown)}; allowed: {allowed}")
        return cls(settings=settings, pf=pf)

"""Which machine a measurement was taken on, and what makes another machine run other code.

A measured estimator (`cpu`, `ort:<EP>`) fits the machine it was profiled on: ORT's CPU kernels (MLAS)
dispatch on the instruction sets the CPU has, and the caches decide what a kernel of a given size costs.
An estimator profiled on one of the two x86 machines this project was profiled on missed models on the other
by tens of percent (benchmarks/studies/estimator-history.md, 2026-12-06), so an estimator used on a machine it
was not profiled on says so instead of being quietly wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import onnxruntime as ort

# What MLAS picks kernels by on x86 (float, int8 GEMM/conv, bf16/fp16 paths); other flags do not change
# which code ORT runs.
KERNEL_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass  # not Linux
    return None


def cpu_model() -> str:
    # platform.processor() is often empty too, so say so plainly where /proc/cpuinfo is missing
    return _cpuinfo_field("model name") or "unknown"


def kernel_isa() -> tuple[str, ...] | None:
    """The KERNEL_ISA flags this CPU has, or None where the flags cannot be read (not Linux)."""
    flags = _cpuinfo_field("flags")
    return None if flags is None else tuple(f for f in KERNEL_ISA if f in flags.split())


@dataclass(frozen=True)
class Machine:
    """A measurement's machine: CPU model, its kernel instruction sets, logical CPUs, ORT version.

    `isa` is None where it was not recorded (estimators profiled before 2026-12-06 name only the CPU)."""

    cpu: str
    isa: tuple[str, ...] | None
    logical_cpus: int | None
    onnxruntime: str | None

    @classmethod
    def current(cls) -> Machine:
        return cls(cpu_model(), kernel_isa(), os.cpu_count(), ort.__version__)

    @classmethod
    def from_entry(cls, entry: Mapping) -> Machine:
        isa = entry.get("isa")
        return cls(str(entry.get("cpu", "unknown")), None if isa is None else tuple(isa),
                   entry.get("logical_cpus"), entry.get("onnxruntime"))

    def to_entry(self) -> dict:
        return {"cpu": self.cpu, "isa": None if self.isa is None else list(self.isa),
                "logical_cpus": self.logical_cpus, "onnxruntime": self.onnxruntime}

    def distance(self, other: Machine) -> tuple[int, int, int]:
        """How far `other` is from this machine, to pick the nearest estimator where none fits: another CPU model
        first (microarchitecture and caches: a denormal weight costs an Intel Xeon tens of ns and an AMD EPYC
        nothing), then how many kernel instruction sets one has and the other lacks, then the other fields.
        What either side did not record counts as equal, as in `differences`."""
        isa = 0 if self.isa is None or other.isa is None else len(set(self.isa) ^ set(other.isa))
        others = sum(None not in (a, b) and a != b for a, b in ((self.logical_cpus, other.logical_cpus),
                                                                (self.onnxruntime, other.onnxruntime)))
        return int(self.cpu != other.cpu), isa, others

    def differences(self, other: Machine) -> list[str]:
        """How `other` differs from this machine, field by field; a field either side lacks is not compared."""
        found = []
        if self.cpu != other.cpu:
            found.append(f"CPU {other.cpu!r}, not {self.cpu!r}")
        if self.isa is not None and other.isa is not None and self.isa != other.isa:
            gained = [f for f in other.isa if f not in self.isa]
            lost = [f for f in self.isa if f not in other.isa]
            found.append("instruction sets " + ", ".join(["+" + f for f in gained] + ["-" + f for f in lost]))
        if None not in (self.logical_cpus, other.logical_cpus) and self.logical_cpus != other.logical_cpus:
            found.append(f"{other.logical_cpus} logical CPUs, not {self.logical_cpus}")
        if None not in (self.onnxruntime, other.onnxruntime) and self.onnxruntime != other.onnxruntime:
            found.append(f"onnxruntime {other.onnxruntime}, not {self.onnxruntime}")
        return found

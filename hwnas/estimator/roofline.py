"""What a kernel outside the profiled distribution costs: a roofline from the target's own measurements.

A regressor's boosted correction holds its value at the edge of the range it was fitted on, so beyond
the profiled sizes (a 10k-class Gemm, a 500 MB transpose) it is a guess. There the estimator uses what
physics says instead:

    t = max(macs / P, elements / B(elements)) + c_kind

- `P`, the peak compute throughput: a high quantile (p99) of MACs per ms over every measured kernel;
- `B(e)`, the memory throughput at working set `e` (input + weights + output elements): a high quantile
  (p95) of elements per ms over the measured kernels whose working set lies within 4x of `e` (the
  largest ones where none is that big), so a kernel far beyond the last-level cache gets the DRAM
  throughput the large profiled kernels reached, and a small one the cache's;
- `c_kind`, the fixed cost per kernel of its kind: the constant term of its kind's non-negative linear
  baseline (`regressor.KernelRegressor`), the median over kinds for a kind never measured.

Beyond the profiled sizes the estimator takes the larger of this and the kind's linear baseline (non-
negative least squares on the work features, which extrapolates linearly): on a simulated array the
baseline's fold steps are the array's own formula (a depthwise conv's lanes stand idle, which a
peak-throughput roofline misses by 30x), and on a CPU the roofline's DRAM throughput is what a
164 MB Gemm is bound by, which a baseline fitted on cache-sized kernels misses by 2.8x. Both being
lower-bound style terms, the larger is the better bound (`LatencyEstimator.predict_kernels`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hwnas.targets.kernels import Kernel

_COMPUTE_QUANTILE = 99
_MEMORY_QUANTILE = 95
_NEIGHBOURHOOD = 4.0  # working sets within this factor count as "the same size"
_MIN_NEIGHBOURS = 5


def working_set(kernel: Kernel) -> int:
    return kernel.input_elements + kernel.weight_elements + kernel.output_elements


@dataclass(frozen=True)
class Roofline:
    peak_macs_per_ms: float
    sizes: np.ndarray  # every measured kernel's working set (elements), ascending
    throughput: np.ndarray  # its elements per ms, in the same order
    fixed_ms: Mapping[str, float]  # per kind

    @classmethod
    def from_measurements(cls, kernels: Sequence[Kernel], latency_ms: Sequence[float],
                          fixed_ms: Mapping[str, float]) -> Roofline:
        live = [(k, t) for k, t in zip(kernels, latency_ms) if k.kind != "free" and t > 0]
        macs = np.array([k.macs / t for k, t in live if k.macs > 0])
        sizes = np.array([working_set(k) for k, _ in live], dtype=np.float64)
        throughput = np.array([working_set(k) / t for k, t in live], dtype=np.float64)
        order = np.argsort(sizes, kind="stable")
        return cls(float(np.percentile(macs, _COMPUTE_QUANTILE)) if len(macs) else 0.0, sizes[order], throughput[order],
                   dict(fixed_ms))

    def memory_throughput(self, elements: float) -> float:
        """Elements per ms the measured kernels of about this working set reached (`_MEMORY_QUANTILE`)."""
        lo = np.searchsorted(self.sizes, elements / _NEIGHBOURHOOD, side="left")
        hi = np.searchsorted(self.sizes, elements * _NEIGHBOURHOOD, side="right")
        if hi - lo < _MIN_NEIGHBOURS:  # beyond (or before) what was measured: the nearest end's kernels
            lo, hi = ((max(0, len(self.sizes) - _MIN_NEIGHBOURS), len(self.sizes)) if lo >= len(self.sizes) // 2
                      else (0, min(len(self.sizes), _MIN_NEIGHBOURS)))
        return float(np.percentile(self.throughput[lo:hi], _MEMORY_QUANTILE))

    def predict(self, kernels: Sequence[Kernel]) -> np.ndarray:
        default = float(np.median(list(self.fixed_ms.values()))) if self.fixed_ms else 0.0
        out = np.zeros(len(kernels))
        for i, k in enumerate(kernels):
            if k.kind == "free" or not len(self.sizes):
                continue
            elements = working_set(k)
            compute = k.macs / self.peak_macs_per_ms if self.peak_macs_per_ms > 0 else 0.0
            memory = elements / max(self.memory_throughput(elements), 1e-12)
            out[i] = max(compute, memory) + self.fixed_ms.get(k.kind, default)
        return out

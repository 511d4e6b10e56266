"""What a kernel outside the profiled distribution costs: a roofline from the target's own measurements.

A regressor's boosted correction holds its value at the edge of the range it was fitted on, so beyond
the profiled sizes (a 10k-class Gemm, a 500 MB transpose) it is a guess. There the estimator uses what
physics says instead:

    t = max(macs / P, elements / B(elements)) + c_kind

- `P`, the peak compute throughput: a high quantile (p99) of MACs per ms over every measured kernel;
- `B(e)`, the memory throughput at working set `e` (the bytes of input + weights + output, each tensor at its
  stored size: float elements at the target's bytes per element, int8 ones at 1): a high quantile (p95) of
  bytes per ms over the measured kernels whose working set lies within 4x of `e` (the largest ones where none
  is that big), so a kernel far beyond the last-level cache gets the DRAM throughput the large profiled
  kernels reached, and a small one the cache's. Bytes, not elements: counted in elements, a cpu profile's
  int8 kernels (1 byte each) made the large float ones look 4x faster than they run;
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


def working_set(kernel: Kernel, bytes_per_element: int = 4) -> int:
    """Bytes the kernel moves: float elements at `bytes_per_element`, the others at their stored size."""
    return kernel.bytes_moved(bytes_per_element)


@dataclass(frozen=True)
class Roofline:
    peak_macs_per_ms: float
    sizes: np.ndarray  # every measured kernel's working set (bytes), ascending
    throughput: np.ndarray  # its bytes per ms, in the same order
    fixed_ms: Mapping[str, float]  # per kind
    bytes_per_element: int = 4  # of a float element, on the target

    @classmethod
    def from_measurements(cls, kernels: Sequence[Kernel], latency_ms: Sequence[float],
                          fixed_ms: Mapping[str, float], bytes_per_element: int = 4) -> Roofline:
        live = [(k, t) for k, t in zip(kernels, latency_ms) if k.kind != "free" and t > 0]
        macs = np.array([k.macs / t for k, t in live if k.macs > 0])
        sizes = np.array([working_set(k, bytes_per_element) for k, _ in live], dtype=np.float64)
        throughput = np.array([working_set(k, bytes_per_element) / t for k, t in live], dtype=np.float64)
        order = np.argsort(sizes, kind="stable")
        return cls(float(np.percentile(macs, _COMPUTE_QUANTILE)) if len(macs) else 0.0, sizes[order], throughput[order],
                   dict(fixed_ms), bytes_per_element)

    def memory_throughput(self, size: float) -> float:
        """Bytes per ms the measured kernels of about this working set reached (`_MEMORY_QUANTILE`)."""
        lo = np.searchsorted(self.sizes, size / _NEIGHBOURHOOD, side="left")
        hi = np.searchsorted(self.sizes, size * _NEIGHBOURHOOD, side="right")
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
            size = working_set(k, self.bytes_per_element)
            compute = k.macs / self.peak_macs_per_ms if self.peak_macs_per_ms > 0 else 0.0
            memory = size / max(self.memory_throughput(size), 1e-12)
            out[i] = max(compute, memory) + self.fixed_ms.get(k.kind, default)
        return out

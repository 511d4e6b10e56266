"""Latency and memory estimation over the kernels a target runs (cut by `hwnas.targets.kernels` under
the target's fusion rules): per-kernel regressors (`estimator`), features, profiling, memory footprint."""

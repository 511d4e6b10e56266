"""Latency and memory estimation: graph → kernels (`kernels`), fusion rules per target (`fusion_rules`)."""

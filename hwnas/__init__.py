"""hwnas: an accelerator-aware ONNX optimizer.

    import hwnas
    result = hwnas.optimize("model.onnx", target="npu-32x32")
    print(result.latency_reduction, result.to_dict()["pipeline"])

The functions and result types here are `hwnas.api`'s (docs/api.md). They are imported on first use,
so `import hwnas` (and with it `hwnas --help`) does not load ONNX Runtime and the estimators.
"""

from importlib import import_module

from hwnas.errors import BadInputError, CheckFailedError, HwnasError
from hwnas.version import __version__

# name -> the module that defines it (hwnas.api imports the others from where they live)
_LAZY = {
    "optimize": "hwnas.api",
    "estimate": "hwnas.api",
    "check": "hwnas.api",
    "run": "hwnas.api",
    "profile": "hwnas.api",
    "hints": "hwnas.api",
    "OptimizeReport": "hwnas.api",
    "RunResult": "hwnas.api",
    "EstimateResult": "hwnas.api",
    "CheckResult": "hwnas.api",
    "CheckItem": "hwnas.gate",
    "Hint": "hwnas.api",
    "ProfileReport": "hwnas.estimator.profile",
    "LatencyEstimator": "hwnas.api",
}

__all__ = [*_LAZY, "BadInputError", "CheckFailedError", "HwnasError", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hwnas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

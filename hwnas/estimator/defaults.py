"""The estimators that ship with hwnas, one per preset target, loaded on first use.

`data/estimators/<target name>.json` holds a target's kernel measurements (and `.fitted.npz` the fitted
trees). The npu presets are profiled on the simulator; `cpu` was profiled on a 2-core x86 machine and
only fits machines like it (re-profile with `hwnas profile --target cpu -o DIR`, then pass
`--estimator DIR/cpu.json`).
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from hwnas.errors import BadInputError
from hwnas.estimator.estimator import LatencyEstimator
from hwnas.targets.base import Target

_DATA = "data/estimators"


def shipped_estimators() -> list[str]:
    folder = resources.files("hwnas.estimator") / _DATA
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json")) if folder.is_dir() else []


@functools.lru_cache(maxsize=8)
def _load_shipped(name: str) -> LatencyEstimator:
    path = Path(str(resources.files("hwnas.estimator") / _DATA / f"{name}.json"))
    return LatencyEstimator.load(path)


def estimator_for(target: Target, path: str | Path | None = None) -> LatencyEstimator:
    """The user's estimator file if given, else the one shipped for this target's name."""
    if path is not None:
        estimator = LatencyEstimator.load(path)
        if estimator.target != target.name:
            raise BadInputError(f"estimator {path} was profiled on {estimator.target!r}, not on target {target.name!r}")
        return estimator
    if target.estimator_name in shipped_estimators():
        return _load_shipped(target.estimator_name)
    raise BadInputError(
        f"no estimator ships for target {target.name!r} (shipped: {', '.join(shipped_estimators()) or 'none'}); "
        f"run 'hwnas profile --target {target.name} -o DIR' and pass --estimator DIR/{target.name}.json"
    )

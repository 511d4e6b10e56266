"""The estimators that ship with hwnas, one per preset target, loaded on first use.

`data/estimators/<target name>.json` holds a target's kernel measurements (and `.fitted.npz` the fitted
trees). The npu presets are profiled on the simulator. A measured target's estimator only fits the machine it
was profiled on (`hwnas.targets.machine`): `cpu` ships one per machine the project was profiled on, `cpu.json`
and `cpu@<machine>.json`, and the one whose machine is this one is used (else `cpu.json`, with a warning from
`machine_warnings`: re-profile with `hwnas profile --target cpu -o DIR`, then pass `--estimator DIR/cpu.json`).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path

from hwnas.errors import BadInputError
from hwnas.estimator.estimator import LatencyEstimator
from hwnas.targets.base import Target
from hwnas.targets.machine import Machine

_DATA = "data/estimators"


def shipped_estimators() -> list[str]:
    folder = resources.files("hwnas.estimator") / _DATA
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json")) if folder.is_dir() else []


def _shipped_path(name: str) -> Path:
    return Path(str(resources.files("hwnas.estimator") / _DATA / f"{name}.json"))


@functools.lru_cache(maxsize=8)
def _load_shipped(name: str) -> LatencyEstimator:
    return LatencyEstimator.load(_shipped_path(name))


@functools.lru_cache(maxsize=8)
def shipped_for_this_machine(name: str) -> str:
    """Among the shipped `name` and its `name@<machine>` variants, the one profiled on this machine, else the nearest
    (`Machine.distance`: the same CPU model first; ties go to `name`), which then warns that it is another machine's.
    Nearest, not `name`: on an Intel Xeon whose hypervisor hides AMX the AMD EPYC default missed the detectors'
    denormal assists (−61 … −69 %), the other Xeon's variant did not."""
    variants = [v for v in shipped_estimators() if v.startswith(name + "@")]
    if not variants:
        return name
    here = Machine.current()

    def distance(variant: str) -> tuple[int, int, int]:
        entry = _target_config(_shipped_path(variant)).get("machine")
        return Machine.from_entry(entry or {}).distance(here)  # no entry: an unknown CPU

    return min([name, *variants], key=distance)


# `LatencyEstimator.save` writes the settings (indented JSON, one top-level key a line) before the samples
_TARGET_CONFIG_KEY = '\n  "target_config": '


def _target_config(path: Path) -> dict:
    """An estimator file's `target_config`, decoded alone where the file has it as `save` writes it: the whole
    3 MB file took ~45 ms to parse per variant on every `--target cpu` run, for the few lines the pick reads."""
    text = path.read_text(encoding="utf-8")
    start = text.find(_TARGET_CONFIG_KEY)
    if start < 0:
        return json.loads(text).get("target_config", {})
    return json.JSONDecoder().raw_decode(text, start + len(_TARGET_CONFIG_KEY))[0]


def machine_warnings(estimator: LatencyEstimator) -> list[str]:
    """One line when a measured estimator was profiled on another machine than this one, else none."""
    entry = estimator.target_config.get("machine")
    differences = Machine.from_entry(entry).differences(Machine.current()) if entry else []
    if not differences:
        return []
    return [f"the {estimator.target} estimator was profiled on another machine (here: {'; '.join(differences)}): its "
            f"estimates can be tens of percent off on this one; profile it with 'hwnas profile --target "
            f"{estimator.target} -o DIR' (for one model's family, in a minute or two: 'hwnas profile --target "
            f"{estimator.target} --around MODEL -o DIR') and pass --estimator DIR/{estimator.target}.json"]


def estimator_for(target: Target, path: str | Path | None = None) -> LatencyEstimator:
    """The user's estimator file if given, else the one shipped for this target's name."""
    if path is not None:
        estimator = LatencyEstimator.load(path)
        if estimator.target != target.name:
            raise BadInputError(f"estimator {path} was profiled on {estimator.target!r}, not on target {target.name!r}")
        return estimator
    if target.estimator_name in shipped_estimators():
        return _load_shipped(shipped_for_this_machine(target.estimator_name))
    raise BadInputError(
        f"no estimator ships for target {target.name!r} (shipped: {', '.join(shipped_estimators()) or 'none'}); "
        f"run 'hwnas profile --target {target.name} -o DIR' and pass --estimator DIR/{target.name}.json"
    )

"""Profiles against several median sets at once: each profile's overall level, and its errors with the level divided out.

On a VM whose host moves the machine's speed by up to 1.5x for minutes, a profile lands at the level its minutes had
(estimator-history.md, stop 34). This scores cpu estimator files against the per-model median of several `--measured`
files of `benchmarks/estimator_accuracy.py` (the consensus), raw and levelled: the level is the median ratio of
prediction to consensus over the held-out models, and "levelled" divides it out, which leaves what the profile gets
wrong model against model. Offline: each estimator file is refitted from its samples with the working tree's code
(a copy without its fitted arrays), nothing is timed.

    python benchmarks/studies/profile_levels.py --estimators DIR1/cpu.json DIR2/cpu.json \\
        --measured benchmarks/results/estimator/measured-2026-12-06-xeon*.json [--per-model]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import estimator_accuracy as accuracy  # noqa: E402

from hwnas.estimator.estimator import LatencyEstimator  # noqa: E402


def scores(errors_pct: np.ndarray) -> str:
    """within ±5 % / within ±10 % / MAPE"""
    return f"{np.mean(abs(errors_pct) <= 5):.0%} / {np.mean(abs(errors_pct) <= 10):.0%} / {np.mean(abs(errors_pct)):.1f} %"


def levelled_errors(predicted: dict[str, float], consensus: dict[str, float]) -> tuple[float, np.ndarray, np.ndarray]:
    """(level, raw errors %, levelled errors %) over the consensus's models: the level is the median ratio of
    prediction to consensus, minus 1; levelled errors are those of the predictions divided by it."""
    log_ratio = np.array([np.log(predicted[name] / ms) for name, ms in consensus.items()])
    level = float(np.median(log_ratio))
    return float(np.exp(level) - 1), (np.exp(log_ratio) - 1) * 100, (np.exp(log_ratio - level) - 1) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimators", nargs="+", required=True, metavar="JSON", help="cpu estimator files")
    parser.add_argument("--measured", nargs="+", required=True, metavar="JSON", help="median sets of estimator_accuracy.py")
    parser.add_argument("--per-model", action="store_true", help="each model's raw error under each profile too")
    args = parser.parse_args()
    medians = [json.loads(Path(p).read_text())["measured_ms"] for p in args.measured]
    models = [m for m in accuracy.held_out_models() if all(m.name in s for s in medians)]
    consensus = {m.name: float(np.median([s[m.name] for s in medians])) for m in models}
    for path, s in zip(args.measured, medians):
        own = np.array([s[m.name] / consensus[m.name] - 1 for m in models]) * 100
        print(f"{Path(path).name}: against the consensus {scores(own)}")
    print(f"\n{len(models)} models; profile: level, raw, levelled (within ±5 % / ±10 % / MAPE)")
    errors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(args.estimators):
            copy = Path(tmp) / f"{i}.json"  # without its fitted arrays: refitted by this code
            shutil.copy(path, copy)
            predicted, _ = accuracy.predict(LatencyEstimator.load(copy), models)
            level, errors[path], levelled = levelled_errors(predicted, consensus)
            print(f"{path}: {level:+.1%}, {scores(errors[path])}, {scores(levelled)}")
    if args.per_model:
        print("\nmodel | consensus ms | " + " | ".join(str(i) for i in range(len(args.estimators))))
        for j, m in enumerate(models):
            print(f"{m.name} | {consensus[m.name]:.3f} | " + " | ".join(f"{errors[p][j]:+.1f} %" for p in args.estimators))


if __name__ == "__main__":
    main()

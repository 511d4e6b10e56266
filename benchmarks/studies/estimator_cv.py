"""How well the cpu estimator's regressors predict kernels they were not fitted on, judged without timing.

Two views, both offline (no model is run):

1. Cross-validation on the estimator's own samples, by profiling network: the networks are split into
   `--folds` folds; each fold's kernels are predicted by an estimator refitted on the other folds (same
   code, same settings). Printed: per kernel kind (float and int8 apart) the median of log(predicted /
   measured) (its bias) and of its absolute value (its scatter), per measured-time bin of the float
   convs, depthwise convs and Gemms, and each network's kernels summed against their measured sum, by
   network latency (what the estimator does to a model: it adds kernels up). A change to the features,
   the regressor or its fitting is judged here first, on ~160 networks, over more than one `--seeds`
   split, before the held-out models see it.
2. `--measured FILE` (the file `estimator_accuracy.py --oracle --measured` writes: each held-out model's
   kernels timed in context on an idle machine): every held-out kernel's prediction against its
   in-context time, by kind, by the kernel's own time and by the model's measured latency. It tells a
   kernel-level error (it follows the kernel's size or shape) from a model-level one (it follows the
   model around the kernel, which no per-kernel feature sees).

    python benchmarks/studies/estimator_cv.py
    python benchmarks/studies/estimator_cv.py --seeds 0 1 --estimator DIR/cpu.json
    python benchmarks/studies/estimator_cv.py --measured benchmarks/results/estimator/measured.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hwnas.estimator.defaults import estimator_for
from hwnas.estimator.estimator import LatencyEstimator
from hwnas.targets import get_target

# measured-time bins (ms) for kernels, and latency bins for networks and models
KERNEL_BINS = (0.005, 0.02, 0.05, 0.2, 1.0)
NETWORK_BINS = (0.5, 1.5, 5.0, 15.0)
_COMPUTE = ("conv", "dwconv", "gemm")


def cross_validate(estimator: LatencyEstimator, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Each sample's prediction by an estimator fitted without its network's fold. Samples of no network
    (added by `profile --around`) are never held out."""
    samples = estimator.samples_
    networks = sorted({s.network for s in samples if s.network is not None})
    np.random.default_rng(seed).shuffle(networks)
    fold_of = {n: i % folds for i, n in enumerate(networks)}
    predicted = np.zeros(len(samples))
    for fold in range(folds):
        held = [i for i, s in enumerate(samples) if fold_of.get(s.network, -1) == fold]
        fitted = estimator.refitted([s for s in samples if fold_of.get(s.network, -1) != fold])
        for i, e in zip(held, fitted.predict_kernels([samples[i].kernel for i in held])):
            predicted[i] = e.latency_ms
    return predicted


def _log_ratio(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(predicted, 1e-9) / np.maximum(measured, 1e-9))


def _row(label: str, log_ratio: np.ndarray) -> str:
    return f"| {label} | {len(log_ratio)} | {np.median(log_ratio):+.3f} | {np.median(np.abs(log_ratio)):.3f} |"


def _bin_label(value: float, bins: Sequence[float]) -> str:
    lower = max((b for b in bins if b <= value), default=0.0)
    upper = min((b for b in bins if b > value), default=math.inf)
    return f"[{lower:g}, {upper:g})"


def cv_tables(estimator: LatencyEstimator, predicted: np.ndarray) -> str:
    """Markdown: bias and scatter per kind, per time bin of the float compute kernels, and per-network sums."""
    samples = estimator.samples_
    measured = np.array([s.latency_ms for s in samples])
    ratio = _log_ratio(predicted, measured)
    live = np.array([s.kernel.kind != "free" for s in samples])
    lines = ["| kind | kernels | bias (median log pred/measured) | scatter (median abs) |", "|---|---|---|---|"]
    kinds = sorted({(s.kernel.kind, s.kernel.int8) for s in samples if s.kernel.kind != "free"})
    for kind, int8 in kinds:
        mask = np.array([(s.kernel.kind, s.kernel.int8) == (kind, int8) for s in samples])
        lines.append(_row(kind + (" int8" if int8 else ""), ratio[mask]))
    lines += ["", "| float conv/dwconv/gemm, measured ms | kernels | bias | scatter |", "|---|---|---|---|"]
    compute = np.array([s.kernel.kind in _COMPUTE and not s.kernel.int8 for s in samples])
    by_bin: dict[str, list[int]] = defaultdict(list)
    for i in np.flatnonzero(compute):
        by_bin[_bin_label(measured[i], KERNEL_BINS)].append(int(i))
    lines += [_row(label, ratio[idx]) for label, idx in sorted(by_bin.items(), key=lambda kv: float(kv[0][1:].split(",")[0]))]
    network_ms: dict[int, float] = {}  # each network's plain run, as its samples carry it
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for s, p, ok in zip(samples, predicted, live):
        if ok and s.network is not None:
            sums[s.network][0] += p
            sums[s.network][1] += s.latency_ms
            if s.network_ms is not None:
                network_ms[s.network] = s.network_ms
    if sums:
        lines += ["", "| network latency ms | networks | kernel sums: bias | scatter | within ±5 % | within ±10 % |",
                  "|---|---|---|---|---|---|"]
        groups: dict[str, list[float]] = defaultdict(list)
        for network, (p, m) in sums.items():
            latency = network_ms.get(network, m)
            groups[_bin_label(latency, NETWORK_BINS)].append(math.log(p / m))
            groups["all"].append(math.log(p / m))
        for label, values in sorted(groups.items(), key=lambda kv: math.inf if kv[0] == "all" else float(kv[0][1:].split(",")[0])):
            v = np.array(values)
            err = np.abs(np.expm1(v))
            lines.append(f"| {label} | {len(v)} | {np.median(v):+.3f} | {np.median(np.abs(v)):.3f} | "
                         f"{np.mean(err <= 0.05):.0%} | {np.mean(err <= 0.10):.0%} |")
    return "\n".join(lines)


def held_out_kernel_tables(estimator: LatencyEstimator, measured_path: str | Path) -> str:
    """Markdown: each held-out model's kernels predicted against their in-context times in `measured_path`."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import estimator_accuracy  # noqa: PLC0415  (a script beside studies/, imported only for this view)

    from hwnas.targets.kernels import decompose

    stored = json.loads(Path(measured_path).read_text())
    in_context = stored.get("oracle_kernels_ms")
    if not in_context:
        raise SystemExit(f"error: {measured_path} has no in-context kernel times (write it with --oracle)")
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for m in estimator_accuracy.held_out_models():
        times = in_context.get(m.name)
        if times is None:
            continue
        kernels = decompose(m.model, m.shapes, estimator.rules)
        model_bin = _bin_label(stored["measured_ms"][m.name], NETWORK_BINS)
        for k, e in zip(kernels, estimator.predict_kernels(kernels)):
            t = times.get(k.name)
            if k.kind == "free" or not t or t <= 0:
                continue
            r = math.log(max(e.latency_ms, 1e-9) / t)
            kind = k.kind + (" int8" if k.int8 else "")
            groups[("kind", kind)].append(r)
            if k.kind in _COMPUTE:
                groups[("kernel ms", _bin_label(t, KERNEL_BINS))].append(r)
                groups[("model ms", model_bin)].append(r)
    lines = ["| held-out kernels by | group | kernels | bias (median log pred/in context) | scatter |", "|---|---|---|---|---|"]
    for (by, label), values in sorted(groups.items()):
        v = np.array(values)
        lines.append(f"| {by} | {label} | {len(v)} | {np.median(v):+.3f} | {np.median(np.abs(v)):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimator", help="cpu estimator file (default: the shipped one)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="fold splits (default 0)")
    parser.add_argument("--measured", metavar="JSON", help="also the held-out kernels against their in-context times")
    args = parser.parse_args()
    estimator = estimator_for(get_target("cpu"), args.estimator)
    for seed in args.seeds:
        print(f"**{args.folds}-fold cross-validation by profiling network, split seed {seed}** "
              f"({len(estimator.samples_)} samples)\n")
        print(cv_tables(estimator, cross_validate(estimator, args.folds, seed)))
        print()
    if args.measured:
        print(held_out_kernel_tables(estimator, args.measured))


if __name__ == "__main__":
    main()

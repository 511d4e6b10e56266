"""How much this machine's speed moves while nothing else runs: fixed models, measured again and again.

Each round measures every model with the `cpu` target's protocol (warm, back to back, median); the rounds
follow each other for `--minutes`. Printed per model: the median over the rounds, the lowest and highest
round and the 10th / 90th percentiles relative to it, and the share of rounds within ±5 % of it. An
estimator cannot be closer to one measurement than the measurements are to each other, so run this before
reading much into a ±5 % score (docs/estimator.md, "Where this leaves the cpu goals"). On a VM the
last-level cache and memory bandwidth are shared with other tenants of the host, whose load no `uptime`
here shows.

    python benchmarks/studies/machine_drift.py                     # 5 minutes, three zoo models
    python benchmarks/studies/machine_drift.py --minutes 10 --models mobilenetv2:width=0.5,resolution=128 ibn-detector
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from hwnas.graph.shapes import resolve_input_shapes
from hwnas.models import build
from hwnas.targets.measure import MeasureSettings, measure_model

DEFAULT_MODELS = ("mobilenetv2:width=0.5,resolution=128", "mobilenetv2:resolution=192", "ibn-detector:resolution=384")
_OPTION_TYPES = {"width": float, "resolution": int, "divisor": int}


def parse_model(spec: str) -> tuple[str, dict]:
    """`NAME[:key=value,...]` (width, resolution, divisor; as a target's options are written) → (name, options)."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in _OPTION_TYPES or not value:
            raise ValueError(f"{item!r} is not one of {', '.join(k + '=...' for k in _OPTION_TYPES)}")
        options[key] = _OPTION_TYPES[key](value)
    return name, options


def _model_spec(spec: str) -> str:
    """argparse check: a spec `parse_model` reads and the zoo knows."""
    try:
        name, options = parse_model(spec)
        build(name, **options)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{spec!r}: {e} (expected NAME[:width=W,resolution=R,divisor=D])") from None
    return spec


def drift(specs: list[str], minutes: float, settings: MeasureSettings) -> tuple[dict[str, list[float]], list[float]]:
    """Each model's latency (ms) per round, and the 1-minute load average before each round."""
    models = {spec: build(name, **options) for spec, (name, options) in ((s, parse_model(s)) for s in specs)}
    shapes = {spec: resolve_input_shapes(model) for spec, model in models.items()}
    rounds: dict[str, list[float]] = {spec: [] for spec in specs}
    load: list[float] = []
    end = time.monotonic() + 60 * minutes
    while time.monotonic() < end or not load:
        load.append(os.getloadavg()[0])
        for spec, model in models.items():
            rounds[spec].append(measure_model(model, shapes[spec], settings).latency_ms)
    return rounds, load


def markdown(rounds: dict[str, list[float]], load: list[float]) -> str:
    lines = [f"{len(load)} rounds; 1-minute load average {min(load):.2f}–{max(load):.2f}", "",
             "| model | median ms | lowest round | 10th percentile | 90th percentile | highest round "
             "| rounds within ±5 % of the median |",
             "|---|---|---|---|---|---|---|"]
    for spec, values in rounds.items():
        v = np.asarray(values)
        med = float(np.median(v))
        within = float(np.mean(np.abs(v / med - 1) <= 0.05))
        p10, p90 = np.percentile(v, [10, 90]) / med - 1
        lines.append(f"| {spec} | {med:.3f} | {v.min() / med - 1:+.1%} | {p10:+.1%} | {p90:+.1%} | "
                     f"{v.max() / med - 1:+.1%} | {within:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=_model_spec, default=list(DEFAULT_MODELS),
                        help="zoo models as NAME[:width=W,resolution=R,divisor=D]")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per model and round, at least (default 20)")
    args = parser.parse_args()
    settings = MeasureSettings(warmup=5, repeats=args.repeats, threads=1)
    print(markdown(*drift(args.models, args.minutes, settings)))


if __name__ == "__main__":
    main()

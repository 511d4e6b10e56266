"""Where the cpu estimator is wrong inside one model: every kernel timed in context against its prediction.

The model is run the way profiling runs its random networks (`hwnas.estimator.attribution.measure_in_context`:
ORT's per-node profiler, warm, 1 thread, each node's time attributed to its kernel, the measured per-node
overheads corrected), so each kernel's measured time is what a profiling sample of it would have been.
Printed: the model's plain run, the kernels' measured and predicted sums, errors summed by kernel kind and
op, and the kernels with the largest absolute errors. A whole-model error that comes from one kind of
kernel (e.g. depthwise convs at high resolution, or a classifier whose weights leave the cache in a big
model) shows here, where `estimator_accuracy.py` only shows the total.

    python benchmarks/studies/estimator_kernels.py mobilenetv2 --width 1.0 --resolution 192
    python benchmarks/studies/estimator_kernels.py --model M.onnx [--input-shape x:1x3x224x224] [--estimator DIR/cpu.json]

Run it on a quiet machine: a neighbour on the other core slows memory-bound kernels.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from hwnas.cli import parse_input_shapes
from hwnas.estimator.defaults import estimator_for
from hwnas.estimator.attribution import measure_in_context, measure_node_overheads
from hwnas.graph.io import load_model
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.models import build
from hwnas.targets import get_target


def kernel_errors(model, shapes, estimator_path: str | None = None, worst: int = 12) -> str:
    """Markdown: measured-in-context vs predicted, per kind and for the `worst` kernels."""
    target = get_target("cpu")
    estimator = estimator_for(target, estimator_path)
    overheads = measure_node_overheads(target.settings, target.providers)
    profile = measure_in_context(model, shapes, estimator.rules, target.settings, target.providers, overheads)
    predicted = estimator.predict_kernels(list(profile.kernels))
    rows = list(zip(profile.kernels, profile.latency_ms, (p.latency_ms for p in predicted)))
    by_kind: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for kernel, measured, guess in rows:
        totals = by_kind[(kernel.kind, kernel.op)]
        totals[0] += 1
        totals[1] += measured
        totals[2] += guess
    measured_sum, predicted_sum = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines = [
        f"plain run {profile.total_ms:.3f} ms; kernels measured in context {measured_sum:.3f} ms, predicted "
        f"{predicted_sum:.3f} ms ({100 * (predicted_sum / measured_sum - 1):+.1f} %)",
        "",
        "| kind | op | kernels | measured ms | predicted ms | error |",
        "|---|---|---|---|---|---|",
    ]
    for (kind, op), (count, measured, guess) in sorted(by_kind.items(), key=lambda item: -item[1][1]):
        lines.append(f"| {kind} | {op} | {count} | {measured:.3f} | {guess:.3f} | {100 * (guess / measured - 1):+.1f} % |")
    lines += ["", "| kernel | kind | measured ms | predicted ms | error |", "|---|---|---|---|---|"]
    for kernel, measured, guess in sorted(rows, key=lambda r: -abs(r[2] - r[1]))[:worst]:
        lines.append(f"| {kernel.name} | {kernel.kind} | {measured:.4f} | {guess:.4f} | {100 * (guess / measured - 1):+.1f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", nargs="?", help="a zoo model name (or give --model)")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--divisor", type=int)
    parser.add_argument("--model", help="an ONNX file instead of a zoo model")
    parser.add_argument("--input-shape", action="append", default=[], help="NAME:D0xD1x... for dynamic inputs")
    parser.add_argument("--estimator", help="a cpu estimator file (default: the shipped one)")
    parser.add_argument("--worst", type=int, default=12, help="kernels listed with the largest errors")
    args = parser.parse_args()
    if (args.zoo is None) == (args.model is None):
        parser.error("give a zoo model name or --model, not both")
    if args.model:
        model = load_model(args.model)
    else:
        options = {k: v for k, v in (("width", args.width), ("resolution", args.resolution),
                                     ("divisor", args.divisor)) if v is not None}
        model = build(args.zoo, **options)
    shapes = resolve_input_shapes(model, parse_input_shapes(args.input_shape))
    print(kernel_errors(model, shapes, args.estimator, args.worst))


if __name__ == "__main__":
    main()

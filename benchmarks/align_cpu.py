"""align-channels{multiple=8,mode=pad} on MobileNetV2 with unrounded channel counts, on ORT CPU.

ORT's blocked (NCHWc) conv kernels need channel counts that are multiples of 4, so a model whose
widths were scaled without rounding (zoo `--divisor 1`) takes a slow path in most layers. Zero-padding
every channel group to a multiple of 8 adds MACs but puts every conv back on the fast path; the pass is
exact, and this script checks that with ORT before timing.

Timing: `hwnas.targets.measure.measure_interleaved`, the `cpu` target's protocol: ORT default graph
optimizations (ORT_ENABLE_ALL), 1 intra-op thread, warm-up runs, then the input and the padded model
timed alternately in one process (A, B, A, B, ...), median of at least `--repeats` runs each.

    python benchmarks/align_cpu.py [--widths 0.9 1.3] [--resolution 224] [--repeats 30]

Prints a markdown table.
"""

from __future__ import annotations

import argparse

from hwnas import api
from hwnas.models import build
from hwnas.targets.measure import MeasureSettings, environment, measure_interleaved

PIPELINE = "align-channels{multiple=8,mode=pad}"


def row(width: float, resolution: int, settings: MeasureSettings) -> str:
    model = build("mobilenetv2", width=width, resolution=resolution, divisor=1)
    result = api.run(model, PIPELINE)  # raises CheckFailedError unless ORT finds it equivalent
    shapes = result.input_shapes
    times = measure_interleaved({"input": model, "padded": result.model}, shapes, settings)
    before, after = times["input"].latency_ms, times["padded"].latency_ms
    spread = max(times[key].details["spread"] for key in times)  # IQR / median, the noisier of the two
    base, padded = result.baseline, result.optimized
    groups = len(result.records[0].applied)
    return (
        f"| {width} | {groups} | {before:.2f} | {after:.2f} | {before / after:.2f}× | {spread:.0%} "
        f"| {base.params / 1e6:.2f} M → {padded.params / 1e6:.2f} M "
        f"| {base.macs / 1e6:.0f} M → {padded.macs / 1e6:.0f} M ({padded.macs / base.macs - 1:+.1%}) "
        f"| {result.verification.max_abs:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.9, 1.3])
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    settings = MeasureSettings(warmup=5, repeats=args.repeats, threads=1)
    env = environment()
    print(f"MobileNetV2, divisor 1, {args.resolution}², `{PIPELINE}`; ORT {env['onnxruntime']} CPU, "
          f"1 thread, default optimizations, interleaved, median of ≥ {args.repeats} runs; {env['cpu']}\n")
    print("| width | groups padded | input ms | padded ms | speed-up | spread | params | MACs | ORT max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for width in args.widths:
        print(row(width, args.resolution, settings), flush=True)


if __name__ == "__main__":
    main()

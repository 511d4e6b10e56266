"""int8 models outside the int8 benchmark, to choose between cpu estimators before one ships (a validation set).

Fourteen quantized zoo variants at widths and resolutions the int8 benchmark does not use, each as ORT's
`quantize_static` makes it (int8.py's peer) and as align-channels + the quantize pass do (what `optimize --quantize
int8` writes for them), are timed on their own as the `cpu` target measures a model (warm, back-to-back, in int8.py's
`ESTIMATE_ROUNDS` rounds of 30 over all the models, each model's runs through the quiet gate), and each estimator's prediction is scored against those times, raw and
at the timings' speed (scaled by the gate's level while that model was timed over the level the estimator's
profile recorded, as `estimate --at-speed-now` scales it). Between two timings of the same models hours apart the
int8 times moved ~10 % against the reference (estimator-history.md, stop 37): time and score in one sitting.

    python benchmarks/studies/int8_validation.py build DIR
    python benchmarks/studies/int8_validation.py time DIR            # -> DIR/timings.json
    python benchmarks/studies/int8_validation.py score DIR A/cpu.json [B/cpu.json ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import time_warm  # noqa: E402
from int8 import ESTIMATE_ROUNDS, ort_quantize_static  # noqa: E402

from hwnas import api, models  # noqa: E402
from hwnas.estimator.estimate import estimate  # noqa: E402
from hwnas.estimator.estimator import LatencyEstimator  # noqa: E402
from hwnas.estimator.profile import profiled_reference_ms  # noqa: E402
from hwnas.estimator.quiet import QuietGate, SpeedLevel  # noqa: E402
from hwnas.graph.shapes import resolve_input_shapes  # noqa: E402
from hwnas.passes.quantize import quantize_model  # noqa: E402
from hwnas.targets.measure import MeasureSettings  # noqa: E402

# (zoo model, width, divisor, resolution): none of them a model of benchmarks/int8.py
VARIANTS = [("mobilenetv2", 0.75, 8, 192), ("mobilenetv2", 1.4, 8, 224), ("mobilenetv2", 0.5, 1, 160),
            ("mobilenetv2", 1.0, 1, 160), ("ibn-detector", 0.75, 8, None), ("ibn-detector", 1.25, 1, None),
            ("segmenter", 0.75, 8, 384)]
QUANTIZERS = ("quantize_static", "hwnas")


def build(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for name, width, divisor, resolution in VARIANTS:
        tag = f"{name}-{width}-{divisor}-{resolution}"
        model = models.build(name, width=width, divisor=divisor, resolution=resolution)
        (input_name, shape), = resolve_input_shapes(model, None).items()
        calibration = {input_name: np.random.default_rng(0).normal(size=(4, *shape[1:])).astype(np.float32)}
        aligned = api.run(model, "align-channels{multiple=16,mode=pad}").model
        for quantizer, quantized in zip(QUANTIZERS, (ort_quantize_static(model, calibration), quantize_model(aligned, calibration))):
            onnx.save(quantized, out / f"{tag}-{quantizer}.onnx")
            index[f"{tag}-{quantizer}"] = {"file": f"{tag}-{quantizer}.onnx", "shapes": {input_name: list(shape)}}
        print(tag, flush=True)
    (out / "models.json").write_text(json.dumps(index, indent=1) + "\n")


def _models(out: Path) -> dict[str, tuple[onnx.ModelProto, dict]]:
    index = json.loads((out / "models.json").read_text())
    return {key: (onnx.load(out / entry["file"]), {k: tuple(v) for k, v in entry["shapes"].items()})
            for key, entry in index.items()}


def time_all(out: Path) -> None:
    """Rounds over all the models (static input shapes), each model's level as `time_warm` records it."""
    models = {key: model for key, (model, _) in _models(out).items()}
    timed = time_warm(models, {}, MeasureSettings(warmup=5, repeats=30), ESTIMATE_ROUNDS, QuietGate(MeasureSettings(threads=1)))
    timings = {key: {"ms": m.latency_ms, "level_ms": m.details["reference_ms"]} for key, m in timed.items()}
    for key, t in timings.items():
        print(f"{key}: {t['ms']:.3f} ms, reference at {t['level_ms']:.4f} ms")
    (out / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")


def score(out: Path, estimators: list[str]) -> None:
    timings = json.loads((out / "timings.json").read_text())
    loaded = _models(out)
    for path in estimators:
        estimator = LatencyEstimator.load(path)
        profiled = profiled_reference_ms(estimator)
        raw, at_speed = [], []
        for key, timing in timings.items():
            model, shapes = loaded[key]
            predicted = estimate(model, "cpu", input_shapes=shapes, estimator=estimator).latency_ms
            raw.append(predicted / timing["ms"] - 1)
            if profiled:
                at_speed.append(predicted * SpeedLevel(timing["level_ms"], profiled).scale / timing["ms"] - 1)
        for label, errors in [("raw", raw)] + ([("at the timings' speed", at_speed)] if at_speed else []):
            errors = np.array(errors)
            print(f"{path}, {label}: {np.sum(abs(errors) <= 0.1)} of {len(errors)} within ±10 %, MAPE "
                  f"{100 * np.mean(abs(errors)):.1f} %, median {100 * np.median(errors):+.0f} % | "
                  + " ".join(f"{e:+.0%}" for e in errors))
        if not at_speed:
            print(f"{path}, at the timings' speed: – (no speed level in its profile)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("build", "time", "score"))
    parser.add_argument("dir", type=Path)
    parser.add_argument("estimators", nargs="*", help="cpu estimator files (score)")
    args = parser.parse_args()
    if args.mode == "build":
        build(args.dir)
    elif args.mode == "time":
        time_all(args.dir)
    else:
        score(args.dir, args.estimators)


if __name__ == "__main__":
    main()

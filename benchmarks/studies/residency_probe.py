"""What the rest of a model does to a kernel's time: MobileNetV2 with only its classifier widened.

The classifier is the model's last op and reads each of its weights once per run, so widening it (10, 1000,
4000, 8000 classes) changes nothing else in the graph — only how many bytes a run reads besides every other
kernel's. Each variant is timed in context as profiling times its random networks
(`hwnas.estimator.attribution.measure_in_context`), and a few kernels are followed across the variants: once
the model's weights outgrow the last-level cache, each run reads them afresh from memory and the same
convolutions slow down (docs/estimator.md, "The model around a kernel, measured directly").

    python benchmarks/studies/residency_probe.py                      # MobileNetV2 0.5 at 128²
    python benchmarks/studies/residency_probe.py --width 1.0 --resolution 160 --classes 10 1000 2000

Run it on a quiet machine: a neighbour on the other core competes for the same cache.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import numpy_helper

from hwnas.estimator.attribution import measure_in_context, measure_node_overheads
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.models import build
from hwnas.targets import get_target

FOLLOWED = ("block14/expand/conv", "block14/project/conv", "block3/dw/conv", "last/conv", "stem/conv", "logits")


def with_classes(model, classes: int, seed: int = 0):
    """`model` (a copy) with its final Gemm producing `classes` outputs from He-scaled random weights."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    model = copy
    graph = model.graph
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    inits = {t.name: t for t in graph.initializer}
    weight = numpy_helper.to_array(inits[gemm.input[1]])
    trans_b = any(a.name == "transB" and a.i == 1 for a in gemm.attribute)
    features = weight.shape[1] if trans_b else weight.shape[0]
    shape = (classes, features) if trans_b else (features, classes)
    rng = np.random.default_rng(seed)
    new = (rng.standard_normal(shape) * np.sqrt(2.0 / features)).astype(np.float32)
    inits[gemm.input[1]].CopyFrom(numpy_helper.from_array(new, gemm.input[1]))
    inits[gemm.input[2]].CopyFrom(numpy_helper.from_array(np.zeros(classes, np.float32), gemm.input[2]))
    graph.output[0].type.tensor_type.shape.dim[1].dim_value = classes
    return model


def probe(width: float, resolution: int, classes: list[int]) -> str:
    target = get_target("cpu")
    overheads = measure_node_overheads(target.settings, target.providers)
    base = build("mobilenetv2", width=width, resolution=resolution)
    shapes = resolve_input_shapes(base)
    lines = ["| classes | weights | plain run | " + " | ".join(FOLLOWED) + " |", "|---" * (3 + len(FOLLOWED)) + "|"]
    for n in classes:
        model = with_classes(base, n)
        profile = measure_in_context(model, shapes, target.rules, target.settings, target.providers, overheads)
        timed = {k.name: t for k, t in zip(profile.kernels, profile.latency_ms)}
        weights = sum(k.weight_elements for k in profile.kernels) * 4
        cells = [f"{timed[name] * 1e3:.1f} µs" if name in timed else "–" for name in FOLLOWED]
        lines.append(f"| {n} | {weights / 1e6:.1f} MB | {profile.total_ms:.3f} ms | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 1000, 4000, 8000])
    args = parser.parse_args()
    print(probe(args.width, args.resolution, args.classes))


if __name__ == "__main__":
    main()

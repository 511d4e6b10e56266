"""How close the roofline fallback comes for kernels outside the profiled distribution (issue 19).

One-op models whose kernel lies beyond what the shipped estimator was profiled at (an oversized Gemm, a
MatMul with many rows, an 8M-element Softmax) or whose op was never profiled (Neg, Abs, LayerNorm,
Erf): each estimate against the target's measurement, the kernel's `in_distribution` flag, the error.
On `cpu` a measurement is the median of `repeats` warm ORT runs, the lowest of `rounds` such medians
(robust to other work on the machine; say how busy it was). On the npu targets it is the simulator.

    python benchmarks/studies/out_of_distribution.py [--target cpu] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hwnas.estimator.estimate import estimate
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.targets import get_target


def _model(nodes, x_shape, y_shape, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _const(name: str, shape) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(0).uniform(-0.1, 0.1, shape).astype(np.float32), name)


def gemm(features: int, classes: int) -> onnx.ModelProto:
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w"], ["y"], name="fc", transB=1)]
    return _model(nodes, [1, features, 7, 7], [1, classes], [_const("w", (classes, features))])


def matmul(rows: int, k: int, n: int) -> onnx.ModelProto:
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [1, rows, k], [1, rows, n], [_const("w", (k, n))])


def unary(op: str, shape: list[int], **attrs) -> onnx.ModelProto:
    return _model([helper.make_node(op, ["x"], ["y"], name=op.lower(), **attrs)], shape, shape)


def layer_norm(shape: list[int]) -> onnx.ModelProto:
    c = shape[-1]
    return _model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln", axis=-1)], shape, shape,
                  [numpy_helper.from_array(np.ones(c, np.float32), "g"), numpy_helper.from_array(np.zeros(c, np.float32), "b")])


CASES = {
    "Gemm 2048->20000": lambda: gemm(2048, 20000),
    "Gemm 512->6625": lambda: gemm(512, 6625),
    "Gemm 1280->1000": lambda: gemm(1280, 1000),
    "MatMul 4096x768x768": lambda: matmul(4096, 768, 768),
    "Softmax 8x1024x1024": lambda: unary("Softmax", [1, 8, 1024, 1024], axis=-1),
    "Abs 256x112x112 (never profiled)": lambda: unary("Abs", [1, 256, 112, 112]),
    "Neg 64x56x56 (never profiled)": lambda: unary("Neg", [1, 64, 56, 56]),
    "LayerNorm 4096x768 (never profiled)": lambda: layer_norm([1, 4096, 768]),
    "Erf 64x56x56 (never profiled)": lambda: unary("Erf", [1, 64, 56, 56]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    target = get_target(f"{args.target}:warmup=3,repeats=15,min_seconds=0" if args.target == "cpu" else args.target)
    print(f"target {args.target}; 1-minute load average {os.getloadavg()[0]:.2f} before")
    print("| model | kernels outside | estimated ms | measured ms | error |\n|---|---|---:|---:|---:|")
    for name, build in CASES.items():
        model = build()
        got = estimate(model, args.target)
        shapes = resolve_input_shapes(model)
        measured = min(target.measure(model, shapes).latency_ms for _ in range(max(1, args.rounds)))
        outside = ", ".join(k.name for k in got.kernels if not k.in_distribution) or "-"
        print(f"| {name} | {outside} | {got.latency_ms:.4f} | {measured:.4f} | {got.latency_ms / measured - 1:+.0%} |",
              flush=True)
    print(f"1-minute load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()

"""Cost against the graph's size: seconds per pass, `estimate` and exact `optimize` on Conv → BN → Relu chains.

A plain chain of B blocks (3·B nodes; 8 channels at 8×8, so that running it costs little and the graph
work shows) is what a user's detector with thousands of nodes looks like to the graph layer. Each pass runs
alone through `hwnas.api.run` (verification included: ONNX Runtime builds a session of the original and of
the result); "pass" is the pass manager's own time for it (match, rewrite, cleanup, topological order), the
rest is loading, summarizing, exporting and verifying. `estimate` is `hwnas.api.estimate` on each target;
`optimize` is the exact search (`--trials` candidates, evolution, npu-32x32, verification of the result).
The last column is the growth from the smallest to the largest chain against the growth in nodes: 1.0 is
linear, a quadratic cost shows as the node ratio itself.

ONNX Runtime's own session build grows faster than linearly on long chains (about 10× from 4k to 16k nodes
at every optimization level on this machine, with ORT 1.32); the "session" row times it alone. `quantize`
is ONNX Runtime's static quantizer (onnxruntime.quantization), whose node and initializer look-ups are
linear scans per node: quadratic, outside hwnas.

    python benchmarks/graph_scale.py [--nodes 1000 4000 16000] [--trials 16] [--skip quantize]

Prints a markdown table. Timings are wall seconds on a machine that may be shared: compare rows within one
run, not across runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hwnas import api
from hwnas.errors import HwnasError
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.passes.base import Exactness
from hwnas.passes.registry import all_passes
from hwnas.verify import random_calibration
from hwnas.graph.session import make_session

CHANNELS = 8
SIDE = 8
RECONSTRUCTED_DRIFT = 0.5  # reconstructed passes need a drift budget to run; on this chain they find nothing to cut


def conv_bn_relu_chain(blocks: int, seed: int = 0) -> onnx.ModelProto:
    """x → (Conv 3×3 → BatchNormalization → Relu) × blocks, He-initialized so that values stay finite."""
    rng = np.random.default_rng(seed)
    c = CHANNELS
    nodes, weights, x = [], [], "x"
    for i in range(blocks):
        weights += [
            numpy_helper.from_array(rng.normal(0, (2 / (9 * c)) ** 0.5, (c, c, 3, 3)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array(rng.uniform(0.9, 1.1, c).astype(np.float32), f"gamma{i}"),
            numpy_helper.from_array(rng.normal(0, 0.05, c).astype(np.float32), f"beta{i}"),
            numpy_helper.from_array(rng.normal(0, 0.05, c).astype(np.float32), f"mean{i}"),
            numpy_helper.from_array(rng.uniform(0.9, 1.1, c).astype(np.float32), f"var{i}"),
        ]
        nodes += [
            helper.make_node("Conv", [x, f"w{i}"], [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", [f"conv{i}", f"gamma{i}", f"beta{i}", f"mean{i}", f"var{i}"],
                             [f"bn{i}"], name=f"bn{i}"),
            helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"], name=f"relu{i}"),
        ]
        x = f"relu{i}"
    shape = [1, c, SIDE, SIDE]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def timed(work: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = work()
    return time.perf_counter() - start, out


def measure(blocks: int, trials: int, skip: frozenset[str] = frozenset()) -> dict[str, float | None]:
    """Seconds per row name for one chain; None where the step cannot run on a chain (says why on stderr)."""
    model = conv_bn_relu_chain(blocks)
    calibration = random_calibration(model, resolve_input_shapes(model, None), samples=4, seed=0)
    row: dict[str, float | None] = {}
    row["ORT session (no optimizations)"] = timed(lambda: make_session(model))[0]
    for name, cls in all_passes().items():
        if name in skip:
            continue
        drift = None if cls.default_exactness is Exactness.EXACT else RECONSTRUCTED_DRIFT
        try:
            seconds, result = timed(lambda: api.run(model, name, allow_drift=drift, calibration=calibration))
        except HwnasError as e:
            print(f"{name} on {3 * blocks} nodes: {e}", file=sys.stderr)
            row[f"run {name}"] = row[f"  pass {name}"] = None
            continue
        row[f"run {name}"] = seconds
        row[f"  pass {name}"] = result.records[0].seconds
    for target in ("npu-32x32", "cpu"):
        row[f"estimate {target}"] = timed(lambda: api.estimate(model, target))[0]
    row[f"optimize exact ({trials} candidates)"] = timed(
        lambda: api.optimize(model, "npu-32x32", exact=True, trials=trials, seed=0))[0]
    return row


def markdown(nodes: list[int], trials: int, skip: frozenset[str] = frozenset()) -> str:
    sizes = [max(1, n // 3) for n in nodes]
    rows = {}
    for blocks in sizes:
        for name, seconds in measure(blocks, trials, skip).items():
            rows.setdefault(name, []).append(seconds)
    growth = sizes[-1] / sizes[0]
    head = ["step"] + [f"{3 * b:,} nodes (s)" for b in sizes] + [f"growth ÷ {growth:.0f}× nodes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, seconds in rows.items():
        ok = seconds[0] and seconds[-1] is not None
        ratio = f"{seconds[-1] / seconds[0] / growth:.2f}" if ok else "–"
        cells = " | ".join("n/a" if s is None else f"{s:.2f}" for s in seconds)
        lines.append(f"| {name} | {cells} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 4000, 16000], help="chain sizes in nodes")
    parser.add_argument("--trials", type=int, default=16, help="candidates of the exact search")
    parser.add_argument("--skip", nargs="*", default=["quantize"],
                        help="passes left out (default: quantize, ONNX Runtime's quantizer: quadratic, minutes at 16k nodes)")
    args = parser.parse_args()
    print(markdown(sorted(args.nodes), args.trials, frozenset(args.skip)))


if __name__ == "__main__":
    main()

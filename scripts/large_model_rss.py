#!/usr/bin/env python3
"""Peak memory of `hwnas run --passes fold-bn` and `hwnas estimate` on a model with over 2 GB of weights.

    python scripts/large_model_rss.py [--dir DIR] [--channels 4096] [--blocks 33] [--spatial 2] [--phases] [--json]

Writes a plain CNN (blocks of 1×1 Conv 4096→4096 + BatchNormalization + Relu at 2×2 pixels, float32, 64 MiB
of weights per conv, 33 blocks: 2.06 GiB) with external data, tensor by tensor (no >2 GB protobuf is
ever built), then runs each command in a child process and reads the child's peak resident set size
(`os.wait4` → `ru_maxrss`, which counts the pages ONNX Runtime memory-maps as well as Python's own).
Prints the weight bytes, each peak and its ratio to the weights, and whether verification passed and
the output kept external data. `--phases` also runs the steps of `hwnas.api.run` one by one in a child
process and prints the peak of each (`/proc/self/clear_refs` resets the peak between steps).
docs/large-models.md records the numbers. Needs about 3.5× the weight bytes of free disk (input,
temporary weights, output).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALIGNMENT = 64 << 10


def write_large_model(path: str | os.PathLike, channels: int = 4096, blocks: int = 33, spatial: int = 2,
                      seed: int = 0) -> int:
    """Write the model to `path` with its conv weights in `<name>.data`; returns the bytes of all weights.

    Each weight is generated, written and dropped before the next, and the TensorProto only refers to
    it, so memory stays at one weight's worth. Weights are uniform with variance 2/C (He), BN
    parameters near identity, so activations neither vanish nor blow up through 33 blocks.
    """
    path = Path(path)
    data_name = path.name + ".data"
    rng = np.random.default_rng(seed)
    bound = np.float32(np.sqrt(6.0 / channels))
    initializers, nodes, x = [], [], "x"
    total = 0
    with open(path.parent / data_name, "wb") as data:
        for i in range(blocks):
            weight = (rng.random((channels, channels, 1, 1), dtype=np.float32) * 2 - 1) * bound
            data.write(b"\0" * (-data.tell() % ALIGNMENT))
            offset = data.tell()
            data.write(memoryview(weight).cast("B"))
            proto = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=weight.shape,
                                data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", offset), ("length", weight.nbytes)):
                entry = proto.external_data.add()
                entry.key, entry.value = key, str(value)
            initializers.append(proto)
            total += weight.nbytes
            del weight
            small = {
                f"b{i}": (rng.random(channels, dtype=np.float32) - 0.5) * np.float32(0.1),
                f"g{i}": 1 + 0.1 * rng.standard_normal(channels, dtype=np.float32),
                f"be{i}": 0.1 * rng.standard_normal(channels, dtype=np.float32),
                f"m{i}": 0.1 * rng.standard_normal(channels, dtype=np.float32),
                f"v{i}": 1 + 0.1 * rng.random(channels, dtype=np.float32),
            }
            for name, value in small.items():
                initializers.append(onnx.numpy_helper.from_array(value.astype(np.float32), name))
                total += value.nbytes
            nodes += [
                helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}"),
                helper.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"be{i}", f"m{i}", f"v{i}"], [f"n{i}"], name=f"bn{i}"),
                helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
            ]
            x = f"r{i}"
    shape = [1, channels, spatial, spatial]
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="large_model_rss")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return total


def measure(argv: list[str], env: dict | None = None) -> tuple[int, int, str, str, float]:
    """Run a command; (exit code, its peak RSS in bytes, stdout, stderr, wall seconds)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return proc.returncode, usage.ru_maxrss * 1024, out.read().decode(), err.read().decode(), wall


def hwnas(*args: str) -> list[str]:
    return [sys.executable, "-m", "hwnas", *args]


def free_bytes(folder: str | os.PathLike) -> int:
    return shutil.disk_usage(folder).free


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", 0)


_PHASES = r'''
import json, sys, time
from pathlib import Path

def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

results, start = [], time.perf_counter()
def phase(name):
    global start
    results.append({"phase": name, "peak_rss": peak(), "seconds": round(time.perf_counter() - start, 2)})
    reset()
    start = time.perf_counter()

reset()
import onnxruntime, onnx_graphsurgeon, hwnas.api
from hwnas.graph.gsgraph import to_graph, to_model
from hwnas.graph.io import load_model, save_model
from hwnas.graph.session import make_session, random_feeds, run
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.graph.summary import summarize
from hwnas.passes.base import PassContext
from hwnas.passes.manager import PassManager
from hwnas.passes.pipeline import parse_pipeline
from hwnas.verify import verify_equivalence
phase("python + imports")
source, out = sys.argv[1], sys.argv[2]
original = load_model(source)
shapes = resolve_input_shapes(original, {})
phase("load (weights stay on disk)")
summarize(original, shapes)
phase("summarize (shape inference)")
graph = to_graph(original)
phase("to_graph")
result = PassManager(parse_pipeline("fold-bn")).run(graph, PassContext(template=original, input_shapes=shapes))
del graph
phase("fold-bn (new weights written to a temporary file after the pass)")
candidate = to_model(result.graph, original)
del result
phase("to_model")
feeds = random_feeds(original, shapes, 0)
run(make_session(original), feeds)
phase("ORT: the original alone, one run")
report = verify_equivalence(original, candidate, shapes)
phase("verification (original, then candidate)")
save_model(candidate, out)
phase("save (tensors streamed file to file)")
hwnas.api.estimate(source, "npu-32x32")
phase("estimate")
print(json.dumps({"equivalent": report.equivalent, "phases": results}))
'''


def phases(source: Path, out: Path) -> dict:
    code, _, stdout, stderr, _ = measure([sys.executable, "-c", _PHASES, str(source), str(out)])
    if code != 0:
        raise SystemExit(f"phase run failed:\n{stderr}")
    return json.loads(stdout.strip().splitlines()[-1])


def check_output(out: Path) -> dict:
    """Whether the written model kept its weights external: a small .onnx and a .data file beside it."""
    data = out.with_name(out.name + ".data")
    model = onnx.load(str(out), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    return {
        "model_bytes": out.stat().st_size,
        "data_bytes": data.stat().st_size if data.exists() else 0,
        "external_tensors": len(external),
        "locations": sorted(locations),
    }


def experiment(folder: Path, channels: int, blocks: int, spatial: int, with_phases: bool) -> dict:
    source, out = folder / "large.onnx", folder / "large.opt.onnx"
    start = time.perf_counter()
    weights = write_large_model(source, channels, blocks, spatial)
    result: dict = {"weight_bytes": weights, "generate_s": round(time.perf_counter() - start, 1),
                    "model": {"channels": channels, "blocks": blocks, "spatial": spatial}}
    code, rss, stdout, stderr, wall = measure(hwnas("run", str(source), "-o", str(out), "--passes", "fold-bn", "--json"))
    report = json.loads(stdout) if code == 0 else {}
    result["run"] = {"exit_code": code, "peak_rss": rss, "ratio": rss / weights, "wall_s": round(wall, 1),
                     "verified": bool(report.get("verified")), "stderr": stderr.strip()[-500:]}
    if code == 0:
        result["output"] = check_output(out)
    code, rss, stdout, stderr, wall = measure(hwnas("estimate", str(source), "--target", "npu-32x32", "--json"))
    estimate = json.loads(stdout) if code == 0 else {}
    result["estimate"] = {"exit_code": code, "peak_rss": rss, "ratio": rss / weights, "wall_s": round(wall, 1),
                          "params_bytes": estimate.get("params_bytes"), "stderr": stderr.strip()[-500:]}
    if with_phases:
        for stale in (out, out.with_name(out.name + ".data")):
            stale.unlink(missing_ok=True)
        result["phases"] = phases(source, out)
    return result


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="folder for the model files (default: a temporary folder, removed after)")
    parser.add_argument("--channels", type=int, default=4096)
    parser.add_argument("--blocks", type=int, default=33)
    parser.add_argument("--spatial", type=int, default=2)
    parser.add_argument("--phases", action="store_true", help="also measure each step of hwnas.api.run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hwnas-large-", dir=args.dir) as tmp:
        result = experiment(Path(tmp), args.channels, args.blocks, args.spatial, args.phases)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if result["run"]["exit_code"] == 0 and result["estimate"]["exit_code"] == 0 else 1
    w = result["weight_bytes"]
    print(f"weights: {w:,} bytes ({_mib(w)}), {args.blocks} blocks of 1x1 conv {args.channels}->{args.channels} "
          f"+ BN + Relu at {args.spatial}x{args.spatial}")
    for name in ("run", "estimate"):
        r = result[name]
        extra = f", verified: {r['verified']}" if name == "run" else f", params_bytes {r['params_bytes']:,}" if r["params_bytes"] else ""
        print(f"{name:9} exit {r['exit_code']}  peak RSS {r['peak_rss']:,} bytes ({_mib(r['peak_rss'])})  "
              f"ratio {r['ratio']:.3f}  {r['wall_s']} s{extra}")
        if r["exit_code"]:
            print(r["stderr"])
    if "output" in result:
        o = result["output"]
        print(f"output: {o['model_bytes']:,} bytes .onnx + {o['data_bytes']:,} bytes .data "
              f"({o['external_tensors']} external tensors, location {', '.join(o['locations'])})")
    for p in result.get("phases", {}).get("phases", []):
        print(f"  {p['phase']:66} peak {_mib(p['peak_rss']):>10}  ({p['peak_rss'] / w:.3f}x)  {p['seconds']} s")
    return 0 if result["run"]["exit_code"] == 0 and result["estimate"]["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

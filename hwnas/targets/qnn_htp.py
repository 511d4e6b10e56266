"""`qnn-htp`: Qualcomm's Hexagon NPU (HTP) backend through ONNX Runtime's QNN execution provider.

The PyPI package `onnxruntime-qnn` (`pip install -e ".[qnn]"`) ships Qualcomm's HTP backend
(`libQnnHtp.so`); on x86 Linux it prepares (compiles) a QDQ model for the NPU and runs it in emulation
with the NPU's own fixed-point arithmetic. What that tells, and nothing else tells before a device is
in hand:

- `compiled`: whether the graph prepares for the NPU with no node left to the CPU (ORT's
  `session.disable_cpu_ep_fallback`), and when not, the backend's error line;
- `placement`: which nodes the QNN EP takes and which it leaves to the CPU, each with the reason the
  EP logs ("Validation FAILED ... REASON : ..."), learned from a second compile with CPU fallback
  allowed;
- `drift`: the NPU's outputs against a reference (the float model with `reference=`, else the same
  QDQ model run in float by ORT's CPU provider) on the given inputs: cosine, max abs, top-1 agreement;
- `culprit`: when the whole graph fails to prepare although the EP takes every node, the smallest
  contiguous run of nodes (in graph order) that fails on its own, found by bisection (shortest failing
  prefix, then the latest start that still fails), with its ops, shapes and quantization parameters.

It has no latency of its own: the emulator's cycle counts are host time (three runs of one model gave
114 M, 152 M and 118 M), so `estimate --target qnn-htp` uses the int8 npu estimator (`npu-32x32`) and
says so. HTP needs static shapes: dynamic input dims are fixed at the given input shapes.

Every compile runs in a child process (`python -m hwnas.targets.qnn_htp REQUEST.json`): the backend
can abort the process it runs in, and its verbose log (the placement reasons) goes to the process's
stderr. Graph input quantization and output dequantization are kept on the NPU
(`offload_graph_io_quantization=0`) so that "every node on the NPU" means every node.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hwnas.errors import BadInputError
from hwnas.graph.constants import lift_constants
from hwnas.graph.io import graph_inputs
from hwnas.graph.shapes import Shape, declared_dims, infer_tensors, resolve_input_shapes, with_static_inputs
from hwnas.targets.npu import NpuTarget, parse_spec

NAME = "qnn-htp"
LATENCY_PROXY = "npu-32x32"  # the int8 npu estimator stands in for latency (the emulator has none)
INSTALL = 'pip install -e ".[qnn]" (or: pip install onnxruntime-qnn)'
EP = "QNNExecutionProvider"
COMPILE_TIMEOUT_S = 900
_FALLBACK_DISABLED = "fallback to CPU EP has been explicitly disabled"
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def require_qnn():
    """The `onnxruntime_qnn` module, or BadInputError naming the install line (exit 2)."""
    try:
        import onnxruntime_qnn
    except ImportError:
        raise BadInputError(f"target {NAME} needs the onnxruntime-qnn package: {INSTALL}") from None
    return onnxruntime_qnn


class QnnHtpTarget(NpuTarget):
    """Latency: the int8 npu estimator's (see the module docstring); deployability: `deploy_check`."""

    def __init__(self):
        super().__init__(parse_spec(LATENCY_PROXY))
        self.name = NAME

    @classmethod
    def from_spec(cls, spec: str) -> QnnHtpTarget:
        if spec.strip() != NAME:
            raise BadInputError(f"{NAME} takes no options, got {spec!r}")
        return cls()

    latency_note = (f"{NAME} has no latency model of its own (the HTP emulator's cycles are host time): latency is "
                    f"the int8 npu estimator's ({LATENCY_PROXY})")

    @property
    def estimator_name(self) -> str:
        return LATENCY_PROXY

    def describe(self) -> dict:
        return {**super().describe(), "name": NAME, "latency_from": LATENCY_PROXY, "note": self.latency_note}


@dataclass(frozen=True)
class NodePlacement:
    node: str
    op_type: str
    device: str  # "npu" or the execution provider that took it
    reason: str = ""  # why the QNN EP did not take it (off-NPU nodes only)


@dataclass(frozen=True)
class NpuDrift:
    reference: str  # what the NPU was compared with
    inputs: str  # where the inputs came from
    samples: int
    cosine: float
    min_sample_cosine: float
    max_abs: float
    top1_agreement: float | None
    outputs: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Culprit:
    nodes: list[str]
    ops: list[str]
    error: str
    shapes: dict[str, list[int]] = field(default_factory=dict)  # every tensor the nodes read or write
    quantization: list[str] = field(default_factory=list)  # each input's quantization, or "float" and why
    compiles_tried: int = 0


@dataclass
class DeployCheck:
    """What the backend says about one model at static input shapes (`to_dict` is the JSON form)."""

    compiled: bool
    error: str | None
    placement: list[NodePlacement]
    input_shapes: dict[str, Shape]
    drift: NpuDrift | None = None
    culprit: Culprit | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def off_npu(self) -> list[NodePlacement]:
        return [p for p in self.placement if p.device != "npu"]

    @property
    def on_npu(self) -> int:
        return sum(p.device == "npu" for p in self.placement)

    def to_dict(self) -> dict:
        return {
            "compiled": self.compiled,
            "error": self.error,
            # None: the backend failed before placing anything (a failed finalize fails with fallback allowed too)
            "nodes_on_npu": self.on_npu if self.placement else None,
            "nodes_off_npu": len(self.off_npu) if self.placement else None,
            "off_npu": [asdict(p) for p in self.off_npu],
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "drift": asdict(self.drift) if self.drift else None,
            "culprit": asdict(self.culprit) if self.culprit else None,
            "warnings": self.warnings,
        }

    def summary(self) -> str:
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in self.input_shapes.items())
        placed = f"{self.on_npu} nodes on the NPU, {len(self.off_npu)} elsewhere" if self.placement else "nothing placed"
        head = f"{NAME}: {'compiled' if self.compiled else 'did NOT compile'} at {shapes}; {placed}"
        lines = [head] + [f"  note: {w}" for w in self.warnings]
        if self.error:
            lines.append(f"  backend error: {self.error}")
        lines += [f"  off the NPU: {p.node} ({p.op_type}) on {p.device}: {p.reason or 'no reason logged'}"
                  for p in self.off_npu]
        if self.culprit:
            c = self.culprit
            lines.append(f"  culprit (bisection, {c.compiles_tried} compiles): {len(c.nodes)} node(s) "
                         f"{', '.join(f'{n} ({o})' for n, o in zip(c.nodes, c.ops))}: {c.error}")
            lines += [f"    {q}" for q in c.quantization]
        if self.drift:
            d = self.drift
            top1 = f", top-1 agreement {d.top1_agreement:.3f}" if d.top1_agreement is not None else ""
            lines.append(f"  NPU drift vs {d.reference} on {d.samples} {d.inputs} sample(s): cosine {d.cosine:.5f} "
                         f"(worst sample {d.min_sample_cosine:.5f}), max abs {d.max_abs:.4g}{top1}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Compile:
    """One child-process compile (and run)."""

    compiled: bool
    error: str | None
    assignment: list[tuple[str, str, str]]  # (ep, node, op type)
    reasons: dict[str, str]
    outputs: dict[str, np.ndarray] | None = None


def deploy_check(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Shape] | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
    reference: onnx.ModelProto | None = None,
    inputs_label: str = "calibration",
    bisect: bool = True,
    drift: bool = True,
) -> DeployCheck:
    """Compile `model` (a QDQ model) for the HTP, learn its placement, its drift and, on failure, the culprit.

    `feeds`: samples (input name -> N×...) to measure drift on; None: 4 seeded random samples, with a warning.
    """
    require_qnn()
    shapes = resolve_input_shapes(model, input_shapes)
    static = with_static_inputs(model, shapes)
    notes = []
    if any(not isinstance(d, int) for v in graph_inputs(model) for d in declared_dims(v)):
        notes.append(f"HTP needs static shapes: checked at {shape_text(shapes)} (the model keeps its dynamic dims)")
    if feeds is None and drift:
        from hwnas.verify.calibration import random_calibration

        feeds = random_calibration(static, shapes, samples=4, seed=0)
        inputs_label = "seeded random"
        notes.append("no --calib/--holdout inputs: NPU drift measured on 4 seeded random inputs, which say "
                     "little about real data")
    strict = _compile(static, strict=True, feeds=feeds if drift else None)
    loose = _compile(static, strict=False)
    placement = _placement(loose)
    result = DeployCheck(strict.compiled, strict.error, placement, dict(shapes), warnings=notes)
    if not strict.compiled and not result.off_npu and loose.error:
        result.error = loose.error  # the fallback-disabled message hides the backend's own
    if strict.compiled and strict.outputs is not None:
        result.drift = _drift(reference if reference is not None else model, strict.outputs, feeds,
                              "the float reference" if reference is not None else "the same model on ORT's CPU",
                              inputs_label)
    if not strict.compiled and not result.off_npu and bisect:
        result.culprit = find_culprit(static, shapes)
    return result


def shape_text(shapes: Mapping[str, Shape]) -> str:
    return ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in shapes.items())


def _placement(run: _Compile) -> list[NodePlacement]:
    out = []
    for ep, node, op in run.assignment:
        if ep == EP:
            out.append(NodePlacement(node, op, "npu"))
        else:
            out.append(NodePlacement(node, op, ep, run.reasons.get(node, "")))
    return out


def _drift(reference: onnx.ModelProto, npu_outputs: Mapping[str, np.ndarray], feeds, reference_label: str,
           inputs_label: str) -> NpuDrift:
    from hwnas.graph.session import make_session, run
    from hwnas.verify.fidelity import compare_samples

    session = make_session(reference)
    names = [o.name for o in reference.graph.output]
    count = len(next(iter(feeds.values())))
    refs = {n: [] for n in names}
    for i in range(count):
        for n, r in zip(names, run(session, {k: v[i:i + 1] for k, v in feeds.items()})):
            refs[n].append(r)
    cands = {n: [npu_outputs[n][i:i + 1] for i in range(count)] for n in names}
    report = compare_samples(reference, refs, cands)
    return NpuDrift(reference_label, inputs_label, count, report.cosine,
                    min(o.min_sample_cosine for o in report.outputs), report.max_abs, report.top1_agreement,
                    [asdict(o) for o in report.outputs])


# ---- bisection -------------------------------------------------------------------------------------------


def find_culprit(static: onnx.ModelProto, shapes: Mapping[str, Shape]) -> Culprit | None:
    """The smallest contiguous run of nodes that fails to prepare on its own with the model's own error
    (None: no part fails alone).

    Nodes computed from weights alone (the weights' DequantizeLinear) are not bisected: each window
    takes along those it reads, so a window's weights stay quantized as in the model. Assumes failure is
    monotone in the prefix: binary search for the shortest failing prefix [0, k) of the other nodes, then
    for the latest start j with [j, k) still failing.
    """
    lifted = lift_constants(static)
    weight_names = {t.name for t in lifted.graph.initializer}
    weight_nodes: dict[str, onnx.NodeProto] = {}
    nodes = []
    for node in lifted.graph.node:
        if all(i in weight_names or i in weight_nodes or not i for i in node.input):
            weight_nodes.update({o: node for o in node.output})
        else:
            nodes.append(node)
    tensors, types = infer_tensors(lifted, shapes)
    tried = 0
    full_error = None

    def fails(start: int, stop: int) -> str | None:
        nonlocal tried
        tried += 1
        run = _compile(_window(lifted, nodes, weight_nodes, start, stop, tensors, types), strict=False)
        if run.compiled or (full_error is not None and run.error != full_error):
            return None
        return run.error

    full_error = fails(0, len(nodes))
    if full_error is None:
        return None
    lo, hi = 1, len(nodes)  # [0, hi) fails
    while lo < hi:
        mid = (lo + hi) // 2
        if fails(0, mid) is not None:
            hi = mid
        else:
            lo = mid + 1
    stop = hi
    lo, hi = 0, stop - 1  # [lo, stop) fails
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fails(mid, stop) is not None:
            lo = mid
        else:
            hi = mid - 1
    window = nodes[lo:stop]
    return Culprit(
        nodes=[n.name for n in window], ops=[n.op_type for n in window], error=full_error,
        shapes={t: list(tensors[t]) for n in window for t in [*n.input, *n.output] if t in tensors},
        quantization=_quantization(lifted, window), compiles_tried=tried,
    )


def _window(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto], weight_nodes: Mapping[str, onnx.NodeProto],
            start: int, stop: int, tensors: Mapping[str, Shape], types: Mapping[str, int]) -> onnx.ModelProto:
    """Nodes [start, stop) as a model of their own, with the weight nodes they read: outside tensors they read
    become inputs, tensors read later (or the graph's outputs) become outputs; the weights come along."""
    part = nodes[start:stop]
    weights = {t.name: t for t in model.graph.initializer}
    needed: dict[int, onnx.NodeProto] = {}
    pending = [i for n in part for i in n.input if i in weight_nodes]
    while pending:  # the weight nodes the window reads, and the weight nodes those read
        node = weight_nodes[pending.pop()]
        if id(node) not in needed:
            needed[id(node)] = node
            pending += [i for i in node.input if i in weight_nodes]
    order = {id(n): k for k, n in enumerate(model.graph.node)}
    carried = sorted(needed.values(), key=lambda n: order[id(n)])
    produced = {o for n in [*carried, *part] for o in n.output if o}
    read = [i for n in [*carried, *part] for i in n.input if i]
    inputs = list(dict.fromkeys(i for i in read if i not in produced and i not in weights))
    later = {i for n in nodes[stop:] for i in n.input} | {o.name for o in model.graph.output}
    outputs = [o for n in part for o in n.output if o in later] or [o for o in part[-1].output if o]

    def info(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), list(tensors.get(name, ())) or None)

    graph = helper.make_graph([*carried, *part], "window", [info(i) for i in inputs], [info(o) for o in outputs],
                              [weights[i] for i in dict.fromkeys(read) if i in weights])
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def _quantization(model: onnx.ModelProto, window: Sequence[onnx.NodeProto]) -> list[str]:
    """How each non-Q/DQ node of the window gets each input: from which DequantizeLinear with what scale and
    zero point, or as a float tensor (the likely culprit: HTP runs quantized arithmetic)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def params(dq: onnx.NodeProto) -> str:
        scale = weights.get(dq.input[1]) if len(dq.input) > 1 else None
        zero = weights.get(dq.input[2]) if len(dq.input) > 2 else None
        if scale is None:
            return "scale computed at run time"
        text = f"scale {float(scale.ravel()[0]):.6g}" if scale.size == 1 else f"{scale.size} per-channel scales"
        if zero is not None:
            text += f", zero point {int(zero.ravel()[0])} ({zero.dtype})" if zero.size == 1 else f", {zero.dtype}"
        return text

    lines = []
    for node in window:
        if node.op_type in _QDQ:
            if node.op_type == "QuantizeLinear":
                lines.append(f"{node.name} (QuantizeLinear) -> {node.output[0]}: {params(node)}")
            continue
        for name in node.input:
            if not name:
                continue
            src = producers.get(name)
            if src is not None and src.op_type == "DequantizeLinear":
                lines.append(f"{node.name} ({node.op_type}) input {name}: quantized, {params(src)}")
            elif name in weights:
                value = weights[name]
                shown = f" = {float(value.ravel()[0]):.6g}" if value.size == 1 else f" {list(value.shape)}"
                lines.append(f"{node.name} ({node.op_type}) input {name}: float constant{shown}, NOT quantized")
            else:
                lines.append(f"{node.name} ({node.op_type}) input {name}: float tensor, NOT quantized")
    return lines


# ---- the child process -----------------------------------------------------------------------------------

_FAILED = re.compile(r"Validation FAILED for \d+ nodes in OrtNodeUnit")
_NODE = re.compile(r"Operator type: (\S+) Node name: (.*?) Node index:")
_REASON = re.compile(r"REASON : (.*)")


def parse_reasons(log: str) -> dict[str, str]:
    """Node name -> the QNN EP's reason for not taking it, from its verbose log (the last reason wins)."""
    reasons: dict[str, str] = {}
    pending: list[str] = []
    in_failed = False
    for line in log.splitlines():
        if _FAILED.search(line):
            in_failed, pending = True, []
        elif "Validation PASSED" in line:
            in_failed = False
        elif in_failed and (m := _NODE.search(line)):
            pending.append(m.group(2))
        elif in_failed and (m := _REASON.search(line)):
            for name in pending:
                reasons[name] = m.group(1).strip()
            in_failed = False
    return reasons


def _error_line(text: str) -> str:
    """The informative line of an ORT/QNN failure: ORT's exception text without its '[ONNXRuntimeError] : N : X :' prefix."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else "unknown error"
    return re.sub(r"^.*?\[ONNXRuntimeError\] : \d+ : \w+ : ", "", line)


def _compile(model: onnx.ModelProto, strict: bool, feeds: Mapping[str, np.ndarray] | None = None) -> _Compile:
    with tempfile.TemporaryDirectory(prefix="hwnas-qnn-") as tmp:
        path = Path(tmp)
        onnx.save(model, path / "model.onnx")
        request = {"model": str(path / "model.onnx"), "strict": strict, "result": str(path / "result.json"),
                   "feeds": None, "outputs": str(path / "outputs.npz")}
        if feeds is not None:
            np.savez(path / "feeds.npz", **feeds)
            request["feeds"] = str(path / "feeds.npz")
        (path / "request.json").write_text(json.dumps(request))
        try:
            proc = subprocess.run([sys.executable, "-m", "hwnas.targets.qnn_htp", str(path / "request.json")],
                                  capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        except subprocess.TimeoutExpired:
            return _Compile(False, f"the backend did not finish within {COMPILE_TIMEOUT_S} s", [], {})
        reasons = parse_reasons(proc.stderr)
        result_file = path / "result.json"
        if not result_file.is_file():
            crash = [ln for ln in proc.stderr.splitlines() if "rror" in ln] or proc.stderr.splitlines()[-1:]
            return _Compile(False, f"the backend crashed the process (exit {proc.returncode}): "
                                   f"{_error_line(crash[-1]) if crash else 'no message'}", [], reasons)
        result = json.loads(result_file.read_text())
        outputs = None
        if result["compiled"] and feeds is not None:
            with np.load(path / "outputs.npz") as data:
                outputs = {k: data[k] for k in data.files}
        return _Compile(result["compiled"], result["error"], [tuple(a) for a in result["assignment"]], reasons, outputs)


def _worker(request_path: str) -> None:
    """Child-process side of `_compile`: compile, record placement, run the feeds one sample at a time."""
    import onnxruntime as ort

    qnn = require_qnn()
    request = json.loads(Path(request_path).read_text())
    ort.register_execution_provider_library(EP, qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP]
    options = ort.SessionOptions()
    options.add_provider_for_devices(devices, {"backend_path": qnn.get_qnn_htp_path(),
                                               "offload_graph_io_quantization": "0"})
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if request["strict"]:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.log_severity_level = 3 if request["strict"] else 0  # verbose: the EP's reasons per node
    result: dict = {"compiled": False, "error": None, "assignment": []}
    try:
        session = ort.InferenceSession(request["model"], options)
    except Exception as e:  # ORT raises its own types; the message is the backend's report
        result["error"] = _error_line(str(e))
        if _FALLBACK_DISABLED in str(e):
            result["error"] = "nodes fell off the NPU to the CPU, and CPU fallback is disabled"
        Path(request["result"]).write_text(json.dumps(result))
        return
    result["compiled"] = True
    result["assignment"] = [(a.ep_name, n.name, n.op_type) for a in session.get_provider_graph_assignment_info()
                            for n in a.get_nodes()]
    if request["feeds"]:
        with np.load(request["feeds"]) as data:
            feeds = {k: data[k] for k in data.files}
        names = [o.name for o in session.get_outputs()]
        count = len(next(iter(feeds.values())))
        runs = [session.run(names, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(count)]
        np.savez(request["outputs"], **{n: np.concatenate([r[j] for r in runs]) for j, n in enumerate(names)})
    Path(request["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    _worker(sys.argv[1])

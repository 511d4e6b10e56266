"""Which ops a measured target runs fused, found by timing op pairs (nn-Meter's fusion test).

For each candidate pair (Conv → Relu, Conv → BatchNormalization, Conv → Add(residual), Gemm → Relu, ...)
a few tiny models are timed together, interleaved (`hwnas.targets.measure`):

    T1  = conv, op 1, conv        − conv, conv        (1×1 convs around the pair, see below)
    T12 = conv, op 1, op 2, conv  − conv, conv
    T2  = op 2 alone on a model input − an empty run (a Relu on 16 numbers: the per-run overhead)
    saving = T1 + T2 − T12                   fused  ⇔  saving > 0.5 · min(T1, T2)

Two fused ops cost about as much as the first (the second rides in its epilogue: saving ≈ T2); two
separate ops cost the sum (saving ≈ 0, or less when a layout copy has to sit between them). Each pair
is timed at three sizes and the median of saving / min(T1, T2) decides, so that one noisy size cannot
flip a rule. The sizes are small 1×1 convs, so the first op is not much slower than the second, which
keeps the test sensitive.

The conv pairs sit between two 1×1 convs, as they would inside a model: ORT's CPU provider runs convs
in a blocked channel layout (NCHWc) and fuses activations into them there, and it treats an op whose
output is the model's output differently (Conv → HardSwish → output runs as three nodes, Conv →
HardSwish → Conv as two). The two convs' own time is subtracted.

The pairs map onto `FusionRules` keys (what `decompose` can express):

    Conv → BN / activation X          X in `epilogue_ops`
    Conv → Mul / Add (constant)       `affine` (both must fuse; Sub and Div are reported, not decisive)
    Conv → x·Sigmoid(x), x·Clip(x+3, 0, 6)/6   `self_gate` (both must fuse)
    Conv → Add(residual)              `residual_add`
    Conv → Add(residual) → Relu       `residual_epilogue` (where FusionRules has it)
    ConvTranspose / Gemm / MatMul → Relu, MatMul → Add(bias)   that op in `anchors` (Conv is one when
                                      any Conv pair fuses)
    Relu → an exporter's chain (erf GELU, decomposed LayerNorm, RMSNorm, x·Sigmoid(x))   that chain in
                                      `patterns` when ORT runs it as fewer nodes than it has ops, whatever
                                      the criterion: the chain fuses with itself, not with the Relu

Pairs the rules cannot express (a depthwise conv as the anchor) are measured and reported all the same.

On ONNX Runtime targets each pair model is also profiled once with ORT's per-node profiler, and the table
says how many nodes op 2 added to the pair (0: ORT ran it inside op 1's node). `criterion="latency"` is
nn-Meter's test alone; `criterion="latency_or_node"` also counts a pair as fused when ORT merges op 2
(runs it in fewer nodes than it has ops: inside op 1's node, like Conv → Clip, or its own ops into one,
like x·Sigmoid(x) → QuickGelu), whatever the timing says, and a self-gate when either form is merged.
The latter is what in-context profiling (`attribution.py`, `context` mode) needs: a kernel can only be
timed inside a model if no ORT node straddles two kernels. The two differ for activations that ORT runs
inside the conv's node but that still cost a pass over its output (Clip, Sigmoid, Tanh...): no saving,
one node.

`detect_fusion_rules(target)` returns the rules and the table of measurements; `rules_document` is what
`benchmarks/profile_cpu.py --detect-fusion` writes to `hwnas/targets/data/fusion_cpu.json`.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from hwnas.estimator.networks import NetworkBuilder, _act, _layer_norm, overhead_model
from hwnas.targets.base import Target
from hwnas.targets.fusion_rules import FusionRules

SAVING_THRESHOLD = 0.5  # nn-Meter: fused when T1 + T2 - T12 > 0.5 * min(T1, T2)
# (channels, spatial size) of the pair's input: small 1x1 convs, so that T1 and T2 are comparable
SIZES = ((32, 56), (64, 28), (16, 96))
GEMM_SIZES = ((64, 64), (128, 128), (32, 256))  # (rows, features)
CRITERIA = ("latency", "latency_or_node")
TIMED_RUNS = 200  # interleaved rounds per size: a fusion saves microseconds


@dataclass(frozen=True)
class PairMeasurement:
    """One candidate pair at one size, or (`size` == 'median') the verdict over all sizes."""

    pair: str  # e.g. "Conv→Relu"
    rule: str  # what the result decides, e.g. "epilogue_ops:Relu"
    size: str  # e.g. "32x56x56"
    t1_ms: float
    t2_ms: float
    t12_ms: float
    overhead_ms: float
    nodes_added: int | None = None  # ORT nodes op 2 added to op 1 (0: one node); None off ONNX Runtime
    second_ops: int = 1  # ONNX nodes op 2 is made of (x·Sigmoid(x): 2)

    @property
    def saving_ms(self) -> float:
        return self.t1_ms + self.t2_ms - self.t12_ms

    @property
    def ratio(self) -> float:
        """saving / min(T1, T2): ~1 when fused, ~0 (or below) when not."""
        return self.saving_ms / max(min(self.t1_ms, self.t2_ms), 1e-9)

    @property
    def fused(self) -> bool:
        """nn-Meter's test."""
        return self.ratio > SAVING_THRESHOLD

    @property
    def merged(self) -> bool:
        """ORT ran op 2 in fewer nodes than it has ops: inside op 1's node, or its own ops fused together
        (x·Sigmoid(x) → one QuickGelu). Either way a kernel boundary inside the pair would split a node."""
        return self.nodes_added is not None and self.nodes_added < self.second_ops

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "saving_ms": self.saving_ms, "ratio": self.ratio, "fused": self.fused}


# ---- the candidate pairs, as tiny ONNX models ------------------------------------------------------

# An op applied to tensor `x` inside builder `b` (shapes are kept); returns the output tensor.
Step = Callable[[NetworkBuilder, str], str]


def _conv(b: NetworkBuilder, x: str) -> str:
    c = b.shapes[x][1]
    return b.node("Conv", [x, b.weight([c, c, 1, 1], c), b.const(np.zeros(c, np.float32))], b.shapes[x])


def _dwconv(b: NetworkBuilder, x: str) -> str:
    c = b.shapes[x][1]
    return b.node("Conv", [x, b.weight([c, 1, 3, 3], 9), b.const(np.zeros(c, np.float32))], b.shapes[x], group=c,
                  pads=[1, 1, 1, 1])


def _deconv(b: NetworkBuilder, x: str) -> str:
    c = b.shapes[x][1]
    return b.node("ConvTranspose", [x, b.weight([c, c, 1, 1], c), b.const(np.zeros(c, np.float32))], b.shapes[x])


def _gemm(b: NetworkBuilder, x: str) -> str:
    c = b.shapes[x][1]
    return b.node("Gemm", [x, b.weight([c, c], c), b.const(np.zeros(c, np.float32))], b.shapes[x], transB=1)


def _matmul(b: NetworkBuilder, x: str) -> str:
    c = b.shapes[x][1]
    return b.node("MatMul", [x, b.weight([c, c], c)], b.shapes[x])


def _unary(op: str, **attrs) -> Step:
    return lambda b, x: b.node(op, [x], b.shapes[x], **attrs)


def _clip(b: NetworkBuilder, x: str) -> str:
    return b.node("Clip", [x, b.scalar(0.0), b.scalar(6.0)], b.shapes[x])


def _bn(b: NetworkBuilder, x: str) -> str:
    c = b.shapes[x][1]
    params = [b.const(b.rng.uniform(0.5, 1.5, c).astype(np.float32)) for _ in range(4)]
    return b.node("BatchNormalization", [x, *params], b.shapes[x])


def _channel_const(op: str) -> Step:
    def step(b: NetworkBuilder, x: str) -> str:
        c = b.shapes[x][1]
        return b.node(op, [x, b.const(b.rng.uniform(0.5, 1.5, (c, 1, 1)).astype(np.float32))], b.shapes[x])
    return step


def _bias(b: NetworkBuilder, x: str) -> str:
    """Add of a constant vector along the last axis: the bias after a MatMul."""
    return b.node("Add", [x, b.const(b.rng.normal(0, 0.1, b.shapes[x][-1]).astype(np.float32))], b.shapes[x])


def _to_nhwc(b: NetworkBuilder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    return b.node("Transpose", [x], (n, h, w, c), perm=[0, 2, 3, 1])


def _prelu(b: NetworkBuilder, x: str) -> str:
    return b.node("PRelu", [x, b.const(np.full((b.shapes[x][1], 1, 1), 0.1, np.float32))], b.shapes[x])


def _swish(b: NetworkBuilder, x: str) -> str:
    return b.node("Mul", [x, b.node("Sigmoid", [x], b.shapes[x])], b.shapes[x])


def _hardswish_decomposed(b: NetworkBuilder, x: str) -> str:
    """Paddle's export of hard-swish: x · Clip(x + 3, 0, 6) / 6."""
    shape = b.shapes[x]
    gate = b.node("Clip", [b.node("Add", [x, b.scalar(3.0)], shape), b.scalar(0.0), b.scalar(6.0)], shape)
    return b.node("Div", [b.node("Mul", [x, gate], shape), b.scalar(6.0)], shape)


def _gelu(b: NetworkBuilder, x: str) -> str:
    return _act(b, x, "gelu")


def _layer_norm_decomposed(b: NetworkBuilder, x: str) -> str:
    return _layer_norm(b, x, decomposed=True)


def _rms_norm(b: NetworkBuilder, x: str) -> str:
    """x / √(mean(x²) + ε) · scale over the last axis."""
    shape, reduced = b.shapes[x], (*b.shapes[x][:-1], 1)
    variance = b.node("ReduceMean", [b.node("Pow", [x, b.scalar(2.0)], shape)], reduced, axes=[-1])
    root = b.node("Sqrt", [b.node("Add", [variance, b.scalar(1e-5)], reduced)], reduced)
    scale = b.const(b.rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32))
    return b.node("Mul", [b.node("Div", [x, root], shape), scale], shape)


def _residual(b: NetworkBuilder, x: str) -> str:
    """Add of a tensor computed elsewhere: the pair's input (a second model input when op 2 runs alone)."""
    other = b.skip if b.skip != x else b.input("skip", b.shapes[x])
    return b.node("Add", [x, other], b.shapes[x])


@dataclass(frozen=True)
class PairCase:
    pair: str
    rule: str
    first: tuple[Step, ...]
    second: tuple[Step, ...]
    vector: bool = False  # a [N, C] input (Gemm, MatMul) instead of [1, C, H, W], and no convs around
    tail: bool = True  # a 1x1 conv after the pair (not after a Transpose to NHWC)


def _case(pair: str, rule: str, first: Step | tuple[Step, ...], second: Step | tuple[Step, ...], vector=False,
          tail=True) -> PairCase:
    def as_tuple(steps):
        return steps if isinstance(steps, tuple) else (steps,)
    return PairCase(pair, rule, as_tuple(first), as_tuple(second), vector, tail and not vector)


CASES: tuple[PairCase, ...] = (
    _case("Conv→BatchNormalization", "epilogue_ops:BatchNormalization", _conv, _bn),
    _case("Conv→Relu", "epilogue_ops:Relu", _conv, _unary("Relu")),
    _case("Conv→Clip", "epilogue_ops:Clip", _conv, _clip),
    _case("Conv→HardSigmoid", "epilogue_ops:HardSigmoid", _conv, _unary("HardSigmoid", alpha=0.2, beta=0.5)),
    _case("Conv→HardSwish", "epilogue_ops:HardSwish", _conv, _unary("HardSwish")),
    _case("Conv→Sigmoid", "epilogue_ops:Sigmoid", _conv, _unary("Sigmoid")),
    _case("Conv→LeakyRelu", "epilogue_ops:LeakyRelu", _conv, _unary("LeakyRelu", alpha=0.1)),
    _case("Conv→Tanh", "epilogue_ops:Tanh", _conv, _unary("Tanh")),
    _case("Conv→PRelu", "epilogue_ops:PRelu", _conv, _prelu),
    _case("Conv→Transpose(NHWC)", "epilogue_ops:Transpose", _conv, _to_nhwc, tail=False),
    _case("Conv→Mul(const)", "affine:Mul", _conv, _channel_const("Mul")),
    _case("Conv→Add(const)", "affine:Add", _conv, _channel_const("Add")),
    _case("Conv→Sub(const)", "affine:Sub", _conv, _channel_const("Sub")),
    _case("Conv→Div(const)", "affine:Div", _conv, _channel_const("Div")),
    _case("Conv→x·Sigmoid(x)", "self_gate:swish", _conv, _swish),
    _case("Conv→x·Clip(x+3,0,6)/6", "self_gate:hardswish", _conv, _hardswish_decomposed),
    _case("Conv→Add(residual)", "residual_add", _conv, _residual),
    _case("Conv→Add(residual)→Relu", "residual_epilogue", (_conv, _residual), _unary("Relu")),
    _case("DwConv→Relu", "report:depthwise anchor", _dwconv, _unary("Relu")),
    _case("ConvTranspose→Relu", "anchors:ConvTranspose", _deconv, _unary("Relu")),
    _case("ConvTranspose→BatchNormalization", "anchors:ConvTranspose", _deconv, _bn),
    _case("Gemm→Relu", "anchors:Gemm", _gemm, _unary("Relu"), vector=True),
    _case("MatMul→Relu", "anchors:MatMul", _matmul, _unary("Relu"), vector=True),
    _case("MatMul→Add(bias)", "anchors:MatMul", _matmul, _bias, vector=True),
    _case("Relu→GELU(erf)", "patterns:Gelu", _unary("Relu"), _gelu, vector=True),
    _case("Relu→LayerNorm(decomposed)", "patterns:LayerNormalization", _unary("Relu"), _layer_norm_decomposed, vector=True),
    _case("Relu→RMSNorm", "patterns:SimplifiedLayerNormalization", _unary("Relu"), _rms_norm, vector=True),
    _case("Relu→x·Sigmoid(x)", "patterns:QuickGelu", _unary("Relu"), _swish, vector=True),
)


def _chain(lead: bool, tail: bool, steps: Sequence[Step], shape: tuple[int, ...], seed: int) -> onnx.ModelProto:
    """`steps` on a model input, after a 1×1 conv (`lead`) and before one (`tail`)."""
    b = NetworkBuilder(seed)
    x = b.input("x", shape)
    if lead:
        x = _conv(b, x)
    b.skip = x
    for step in steps:
        x = step(b, x)
    return b.model([_conv(b, x) if tail else x])


def pair_models(case: PairCase, shape: tuple[int, ...], seed: int = 0) -> dict[str, onnx.ModelProto]:
    """One pair's models at input shape `shape`: `t1` (op 1), `t12` (op 1, op 2) — for conv pairs after a
    leading and before a trailing 1×1 conv, whose time `base` is subtracted — `t2` (op 2 alone on a
    model input) and `t0` (an empty run, subtracted from `t2`)."""
    lead = not case.vector
    models = {
        "t1": _chain(lead, case.tail, case.first, shape, seed),
        "t12": _chain(lead, case.tail, case.first + case.second, shape, seed),
        "t2": _chain(False, False, case.second, shape, seed + 1),
        "t0": overhead_model(),
    }
    if lead:
        models["base"] = _chain(True, case.tail, (), shape, seed)
    return models


def case_shapes(case: PairCase) -> list[tuple[int, ...]]:
    if case.vector:
        return [(rows, cols) for rows, cols in GEMM_SIZES]
    return [(1, c, h, h) for c, h in SIZES]


# ---- measuring -------------------------------------------------------------------------------------


def measure_pair(target: Target, case: PairCase, shape: tuple[int, ...], seed: int = 0) -> PairMeasurement:
    """T1, T2, T12 of one pair at one size, timed together (interleaved where the target can)."""
    models = pair_models(case, shape, seed)
    times = _measure_together(target, models)
    base = times.get("base", times["t0"])
    nodes = {key: _ort_nodes(target, models[key]) for key in ("t1", "t12")}
    return PairMeasurement(
        pair=case.pair, rule=case.rule, size="x".join(map(str, shape[1:])),
        t1_ms=max(times["t1"] - base, 0.0), t2_ms=max(times["t2"] - times["t0"], 0.0),
        t12_ms=max(times["t12"] - base, 0.0), overhead_ms=times["t0"],
        nodes_added=None if nodes["t1"] is None else nodes["t12"] - nodes["t1"], second_ops=len(models["t2"].graph.node),
    )


def _measure_together(target: Target, models: dict[str, onnx.ModelProto]) -> dict[str, float]:
    from hwnas.targets.measure import measure_interleaved
    from hwnas.targets.ort_ep import OrtTarget

    if isinstance(target, OrtTarget):
        settings = dataclasses.replace(target.settings, warmup=max(target.settings.warmup, 10),
                                       repeats=max(target.settings.repeats, TIMED_RUNS), min_seconds=0.0)
        measured = measure_interleaved(models, {}, settings, target.providers)
        return {key: m.latency_ms for key, m in measured.items()}
    return {key: target.measure(model, {}).latency_ms for key, model in models.items()}


def _ort_nodes(target: Target, model: onnx.ModelProto) -> int | None:
    """How many nodes ORT runs `model` as, layout copies (ReorderInput/ReorderOutput) not counted."""
    from hwnas.targets.measure import MeasureSettings, profile_nodes
    from hwnas.targets.ort_ep import OrtTarget

    if not isinstance(target, OrtTarget):
        return None
    timings = profile_nodes(model, {}, MeasureSettings(warmup=0, repeats=1, min_seconds=0), target.providers)
    return sum(not t.op_type.startswith("Reorder") for t in timings)


def decide(measurements: Sequence[PairMeasurement]) -> PairMeasurement:
    """One pair's verdict over its sizes: the size with the median saving ratio."""
    ordered = sorted(measurements, key=lambda m: m.ratio)
    return dataclasses.replace(ordered[len(ordered) // 2], size="median",
                               nodes_added=max((m.nodes_added for m in measurements if m.nodes_added is not None),
                                               default=None))


def is_fused(verdict: PairMeasurement, criterion: str = "latency") -> bool:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown fusion criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    return verdict.fused or (criterion == "latency_or_node" and verdict.merged)


def rules_from_verdicts(verdicts: Sequence[PairMeasurement], criterion: str = "latency") -> FusionRules:
    fused: dict[str, bool] = {}
    for v in verdicts:  # a rule several pairs decide (an anchor) holds when any of them fuses
        fused[v.rule] = fused.get(v.rule, False) or is_fused(v, criterion)

    def named(prefix: str) -> list[str]:
        return sorted(rule.split(":", 1)[1] for rule, ok in fused.items() if rule.startswith(prefix + ":") and ok)

    anchors = named("anchors")
    if any(ok for rule, ok in fused.items() if rule.split(":")[0] in ("epilogue_ops", "affine", "residual_add", "self_gate")):
        anchors = sorted({"Conv", *anchors})
    values = dict(
        anchors=frozenset(anchors),
        # a chain ORT runs as one node is one kernel under either criterion: a boundary inside would split it
        patterns=frozenset(v.rule.split(":", 1)[1] for v in verdicts if v.rule.startswith("patterns:") and v.merged),
        epilogue_ops=frozenset(named("epilogue_ops")),
        affine=bool(fused.get("affine:Mul") and fused.get("affine:Add")),
        # nn-Meter: both gate forms must save time; by node: either merging is enough to keep a node whole
        self_gate=bool((any if criterion == "latency_or_node" else all)(
            fused.get(rule, False) for rule in ("self_gate:swish", "self_gate:hardswish"))),
        residual_add=bool(fused.get("residual_add")),
    )
    # not timed by a pair: where affine ops fold (before the activation) is read off ORT's optimized graphs
    values["affine_folds"] = values["affine"]
    # nor these: ONNX Runtime runs a DequantizeLinear that writes a graph output, its int8 convs channels-last,
    # and an interpolating Resize in float between Q and DQ (its optimized graphs, 1.32)
    values["output_dequantize"] = values["int8_channels_last"] = values["float_linear_resize"] = True
    if "residual_epilogue" in {f.name for f in dataclasses.fields(FusionRules)}:  # where FusionRules can say it
        values["residual_epilogue"] = values["residual_add"] and bool(fused.get("residual_epilogue"))
    return FusionRules(**values)


def detect_fusion_rules(
    target: Target,
    criterion: str = "latency",
    cases: Sequence[PairCase] = CASES,
    progress: Callable[[PairMeasurement], None] | None = None,
) -> tuple[FusionRules, list[PairMeasurement]]:
    """Time every candidate pair at every size: the rules, and every measurement (per size, then the verdicts)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown fusion criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    per_size: list[PairMeasurement] = []
    verdicts: list[PairMeasurement] = []
    for case in cases:
        got = []
        for i, shape in enumerate(case_shapes(case)):
            got.append(measure_pair(target, case, shape, seed=i))
            if progress:
                progress(got[-1])
        per_size += got
        verdicts.append(decide(got))
    return rules_from_verdicts(verdicts, criterion), per_size + verdicts


def detect_cpu_fusion_rules(target: Target | None = None, criterion: str = "latency_or_node",
                            **kwargs) -> tuple[FusionRules, list[PairMeasurement]]:
    """`detect_fusion_rules` on the `cpu` target (1 thread, ORT_ENABLE_ALL) unless another is given.

    The criterion defaults to `latency_or_node`: the cpu estimator is profiled in context, which needs
    every ORT node inside one kernel (module docstring).
    """
    from hwnas.targets import get_target

    return detect_fusion_rules(target or get_target("cpu"), criterion, **kwargs)


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def rules_document(rules: FusionRules, measurements: Sequence[PairMeasurement], target: Target, criterion: str,
                   load: Sequence[float] | None) -> dict:
    """What fusion_<kind>.json holds: the rules, and under `measured` how and when they were found."""
    verdicts = [m for m in measurements if m.size == "median"]
    return {
        **rules.to_dict(),
        "measured": {
            "how": "hwnas/estimator/cpu_fusion.py: nn-Meter pair test (fused when T1 + T2 - T12 > 0.5 min(T1, T2), "
                   f"median over {len(SIZES)} sizes, {TIMED_RUNS} interleaved runs each), criterion {criterion}",
            "date": datetime.date.today().isoformat(),
            "target": target.describe(),
            "load_average_1_5_15min": list(load) if load else None,
            "pairs": {v.pair: {"fused": is_fused(v, criterion), "saving_ratio": round(v.ratio, 3),
                               "ort_nodes_added": v.nodes_added} for v in verdicts},
        },
    }


def markdown_table(measurements: Sequence[PairMeasurement], criterion: str = "latency") -> str:
    """One row per pair (its verdict), with the saving ratio at every size."""
    by_pair: dict[str, list[PairMeasurement]] = {}
    for m in measurements:
        if m.size != "median":
            by_pair.setdefault(m.pair, []).append(m)
    lines = ["| pair | T1 µs | T2 µs | T12 µs | saving / min(T1, T2), per size | nn-Meter fused | ORT nodes added | fused | decides |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in (m for m in measurements if m.size == "median"):
        ratios = ", ".join(f"{m.ratio:.2f}" for m in by_pair.get(v.pair, []))
        nodes = "" if v.nodes_added is None else str(v.nodes_added)
        lines.append(f"| {v.pair} | {v.t1_ms * 1e3:.1f} | {v.t2_ms * 1e3:.1f} | {v.t12_ms * 1e3:.1f} | {v.ratio:.2f} ({ratios}) "
                     f"| {'yes' if v.fused else 'no'} | {nodes} | {'**yes**' if is_fused(v, criterion) else 'no'} | {v.rule} |")
    return "\n".join(lines)

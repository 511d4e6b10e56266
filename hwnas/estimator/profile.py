"""Profiling a target: sample kernels, measure them, fit the estimator, sample more where it errs.

Each sample is a one-kernel ONNX model (a conv with its epilogue, a depthwise conv, a GEMM, an
elementwise op, a pool, a resize, a concat) with random but realistic hyper-parameters: channel counts
and spatial sizes log-uniform over what mobile CNNs use, aligned and misaligned alike. The target
measures it; the kernel decomposition under the target's fusion rules gives its features.

Adaptive sampling (after nn-Meter): a first third of the budget is drawn at random; then, round by
round, a fresh batch is measured, the current estimator's error on it is computed *before* it joins the
training set, and the next batch perturbs the configurations with the largest errors (channel counts
±1…±PF, sizes ±25 %), so that measurements concentrate where the cost surface has cliffs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hwnas.estimator.estimator import LatencyEstimator, Sample, relative_errors
from hwnas.estimator.kernels import decompose
from hwnas.targets.base import Target

KINDS = ("conv", "pointwise", "dwconv", "grouped", "deconv", "gemm", "elementwise", "pool", "resize", "concat", "other")
_KIND_WEIGHTS = (0.2, 0.2, 0.2, 0.06, 0.03, 0.05, 0.1, 0.05, 0.04, 0.04, 0.03)
_EPILOGUES = ("none", "bn", "relu", "relu6", "hardswish", "bn_relu", "residual")


@dataclass(frozen=True)
class KernelConfig:
    kind: str
    c_in: int
    c_out: int
    size: int  # input height = width
    kernel: int = 1
    stride: int = 1
    group_size: int = 1  # channels per group for grouped convs
    dilation: int = 1
    epilogue: str = "none"
    op: str = ""  # elementwise / pool / resize flavour
    seed: int = 0


def _log_uniform(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def random_config(rng: np.random.Generator, pf: int) -> KernelConfig:
    kind = str(rng.choice(KINDS, p=np.array(_KIND_WEIGHTS) / sum(_KIND_WEIGHTS)))
    c_in, c_out = _log_uniform(rng, 3, 1280), _log_uniform(rng, 3, 1280)
    if rng.random() < 0.4:  # aligned counts are common in real models: make sure both sides of a cliff are seen
        c_in, c_out = max(pf, c_in // pf * pf), max(pf, c_out // pf * pf)
    size = _log_uniform(rng, 1, 160)
    seed = int(rng.integers(1 << 31))
    epilogue = str(rng.choice(_EPILOGUES))
    if kind in ("conv", "pointwise"):
        kernel = 1 if kind == "pointwise" else int(rng.choice([3, 5, 7]))
        c_in, c_out = min(c_in, 512 if kernel > 1 else 1280), c_out
        return KernelConfig("conv", c_in, c_out, max(size, kernel // 2 + 1), kernel, int(rng.choice([1, 1, 2])),
                            1, int(rng.choice([1, 1, 1, 2])) if kernel == 3 else 1, epilogue, seed=seed)
    if kind == "dwconv":
        kernel = int(rng.choice([3, 3, 5, 7]))
        return KernelConfig("dwconv", c_in, c_in, max(size, 2), kernel, int(rng.choice([1, 1, 2])), 1,
                            int(rng.choice([1, 1, 1, 2])) if kernel == 3 else 1, epilogue, seed=seed)
    if kind == "grouped":
        group = int(rng.choice([2, 4, 8, 16, 32, 64]))
        channels = max(group, c_in // group * group)
        return KernelConfig("grouped", channels, channels, max(size, 2), int(rng.choice([3, 5])), int(rng.choice([1, 2])),
                            group, 1, epilogue, seed=seed)
    if kind == "deconv":
        kernel = int(rng.choice([2, 3, 4]))
        return KernelConfig("deconv", min(c_in, 512), min(c_out, 512), max(1, size // 2), kernel, 2, seed=seed,
                            epilogue=str(rng.choice(["none", "bn", "relu", "bn_relu"])))
    if kind == "other":
        return KernelConfig("other", c_in, c_in, size, op=str(rng.choice(["Transpose", "Softmax"])), seed=seed)
    if kind == "gemm":
        return KernelConfig("gemm", c_in, c_out, 1, seed=seed, epilogue=str(rng.choice(["none", "relu"])))
    if kind == "elementwise":
        op = str(rng.choice(["Add", "Mul", "Relu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid"]))
        return KernelConfig("elementwise", c_in, c_in, size, op=op, seed=seed)
    if kind == "pool":
        op = str(rng.choice(["GlobalAveragePool", "MaxPool", "AveragePool"]))
        return KernelConfig("pool", c_in, c_in, max(size, 3), op=op, seed=seed)
    if kind == "resize":
        return KernelConfig("resize", c_in, c_in, max(1, size // 2), op=str(rng.choice(["nearest", "linear"])), seed=seed)
    return KernelConfig("concat", c_in, c_in + c_out, size, seed=seed)


def perturb(config: KernelConfig, rng: np.random.Generator, pf: int) -> KernelConfig:
    """A neighbour of `config`: channel counts moved across nearby lane boundaries, size ±25 %."""
    def move(c: int) -> int:
        return max(1, c + int(rng.integers(-pf, pf + 1)))

    size = max(1, int(round(config.size * rng.uniform(0.75, 1.25))))
    c_in = move(config.c_in)
    if config.kind == "grouped":
        c_in = max(config.group_size, c_in // config.group_size * config.group_size)
    c_out = c_in if config.kind in ("dwconv", "grouped", "elementwise", "pool", "resize", "other") else move(config.c_out)
    if config.kind == "concat":
        c_out = c_in + max(1, config.c_out - config.c_in + int(rng.integers(-pf, pf + 1)))
    size = max(size, config.kernel // 2 + 1) if config.kind in ("conv", "dwconv", "grouped") else size
    return dataclasses.replace(config, c_in=c_in, c_out=c_out, size=size, seed=int(rng.integers(1 << 31)))


def build_kernel_model(config: KernelConfig, residual_allowed: bool = True) -> onnx.ModelProto:
    """A one-kernel ONNX model (opset 17) for `config`; weights are random, values do not matter."""
    rng = np.random.default_rng(config.seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, shape) -> str:
        inits.append(numpy_helper.from_array(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1), name))
        return name

    h = config.size
    x_shape = [1, config.c_in, h, h] if config.kind != "gemm" else [1, config.c_in]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    out = "x"
    if config.kind in ("conv", "dwconv", "grouped"):
        groups = {"conv": 1, "dwconv": config.c_in, "grouped": config.c_in // config.group_size}[config.kind]
        pad = config.dilation * (config.kernel // 2)
        w = weight("w", [config.c_out, config.c_in // groups, config.kernel, config.kernel])
        nodes.append(helper.make_node("Conv", ["x", w, weight("b", [config.c_out])], ["conv"], name="kernel", group=groups,
                                      kernel_shape=[config.kernel] * 2, strides=[config.stride] * 2,
                                      pads=[pad] * 4, dilations=[config.dilation] * 2))
        out = _epilogue(config, nodes, weight, "conv", inputs, residual_allowed)
    elif config.kind == "deconv":
        w = weight("w", [config.c_in, config.c_out, config.kernel, config.kernel])
        nodes.append(helper.make_node("ConvTranspose", ["x", w, weight("b", [config.c_out])], ["deconv"], name="kernel",
                                      kernel_shape=[config.kernel] * 2, strides=[config.stride] * 2))
        out = _epilogue(config, nodes, weight, "deconv", inputs, residual_allowed)
    elif config.kind == "other":
        attrs = {"perm": [0, 2, 3, 1]} if config.op == "Transpose" else {"axis": 1}
        nodes.append(helper.make_node(config.op, ["x"], ["other"], name="kernel", **attrs))
        out = "other"
    elif config.kind == "gemm":
        nodes.append(helper.make_node("Gemm", ["x", weight("w", [config.c_out, config.c_in]), weight("b", [config.c_out])],
                                      ["gemm"], name="kernel", transB=1))
        out = "gemm"
        if config.epilogue == "relu":
            nodes.append(helper.make_node("Relu", [out], ["act"], name="act"))
            out = "act"
    elif config.kind == "elementwise":
        out = _elementwise(config, nodes, inputs, x_shape)
    elif config.kind == "pool":
        attrs = {} if config.op == "GlobalAveragePool" else {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
        nodes.append(helper.make_node(config.op, ["x"], ["pool"], name="kernel", **attrs))
        out = "pool"
    elif config.kind == "resize":
        inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
        nodes.append(helper.make_node("Resize", ["x", "", "scales"], ["resize"], name="kernel", mode=config.op))
        out = "resize"
    else:
        other = config.c_out - config.c_in
        inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, other, h, h]))
        nodes.append(helper.make_node("Concat", ["x", "x2"], ["concat"], name="kernel", axis=1))
        out = "concat"
    graph = helper.make_graph(nodes, "kernel", inputs, [helper.make_empty_tensor_value_info(out)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model)
    del model.graph.output[:]
    model.graph.output.extend([v for v in inferred.graph.output])
    return model


def _epilogue(config, nodes, weight, out, inputs, residual_allowed) -> str:
    c = config.c_out
    steps = {"bn": ["bn"], "relu": ["relu"], "relu6": ["relu6"], "hardswish": ["hardswish"],
             "bn_relu": ["bn", "relu"], "residual": ["residual"], "none": []}[config.epilogue]
    for step in steps:
        if step == "bn":
            params = [weight(f"bn_{p}", [c]) for p in ("scale", "bias", "mean")]
            var = weight("bn_var", [c])
            nodes.append(helper.make_node("Abs", [var], ["bn_var_pos"], name="bn_var_abs"))  # constant-foldable
            nodes.append(helper.make_node("BatchNormalization", [out, *params, "bn_var_pos"], ["bn"], name="bn"))
            out = "bn"
        elif step == "relu":
            nodes.append(helper.make_node("Relu", [out], ["relu"], name="relu"))
            out = "relu"
        elif step == "relu6":
            nodes.append(helper.make_node("Clip", [out, weight("lo", []), weight("hi", [])], ["relu6"], name="relu6"))
            out = "relu6"
        elif step == "hardswish":
            nodes.append(helper.make_node("HardSwish", [out], ["hswish"], name="hswish"))
            out = "hswish"
        elif step == "residual" and residual_allowed and config.stride == 1 and config.c_in == config.c_out:
            nodes.append(helper.make_node("Add", [out, "x"], ["residual"], name="residual"))
            out = "residual"
    return out


def _elementwise(config, nodes, inputs, x_shape) -> str:
    if config.op in ("Add", "Mul"):
        inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, x_shape))
        nodes.append(helper.make_node(config.op, ["x", "x2"], ["y"], name="kernel"))
    else:
        nodes.append(helper.make_node(config.op, ["x"], ["y"], name="kernel"))
    return "y"


@dataclass
class ProfileReport:
    """What profiling did, round by round: how many measurements, and the error on the fresh batch."""

    measurements: int = 0
    rounds: list[dict] = field(default_factory=list)


def _measure(target: Target, config: KernelConfig) -> Sample | None:
    model = build_kernel_model(config, residual_allowed=target.rules.residual_add)
    shapes = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in model.graph.input}
    kernels = [k for k in decompose(model, shapes, target.rules) if k.kind != "free"]
    if len(kernels) != 1:
        return None  # the target runs it as several kernels: no clean per-kernel figure
    return Sample(kernels[0], target.measure(model, shapes).latency_ms)


def profile_target(
    target: Target,
    budget: int,
    seed: int = 0,
    rounds: int = 5,
    progress: Callable[[int], None] | None = None,
) -> tuple[LatencyEstimator, ProfileReport]:
    """Measure up to `budget` kernels on `target` with adaptive sampling and fit an estimator on them."""
    rng = np.random.default_rng(seed)
    pf = target.parallelism_factor
    samples: list[Sample] = []
    configs: list[KernelConfig] = []
    report = ProfileReport()

    def take(batch: list[KernelConfig]) -> list[tuple[KernelConfig, Sample]]:
        got = []
        for config in batch:
            if len(samples) + len(got) >= budget:
                break
            sample = _measure(target, config)
            if progress:
                progress(1)
            if sample is not None:
                got.append((config, sample))
        return got

    first = take([random_config(rng, pf) for _ in range(max(1, budget // 3))])
    samples += [s for _, s in first]
    configs += [c for c, _ in first]
    per_round = max(1, (budget - len(samples)) // max(rounds, 1))
    estimator = _new_estimator(target, seed).fit(samples)
    while len(samples) < budget:
        worst = _worst_configs(estimator, configs, samples, keep=max(4, per_round // 4))
        batch = [perturb(worst[i % len(worst)], rng, pf) for i in range(per_round // 2)]
        batch += [random_config(rng, pf) for _ in range(per_round - len(batch))]
        got = take(batch)
        if not got:
            break
        predicted = [e.latency_ms for e in estimator.predict_kernels([s.kernel for _, s in got])]
        err = relative_errors(predicted, [s.latency_ms for _, s in got])
        report.rounds.append({"measured": len(got), "mape_before_fit": float(np.mean(err)),
                              "within_5pct_before_fit": float(np.mean(err <= 0.05))})
        samples += [s for _, s in got]
        configs += [c for c, _ in got]
        estimator = _new_estimator(target, seed).fit(samples)
    report.measurements = len(samples)
    return estimator, report


def _new_estimator(target: Target, seed: int) -> LatencyEstimator:
    return LatencyEstimator(target.name, target.parallelism_factor, target.rules, target.describe(), random_state=seed)


def _worst_configs(estimator: LatencyEstimator, configs: list[KernelConfig], samples: list[Sample], keep: int) -> list[KernelConfig]:
    """The configurations whose kernels the estimator fits worst (in-sample relative error)."""
    predicted = [e.latency_ms for e in estimator.predict_kernels([s.kernel for s in samples])]
    err = relative_errors(predicted, [s.latency_ms for s in samples])
    order = np.argsort(-err)[:keep]
    return [configs[i] for i in order]

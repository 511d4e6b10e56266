"""Profiling a target: sample kernels, measure them, fit the estimator, sample more where it errs.

Two ways to measure a kernel (`mode`):

- `kernel` (simulated targets, and any target that can only time whole models): each sample is a
  one-kernel ONNX model (a conv with its epilogue, a depthwise conv, a GEMM, an elementwise op, a pool,
  a resize, a concat) with random but realistic hyper-parameters: channel counts and spatial sizes
  log-uniform over what mobile CNNs use, aligned and misaligned alike. The target measures it; on a
  measured target the time of an almost empty model (the runtime's per-run overhead) is subtracted.
- `context` (the `cpu` target and `ort:CPUExecutionProvider`): each sample is a kernel *as it runs
  inside a model*. Random mobile-CNN-like networks (stems, IBN and depthwise-separable blocks,
  fused-IBN, grouped convs, SE gates, pools, branches, channel splits and shuffles, upsampling,
  heads; activations from Relu to decomposed hard-swish) are run warm, back to back, with ONNX
  Runtime's per-node profiler. Each node ORT ran is attributed to the kernel of `decompose` it came
  from (by node name; layout copies that ORT inserts, ReorderInput/ReorderOutput, go to the
  plain-layout op beside them, the one that needs the copy), minus what the profiler adds to a node
  and plus what the executor spends on it (both measured once on trivial chains:
  `measure_node_overheads`). So a network's kernels add up to its latency, layout copies and cache
  state included, which one-kernel models get wrong on a CPU: there every conv pays for converting
  its input to ORT's blocked layout and its output back, which inside a model happens once per layout
  change. docs/estimator.md has the measured comparison of the two modes.

Adaptive sampling (after nn-Meter): a first third of the budget is drawn at random; then, round by
round, a fresh batch is measured, the current estimator's error on it is computed *before* it joins the
training set, and the next batch perturbs the configurations with the largest errors (channel counts
±1…±PF, sizes ±25 %), so that measurements concentrate where the cost surface has cliffs. In `context`
mode the perturbed unit is the block that produced the kernel, measured at the head of a new network.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hwnas.estimator.estimator import LatencyEstimator, Sample, relative_errors
from hwnas.graph.shapes import Shape
from hwnas.targets.base import Target
from hwnas.targets.fusion_rules import FusionRules
from hwnas.targets.kernels import Kernel, decompose, node_keys

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




def overhead_model() -> onnx.ModelProto:
    """What a run costs when it computes (almost) nothing: a Relu on 16 numbers."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "empty", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _measure(target: Target, config: KernelConfig, rules: FusionRules, overhead_ms: float = 0.0) -> Sample | None:
    model = build_kernel_model(config, residual_allowed=rules.residual_add)
    shapes = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in model.graph.input}
    kernels = [k for k in decompose(model, shapes, rules) if k.kind != "free"]
    if len(kernels) != 1:
        return None  # the target runs it as several kernels: no clean per-kernel figure
    latency = target.measure(model, shapes).latency_ms
    if overhead_ms:
        latency = max(latency - overhead_ms, 0.1 * latency)  # a kernel faster than the noise: keep it positive
    return Sample(kernels[0], latency)


# ---- random networks: the samples of `context` mode --------------------------------------------------

ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "hardswish_decomposed", "hardsigmoid", "sigmoid", "swish",
               "leakyrelu")
_ACT_WEIGHTS = (0.12, 0.22, 0.2, 0.16, 0.1, 0.04, 0.04, 0.06, 0.06)
BLOCKS = ("conv", "dwsep", "ibn", "fused_ibn", "grouped", "se", "pool", "concat", "upsample", "deconv", "affine",
          "split", "shuffle")
_BLOCK_WEIGHTS = (0.16, 0.14, 0.2, 0.06, 0.04, 0.04, 0.04, 0.06, 0.07, 0.03, 0.07, 0.05, 0.04)
HEADS = ("classifier", "transpose", "softmax", "sigmoid")
_MAX_NETWORK_MACS = 400e6  # ~10-20 ms on one core: a network is run ~50 times


@dataclass(frozen=True)
class BlockConfig:
    """One block of a random network; what it builds depends on the channels it receives."""

    kind: str  # BLOCKS, or "head"
    c_out: int
    kernel: int = 3
    stride: int = 1
    hidden: int = 0  # ibn/fused-ibn expansion, se squeeze, concat first branch, split bypass
    group_size: int = 1  # grouped: channels per group; classifier head: width of the 1x1 conv before the pool
    act: str = "relu"
    bn: bool = True
    residual: bool = False  # ibn/fused-ibn: skip connection when shapes allow; upsample: concat a skip
    se: bool = False
    op: str = ""  # flavour: pool type, resize mode, head type, affine form; ibn: "post_act" after the residual
    groups: int = 2  # shuffle: channel groups


@dataclass(frozen=True)
class NetworkConfig:
    c_in: int
    size: int  # input height = width
    blocks: tuple[BlockConfig, ...]
    seed: int = 0


class GraphBuilder:
    """An ONNX graph under construction with every tensor's shape tracked; weights are initializers.

    Weights are He-scaled and batch norms near identity, so activations stay O(1) through a deep random
    network: denormal floats would slow a CPU down and distort the timings.
    """

    def __init__(self, seed: int = 0, dry: bool = False):
        self.rng = np.random.default_rng(seed)
        self.dry = dry  # shapes and MACs only: no weights are drawn
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.scope = "n"
        self.macs = 0
        self.skip = ""  # a tensor a later op may add back (residual); set by whoever builds the graph

    def input(self, name: str, shape: Sequence[int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        self.shapes[name] = tuple(shape)
        return name

    def const(self, array: np.ndarray) -> str:
        name = f"{self.scope}/w{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, shape: Sequence[int], fan_in: int) -> str:
        if self.dry:
            return self.const(np.zeros(0, np.float32))
        return self.const((self.rng.standard_normal(shape) * math.sqrt(2.0 / max(fan_in, 1))).astype(np.float32))

    def scalar(self, value: float) -> str:
        return self.const(np.array(value, np.float32))

    def node(self, op: str, inputs: Sequence[str], shape: Sequence[int], **attrs) -> str:
        name = f"{self.scope}/{op.lower()}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        self.shapes[name] = tuple(shape)
        return name

    def model(self, outputs: Sequence[str]) -> onnx.ModelProto:
        values = [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(self.shapes[o])) for o in outputs]
        graph = helper.make_graph(self.nodes, "network", self.inputs, values, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model


def _act(b: GraphBuilder, x: str, act: str) -> str:
    shape = b.shapes[x]
    if act == "none":
        return x
    if act == "relu6":
        return b.node("Clip", [x, b.scalar(0.0), b.scalar(6.0)], shape)
    if act == "hardswish_decomposed":  # Paddle's export: x · Clip(x + 3, 0, 6) / 6
        gate = b.node("Clip", [b.node("Add", [x, b.scalar(3.0)], shape), b.scalar(0.0), b.scalar(6.0)], shape)
        return b.node("Div", [b.node("Mul", [x, gate], shape), b.scalar(6.0)], shape)
    if act == "swish":
        return b.node("Mul", [x, b.node("Sigmoid", [x], shape)], shape)
    op, attrs = {"relu": ("Relu", {}), "hardswish": ("HardSwish", {}), "sigmoid": ("Sigmoid", {}),
                 "hardsigmoid": ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}),
                 "leakyrelu": ("LeakyRelu", {"alpha": 0.1})}[act]
    return b.node(op, [x], shape, **attrs)


def _bn(b: GraphBuilder, x: str) -> str:
    c = b.shapes[x][1]
    params = [b.const(b.rng.uniform(0.5, 1.5, c).astype(np.float32)), b.const(b.rng.normal(0, 0.1, c).astype(np.float32)),
              b.const(b.rng.normal(0, 0.1, c).astype(np.float32)), b.const(b.rng.uniform(0.5, 1.5, c).astype(np.float32))]
    return b.node("BatchNormalization", [x, *params], b.shapes[x])


def _conv(b: GraphBuilder, x: str, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1, bn: bool = True,
          act: str = "none") -> str:
    n, c, h, w = b.shapes[x]
    pad = kernel // 2
    ho, wo = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
    fan_in = c // groups * kernel * kernel
    inputs = [x, b.weight([c_out, c // groups, kernel, kernel], fan_in)]
    if not bn:
        inputs.append(b.const(b.rng.normal(0, 0.1, c_out).astype(np.float32)))
    y = b.node("Conv", inputs, (n, c_out, ho, wo), kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=[pad] * 4,
               group=groups)
    b.macs += n * c_out * ho * wo * fan_in
    return _act(b, _bn(b, y) if bn else y, act)


def _se(b: GraphBuilder, x: str, squeeze: int, gate: str) -> str:
    n, c, _, _ = b.shapes[x]
    pooled = b.node("GlobalAveragePool", [x], (n, c, 1, 1))
    s = _conv(b, pooled, squeeze, bn=False, act="relu")
    g = _conv(b, s, c, bn=False, act=gate)
    return b.node("Mul", [x, g], b.shapes[x])


def _build_block(b: GraphBuilder, x: str, blk: BlockConfig, skips: Mapping[int, str]) -> str:
    n, c, h, w = b.shapes[x]
    kind = blk.kind
    if kind == "conv":
        return _conv(b, x, blk.c_out, blk.kernel, blk.stride, 1, blk.bn, blk.act)
    if kind == "affine":  # conv, BN, then a learnable scalar or per-channel affine (PP-LCNetV3), then act
        y = _conv(b, x, blk.c_out, blk.kernel, blk.stride, 1, blk.bn)
        shape = (blk.c_out, 1, 1) if blk.op == "channel" else ()
        scale = b.const(b.rng.uniform(0.8, 1.2, shape).astype(np.float32))
        shift = b.const(b.rng.normal(0, 0.1, shape).astype(np.float32))
        y = b.node("Add", [b.node("Mul", [y, scale], b.shapes[y]), shift], b.shapes[y])
        return _act(b, y, blk.act)
    if kind == "dwsep":
        y = _conv(b, x, c, blk.kernel, blk.stride, c, True, blk.act)
        if blk.se:
            y = _se(b, y, max(4, c // 4), "hardsigmoid")
        return _conv(b, y, blk.c_out, act=blk.act if blk.op == "act" else "none")
    if kind in ("ibn", "fused_ibn"):
        hidden = max(blk.hidden, 1)
        if kind == "ibn":
            y = _conv(b, x, hidden, act=blk.act) if hidden != c else x
            y = _conv(b, y, hidden, blk.kernel, blk.stride, hidden, True, blk.act)
        else:
            y = _conv(b, x, hidden, blk.kernel, blk.stride, 1, True, blk.act)
        if blk.se:
            y = _se(b, y, max(4, hidden // 4), "hardsigmoid" if blk.act.startswith("hard") else "sigmoid")
        y = _conv(b, y, blk.c_out)
        if blk.residual and b.shapes[y] == b.shapes[x]:
            y = b.node("Add", [y, x], b.shapes[y])
            if blk.op == "post_act":  # an activation after the sum (ResNet's Add → Relu)
                y = _act(b, y, blk.act)
        return y
    if kind == "grouped":
        groups = c // blk.group_size if c % blk.group_size == 0 else math.gcd(c, blk.c_out)
        c_out = max(groups, blk.c_out // groups * groups)
        return _conv(b, x, c_out, blk.kernel, blk.stride, groups, True, blk.act)
    if kind == "se":
        return _se(b, x, max(4, blk.hidden), blk.op or "hardsigmoid")
    if kind == "pool":
        ho, wo = (h + 1) // 2, (w + 1) // 2
        attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
        return b.node(blk.op or "MaxPool", [x], (n, c, ho, wo), **attrs)
    if kind == "concat":
        first = max(1, min(blk.hidden, blk.c_out - 1))
        left = _conv(b, x, first, 1, blk.stride, act=blk.act)
        right = _conv(b, x, blk.c_out - first, 3, blk.stride, act=blk.act)
        return b.node("Concat", [left, right], (n, blk.c_out, *b.shapes[left][2:]), axis=1)
    if kind == "upsample":
        scales = b.const(np.array([1, 1, 2, 2], np.float32))
        y = b.node("Resize", [x, "", scales], (n, c, 2 * h, 2 * w), mode=blk.op or "nearest")
        skip = skips.get(2 * h)
        if blk.residual and skip is not None and b.shapes[skip][3] == 2 * w:
            y = b.node("Concat", [y, skip], (n, c + b.shapes[skip][1], 2 * h, 2 * w), axis=1)
        return _conv(b, y, blk.c_out, 1, act=blk.act)
    if kind == "deconv":
        k = blk.kernel
        pads, out_pad = {2: (0, 0), 3: (1, 1), 4: (1, 0)}[k]
        w_ = b.weight([c, blk.c_out, k, k], c * k * k)
        y = b.node("ConvTranspose", [x, w_, b.const(np.zeros(blk.c_out, np.float32))], (n, blk.c_out, 2 * h, 2 * w),
                   kernel_shape=[k, k], strides=[2, 2], pads=[pads] * 4, output_padding=[out_pad] * 2)
        b.macs += n * c * h * w * blk.c_out * k * k
        return _act(b, _bn(b, y) if blk.bn else y, blk.act)
    if kind == "split":  # part of the channels bypass, the rest go through a conv, then concat
        if c < 2:
            return x
        first = max(1, min(c - 1, blk.hidden or c // 2))
        a, rest = f"{b.scope}/split{len(b.nodes)}_a", f"{b.scope}/split{len(b.nodes)}_b"
        b.nodes.append(helper.make_node("Split", [x, b.const(np.array([first, c - first], np.int64))], [a, rest],
                                        name=f"{b.scope}/split{len(b.nodes)}", axis=1))
        b.shapes[a], b.shapes[rest] = (n, first, h, w), (n, c - first, h, w)
        y = _conv(b, rest, c - first, blk.kernel, 1, (c - first) if blk.op == "depthwise" else 1, True, blk.act)
        return b.node("Concat", [a, y], (n, c, h, w), axis=1)
    if kind == "shuffle":  # channel shuffle: Reshape to groups, swap, Reshape back
        g = blk.groups if c % blk.groups == 0 else 1
        grouped = b.node("Reshape", [x, b.const(np.array([n, g, c // g, h, w], np.int64))], (n, g, c // g, h, w))
        swapped = b.node("Transpose", [grouped], (n, c // g, g, h, w), perm=[0, 2, 1, 3, 4])
        return b.node("Reshape", [swapped, b.const(np.array([n, c, h, w], np.int64))], (n, c, h, w))
    if kind == "head":
        return _head(b, x, blk)
    raise ValueError(f"unknown block kind {kind!r}")


def _head(b: GraphBuilder, x: str, blk: BlockConfig) -> str:
    n, c, h, w = b.shapes[x]
    if blk.op == "classifier":
        if blk.group_size > 1:  # a wide 1x1 conv first, as MobileNet's 1280 and ShuffleNet's 1024 before the pool
            x = _conv(b, x, blk.group_size, act=blk.act)
            c = blk.group_size
        pooled = b.node("GlobalAveragePool", [x], (n, c, 1, 1))
        flat = b.node("Flatten", [pooled], (n, c), axis=1)
        y = b.node("Gemm", [flat, b.weight([blk.c_out, c], c), b.const(np.zeros(blk.c_out, np.float32))], (n, blk.c_out),
                   transB=1)
        b.macs += n * c * blk.c_out
        if blk.hidden:
            y = _act(b, y, "relu" if blk.act == "none" else blk.act)
            y = b.node("Gemm", [y, b.weight([blk.hidden, blk.c_out], blk.c_out), b.const(np.zeros(blk.hidden, np.float32))],
                       (n, blk.hidden), transB=1)
            b.macs += n * blk.c_out * blk.hidden
        return y
    y = _conv(b, x, blk.c_out, 1, bn=False)
    if blk.op == "transpose":
        t = b.node("Transpose", [y], (n, h, w, blk.c_out), perm=[0, 2, 3, 1])
        return b.node("Reshape", [t, b.const(np.array([n, -1, blk.c_out], np.int64))], (n, h * w, blk.c_out))
    if blk.op == "softmax":
        return b.node("Softmax", [y], b.shapes[y], axis=1)
    return b.node("Sigmoid", [y], b.shapes[y])


def _apply(b: GraphBuilder, x: str, index: int, blk: BlockConfig, skips: dict[int, str]) -> str:
    b.scope = f"b{index}"
    y = _build_block(b, x, blk, skips)
    if len(b.shapes[y]) == 4:
        skips[b.shapes[y][2]] = y  # the latest map of each size: what an upsample block may concat
    return y


def build_network(config: NetworkConfig) -> tuple[onnx.ModelProto, list[tuple[int, int]]]:
    """The network's ONNX model and each block's input (channels, size); node names start `b<block>/`."""
    b = GraphBuilder(config.seed)
    x = b.input("x", (1, config.c_in, config.size, config.size))
    skips: dict[int, str] = {}
    block_inputs = []
    for i, blk in enumerate(config.blocks):
        block_inputs.append((b.shapes[x][1], b.shapes[x][2]))
        x = _apply(b, x, i, blk, skips)
    return b.model([x]), block_inputs


def block_of(kernel: Kernel) -> int:
    """The index of the block a kernel of `build_network`'s model came from."""
    return int(kernel.nodes[0].split("/", 1)[0][1:])


def _channels(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Log-uniform in [lo, hi]; mostly rounded to 8 or 16 as real models are, often not."""
    c = _log_uniform(rng, lo, max(lo, hi))
    r = rng.random()
    multiple = 8 if r < 0.4 else 16 if r < 0.55 else 4 if r < 0.65 else 1
    return max(lo, c // multiple * multiple) if multiple <= c else c


def _act_choice(rng: np.random.Generator) -> str:
    return str(rng.choice(ACTIVATIONS, p=np.array(_ACT_WEIGHTS) / sum(_ACT_WEIGHTS)))


def random_block(rng: np.random.Generator, c: int, h: int) -> BlockConfig:
    """A block that fits an input of `c` channels at `h`×`h` (strides only where `h` allows)."""
    kinds = [k for k in BLOCKS if not (k == "pool" and h < 4) and not (k in ("upsample", "deconv") and not 2 <= h <= 160)
             and not (k == "split" and c < 2)]
    weights = np.array([_BLOCK_WEIGHTS[BLOCKS.index(k)] for k in kinds])
    kind = str(rng.choice(kinds, p=weights / weights.sum()))
    hi = int(min(1280, max(24, 2**17 / max(h, 1) ** 1.3)))  # wide layers only where the maps are small
    c_out = _channels(rng, 4, hi)
    stride = int(rng.choice([1, 1, 2])) if h >= 4 else 1
    act = _act_choice(rng)
    if kind == "conv":
        kernel = int(rng.choice([1, 1, 3, 3, 3, 5, 7]))
        return BlockConfig("conv", min(c_out, 512) if kernel > 1 else c_out, kernel, stride, act=act,
                           bn=bool(rng.random() < 0.85))
    if kind == "affine":
        return BlockConfig("affine", c_out, int(rng.choice([1, 3])), stride, act=act, op=str(rng.choice(["scalar", "channel"])))
    if kind == "dwsep":
        return BlockConfig("dwsep", c_out, int(rng.choice([3, 3, 5])), stride, act=act, se=bool(rng.random() < 0.2),
                           op=str(rng.choice(["act", "linear"])))
    if kind in ("ibn", "fused_ibn"):
        residual = stride == 1 and rng.random() < 0.5
        hidden = _channels(rng, max(4, c), max(4, c * 6)) if rng.random() < 0.85 else c
        return BlockConfig(kind, c if residual else c_out, int(rng.choice([3, 3, 5, 7])) if kind == "ibn" else 3, stride,
                           hidden=min(hidden, 1280), act=act, residual=residual, se=bool(rng.random() < 0.25),
                           op="post_act" if residual and rng.random() < 0.3 else "")
    if kind == "grouped":
        return BlockConfig("grouped", c_out, int(rng.choice([3, 5])), stride, group_size=int(rng.choice([2, 4, 8, 16, 32])), act=act)
    if kind == "se":
        return BlockConfig("se", c, hidden=max(4, c // int(rng.choice([4, 8]))), op=str(rng.choice(["hardsigmoid", "sigmoid"])))
    if kind == "pool":
        return BlockConfig("pool", c, op=str(rng.choice(["MaxPool", "AveragePool"])))
    if kind == "concat":
        return BlockConfig("concat", max(c_out, 2), stride=stride, hidden=max(1, c_out // 2), act=act)
    if kind == "split":
        return BlockConfig("split", c, int(rng.choice([1, 3])), hidden=max(1, int(c * rng.uniform(0.25, 0.75))), act=act,
                           op=str(rng.choice(["dense", "depthwise"])))
    if kind == "shuffle":
        return BlockConfig("shuffle", c, groups=int(rng.choice([2, 2, 3, 4])))
    if kind == "upsample":
        return BlockConfig("upsample", c_out, op=str(rng.choice(["nearest", "linear"])), act=act, residual=bool(rng.random() < 0.6))
    return BlockConfig("deconv", min(c_out, 256), int(rng.choice([2, 3, 4])), 2, act=act, bn=bool(rng.random() < 0.5))


def random_head(rng: np.random.Generator, c: int, h: int = 1) -> BlockConfig:
    op = str(rng.choice(HEADS, p=[0.6, 0.15, 0.125, 0.125]))
    if op == "classifier":  # ImageNet's 1000 classes often, after a wide 1x1 conv half the time
        classes = 1000 if rng.random() < 0.4 else _channels(rng, 8, 1280)
        widen = _channels(rng, 256, 1280) if rng.random() < 0.5 else 1
        widen = widen if c * widen * h * h <= 100e6 else 1  # not a conv of billions of MACs on a big map
        return BlockConfig("head", classes, op=op, hidden=_channels(rng, 2, 1000) if rng.random() < 0.3 else 0,
                           act=_act_choice(rng), group_size=widen)
    return BlockConfig("head", _channels(rng, 1, 128), op=op)


def _grow(rng: np.random.Generator, c_in: int, size: int, count: int, given: Sequence[BlockConfig] = ()) -> NetworkConfig:
    """`given` blocks, then up to `count` random ones while the network stays under the MAC budget."""
    b = GraphBuilder(dry=True)
    x = b.input("x", (1, c_in, size, size))
    skips: dict[int, str] = {}
    blocks = list(given)
    for i, blk in enumerate(blocks):
        x = _apply(b, x, i, blk, skips)
    for _ in range(count):
        if len(b.shapes[x]) != 4:  # a head ended the network
            break
        _, c, h, _ = b.shapes[x]
        blk = random_block(rng, c, h)
        y = _apply(b, x, len(blocks), blk, skips)
        if b.macs > _MAX_NETWORK_MACS:
            break
        blocks.append(blk)
        x = y
    if rng.random() < 0.5 and len(b.shapes[x]) == 4:
        blocks.append(random_head(rng, b.shapes[x][1], b.shapes[x][2]))
    return NetworkConfig(c_in, size, tuple(blocks), seed=int(rng.integers(1 << 31)))


def random_network(rng: np.random.Generator) -> NetworkConfig:
    """A random mobile-CNN-like network: an image (or feature map) input, a stem, 3 to 11 blocks, maybe a head."""
    size = _log_uniform(rng, 16, 320) if rng.random() < 0.9 else int(rng.choice([448, 512, 640]))
    c_in = 3 if rng.random() < 0.6 else _channels(rng, 4, 256)
    stem = []
    if c_in == 3 and size >= 32:
        stem.append(BlockConfig("conv", _channels(rng, 8, 48), 3, 2, act=_act_choice(rng)))
    return _grow(rng, c_in, size, int(rng.integers(3, 12)), stem)


def network_around(rng: np.random.Generator, block: BlockConfig, c: int, h: int) -> NetworkConfig:
    """A network whose second block is `block` at input `c`×`h`×`h` (a 1×1 conv from an image leads in)."""
    lead = BlockConfig("conv", c, 1, act=_act_choice(rng))
    return _grow(rng, 3, h, int(rng.integers(1, 4)), (lead, block))


def perturb_block(block: BlockConfig, c: int, h: int, rng: np.random.Generator, pf: int) -> tuple[BlockConfig, int, int]:
    """A neighbour of a block and its input: channel counts moved across nearby lane boundaries, size ±25 %."""
    def move(v: int) -> int:
        return max(1, v + int(rng.integers(-pf, pf + 1)))

    c2 = move(c)
    h2 = max(1, int(round(h * rng.uniform(0.75, 1.25))))
    if block.kind in ("upsample", "deconv"):
        h2 = min(max(h2, 2), 160)
    if block.kind == "pool" or block.stride > 1:
        h2 = max(h2, 4)
    if block.kind == "split":
        c2 = max(c2, 2)
    same = block.kind in ("se", "pool", "split", "shuffle") or block.residual and block.kind in ("ibn", "fused_ibn")
    c_out = c2 if same else max(2 if block.kind == "concat" else 1, move(block.c_out))
    hidden = move(block.hidden) if block.hidden else 0
    return dataclasses.replace(block, c_out=c_out, hidden=hidden), c2, h2


# ---- measuring kernels in context (ORT's per-node profiler) ------------------------------------------


@dataclass(frozen=True)
class NetworkProfile:
    """One profiled network: each kernel's time inside it, and how the times were obtained."""

    kernels: tuple[Kernel, ...]  # the non-free kernels that ran as node(s) of their own
    latency_ms: tuple[float, ...]
    total_ms: float  # the plain runs' median
    nodes_ms: float  # the profiled nodes' sum (per run, median per node)
    dropped: tuple[str, ...] = ()  # kernels without a node of their own, and the kernels they were fused into


@dataclass(frozen=True)
class NodeOverheads:
    """What a run costs besides its nodes' work, on this machine (`measure_node_overheads`)."""

    profiler_ms: float = 0.0  # what ORT's profiler adds to every node it times (subtracted)
    executor_ms: float = 0.0  # what the executor spends per node outside the profiled time (added)
    run_ms: float = 0.0  # what every run costs once: the Python call, feeding inputs, fetching outputs (added)


def measure_in_context(model: onnx.ModelProto, shapes: Mapping[str, Shape], rules: FusionRules, settings,
                       providers=("CPUExecutionProvider",), overheads: NodeOverheads = NodeOverheads(),
                       scale_to_run: bool = False) -> NetworkProfile:
    """Run `model` with ORT's profiler (and plainly, for `total_ms`) and attribute the time to its kernels."""
    plain_ms, timings, optimized = _profile_and_time(model, shapes, settings, providers)
    kernels = decompose(model, shapes, rules)
    return attribute(model, kernels, timings, optimized, float(np.median(plain_ms)), overheads, scale_to_run)


def measure_node_overheads(settings, providers=("CPUExecutionProvider",), nodes: int = 128) -> NodeOverheads:
    """Time chains of 1 and `nodes` trivial ops (Relu/Neg on 16 numbers), profiled and plain.

    executor = (T_plain(nodes) − T_plain(1)) / (nodes − 1), the whole cost of a trivial node (~0.25 µs on a
    2-core EPYC, ORT 1.32); run = T_plain(1) − executor (~5 µs); profiler = the profiled duration of a
    trivial node minus executor (~1.8 µs: left in, every small kernel would look 2 µs slower than it is).
    Tiny models, medians over 200 runs: robust to a busy machine, unlike a big network's run median."""
    def chain(n: int) -> onnx.ModelProto:
        b = GraphBuilder()
        x = b.input("x", (1, 16))
        for i in range(n):
            x = b.node("Relu" if i % 2 == 0 else "Neg", [x], (1, 16))
        return b.model([x])

    runs = dataclasses.replace(settings, warmup=max(settings.warmup, 10), repeats=max(settings.repeats, 200), min_seconds=0.0)
    one, _, _ = _profile_and_time(chain(1), {}, runs, providers)
    many, timings, _ = _profile_and_time(chain(nodes), {}, runs, providers)
    executor = max(0.0, float(np.median(many) - np.median(one)) / (nodes - 1))
    profiled = sum(t.duration_ms for t in timings) / nodes
    return NodeOverheads(profiler_ms=max(0.0, profiled - executor), executor_ms=executor,
                         run_ms=max(0.0, float(np.median(one)) - executor))


def _profile_and_time(model: onnx.ModelProto, shapes: Mapping[str, Shape], settings, providers):
    """(plain run times, per-node timings, ORT's optimized graph) of `model`: a profiled session run
    `warmup` + `repeats` times back to back, then a plain one timed with the protocol of
    `hwnas.targets.measure` — each warm, as the `cpu` target measures a model (running the two in
    alternation would leave each run the other's caches: 20-50 % slower on a 1 ms model)."""
    from hwnas.graph.shapes import resolve_input_shapes
    from hwnas.targets.measure import interleave, node_timings, profiling_session
    from hwnas.graph.session import make_session, random_feeds, run

    feeds = random_feeds(model, resolve_input_shapes(model, shapes), seed=0)
    with tempfile.TemporaryDirectory(prefix="hwnas-context-") as tmp:
        # the optimized graph gives node names and wiring as ORT runs them
        profiled = profiling_session(model, settings, providers, os.path.join(tmp, "trace"),
                                     os.path.join(tmp, "optimized.onnx"))
        for _ in range(settings.warmup + settings.repeats):
            run(profiled, feeds)
        with open(profiled.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
        optimized = onnx.load(os.path.join(tmp, "optimized.onnx"))
    del profiled
    plain = make_session(model, optimized=True, threads=settings.threads, providers=list(providers))
    plain_ms = interleave({"plain": partial(run, plain, feeds)}, settings)["plain"]
    return plain_ms, node_timings(events, skip_runs=settings.warmup), optimized


def attribute(model: onnx.ModelProto, kernels: Sequence[Kernel], timings, optimized: onnx.ModelProto,
              total_ms: float, overheads: NodeOverheads = NodeOverheads(), scale_to_run: bool = False) -> NetworkProfile:
    """Each non-free kernel's time inside the network: the nodes ORT ran for it, plus the executor's share.

    Which kernel an ORT node (of `optimized`, ORT's graph as it ran) belongs to:
    - a node named like an original node (ORT's fused and blocked-layout nodes keep one of their
      original nodes' names, blocked ones with `_nchwc` added): that node's kernel;
    - a layout copy ORT inserted: the plain-layout op beside it, the one that needs the copy (a
      ReorderOutput belongs to the op that reads its output, a ReorderInput to the op that wrote its
      input; the other side where that is a model input or output);
    - any other node ORT made (a function op expanded, e.g. HardSwish into HardSigmoid and Mul; the
      Reshapes around a blocked-layout Add): the kernel whose original output tensor it, or a node
      after it, writes; failing that, the op before it.
    A node counts its profiled time minus what the profiler adds to it, plus what the executor spends on
    it outside that time (`overheads`, measured once per machine by `measure_node_overheads`); the
    per-run cost is shared equally. So a network's kernels add up to its latency without using its own
    run time, which on a busy machine includes waits for a core that short nodes' medians mostly avoid.
    `scale_to_run=True` scales them to `total_ms` (the plain runs' median) instead: the same on a quiet
    machine. A node of a free kernel (a Reshape ORT runs) counts for the next kernel that is not.
    Kernels ORT ran no node for (it fused them into another kernel's
    node) are dropped, with the kernels that feed them (`dropped`).
    """
    owner = {key: i for i, k in enumerate(kernels) for key in k.nodes}
    original_producer = {o: owner[key] for key, n in zip(_keys(model), model.graph.node) for o in n.output if o}
    graph = optimized.graph
    ort_nodes = _named_ort_nodes(graph, timings)
    producer = {o: name for name, n in ort_nodes.items() for o in n.output if o}
    consumers: dict[str, list[str]] = {}
    for name, n in ort_nodes.items():
        for t in dict.fromkeys(t for t in n.input if t):
            consumers.setdefault(t, []).append(name)

    def direct(name: str) -> int | None:
        """The kernel of the original node this ORT node is named after: `X`, `X_nchwc`, `fused X`,
        `X/QuickGeluFusion/`... X is a node name, or for a blocked-layout node (`X_nchwc`) the name of the
        tensor it writes: ORT names those after their output, which only models whose nodes are named
        like their outputs (the profiling networks, the zoo) cannot tell apart."""
        blocked = name.endswith("_nchwc")
        name = name.removeprefix("fused ").removesuffix("_nchwc")
        for names in ((original_producer, owner) if blocked else (owner, original_producer)):
            if name in names:
                return names[name]
        cuts = [i for i, ch in enumerate(name) if ch in "/_:"]
        return next((owner[name[:i]] for i in reversed(cuts) if name[:i] in owner), None)

    def written(node) -> int | None:
        return next((original_producer[t] for t in node.output if t in original_producer), None)

    def downstream(name: str, seen: set[str]) -> int | None:
        """The kernel of a node ORT made: the original tensor it or a later made node writes, or the op it feeds."""
        hit = direct(name)
        if hit is not None or name in seen or name not in ort_nodes:
            return hit
        seen.add(name)
        node = ort_nodes[name]
        hit = written(node)
        if hit is not None or node.op_type == "ReorderOutput":
            return hit
        return next((k for t in node.output for c in consumers.get(t, ()) if (k := downstream(c, seen)) is not None), None)

    def upstream(name: str, seen: set[str]) -> int | None:
        hit = direct(name)
        if hit is not None or name in seen or name not in ort_nodes:
            return hit
        seen.add(name)
        return next((k for t in ort_nodes[name].input if t in producer if (k := upstream(producer[t], seen)) is not None), None)

    def resolve(name: str, seen: frozenset[str] = frozenset()) -> int | None:
        hit = direct(name)
        node = ort_nodes.get(name)
        if hit is not None or node is None or name in seen:
            return hit
        seen = seen | {name}
        readers = [c for t in node.output for c in consumers.get(t, ())]
        writers = [producer[t] for t in node.input if t in producer]
        if node.op_type == "ReorderOutput":
            found = (resolve(c, seen) for c in readers)
            return next((k for k in found if k is not None), written(node))
        if node.op_type == "ReorderInput":
            found = (resolve(n, seen) for n in writers + readers)
            return next((k for k in found if k is not None), None)
        found = downstream(name, set())
        return found if found is not None else upstream(name, set())

    times = np.zeros(len(kernels))
    counts = np.zeros(len(kernels))
    carrier = _carriers(kernels)
    for t in timings:
        k = resolve(t.name)
        k = carrier[k] if k is not None else None
        if k is not None:
            times[k] += max(t.duration_ms - overheads.profiler_ms, 0.05 * t.duration_ms) + overheads.executor_ms
            counts[k] += 1
    nodes_ms = float(sum(t.duration_ms for t in timings))
    live = np.array([k.kind != "free" and counts[i] > 0 for i, k in enumerate(kernels)], dtype=bool)
    if live.any():
        times[live] += overheads.run_ms / live.sum()
    if scale_to_run and times[live].sum() > 0:
        times[live] *= total_ms / float(times[live].sum())
    dropped = _absorbed(model, kernels, live)
    keep = [i for i in range(len(kernels)) if live[i] and kernels[i].name not in dropped]
    return NetworkProfile(tuple(kernels[i] for i in keep), tuple(float(times[i]) for i in keep), total_ms, nodes_ms,
                          tuple(sorted(dropped)))


def _named_ort_nodes(graph: onnx.GraphProto, timings) -> dict[str, onnx.NodeProto]:
    """ORT's graph by the names its profiler uses. The saved graph leaves the nodes of an inlined function
    (HardSwish → HardSigmoid, Mul) unnamed while the profiler calls them `<op>_<index>`: those are
    matched by op type in execution order, which is the saved graph's order."""
    named = {n.name: n for n in graph.node if n.name}
    unnamed: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        if not n.name:
            unnamed.setdefault(n.op_type, []).append(n)
    for t in timings:
        if t.name not in named and unnamed.get(t.op_type):
            named[t.name] = unnamed[t.op_type].pop(0)
    return named


def _keys(model: onnx.ModelProto) -> tuple[str, ...]:
    return node_keys(list(model.graph.node))


def _carriers(kernels: Sequence[Kernel]) -> list[int | None]:
    """Which kernel carries each kernel's time: itself, or for a free one (costed 0 by the estimator) the
    next kernel that is not free (the previous one at the end)."""
    live = [i for i, k in enumerate(kernels) if k.kind != "free"]
    if not live:
        return [None] * len(kernels)
    return [i if kernels[i].kind != "free" else next((j for j in live if j > i), live[-1]) for i in range(len(kernels))]


def _absorbed(model: onnx.ModelProto, kernels: Sequence[Kernel], live: np.ndarray) -> set[str]:
    """Kernels ORT ran no node for (it fused them into a neighbour), and the kernels that feed them."""
    owner = {key: k.name for k in kernels for key in k.nodes}
    nodes = list(model.graph.node)
    keys = _keys(model)
    producer = {o: keys[i] for i, n in enumerate(nodes) for o in n.output if o}
    inputs_of = {keys[i]: [t for t in n.input if t] for i, n in enumerate(nodes)}
    dropped: set[str] = set()
    for i, k in enumerate(kernels):
        if k.kind == "free" or live[i]:
            continue
        dropped.add(k.name)
        for key in k.nodes:
            for t in inputs_of.get(key, ()):
                if t in producer and owner.get(producer[t]) not in (None, k.name):
                    dropped.add(owner[producer[t]])
    return dropped


# ---- profiling loops ----------------------------------------------------------------------------------

MODES = ("kernel", "context")


@dataclass
class ProfileReport:
    """What profiling did, round by round: how many measurements, and the error on the fresh batch."""

    measurements: int = 0
    rounds: list[dict] = field(default_factory=list)
    mode: str = "kernel"
    networks: int = 0  # context mode: networks profiled
    load_average: list[float] = field(default_factory=list)  # 1-minute load average before each measurement


def supports_context(target: Target) -> bool:
    """Whether `target` runs ONNX Runtime's CPU provider, whose per-node profile `context` mode reads."""
    from hwnas.targets.measure import CPU_PROVIDER
    from hwnas.targets.ort_ep import OrtTarget

    return isinstance(target, OrtTarget) and target.provider == CPU_PROVIDER


def default_mode(target: Target) -> str:
    return "context" if supports_context(target) else "kernel"


def profile_target(
    target: Target,
    budget: int,
    seed: int = 0,
    rounds: int = 5,
    progress: Callable[[int], None] | None = None,
    mode: str | None = None,
    rules: FusionRules | None = None,
    scale_to_run: bool = False,
) -> tuple[LatencyEstimator, ProfileReport]:
    """Measure up to `budget` kernels on `target` with adaptive sampling and fit an estimator on them.

    `mode`: `kernel` (one-kernel models) or `context` (kernels inside random networks, ORT CPU only);
    by default `context` where the target supports it. `rules`: the fusion rules the kernels are cut by
    (default: the target's). `scale_to_run` (context mode): scale each network's kernels to its
    measured run time rather than adding the measured executor overhead (`attribute`).
    """
    mode = mode or default_mode(target)
    if mode not in MODES:
        raise ValueError(f"unknown profiling mode {mode!r}; known: {', '.join(MODES)}")
    if mode == "context" and not supports_context(target):
        raise ValueError(f"context mode needs ONNX Runtime's CPU provider; {target.name} is not one")
    rules = rules or target.rules
    sampler = (_ContextSampler(target, rules, seed, scale_to_run) if mode == "context"
               else _KernelSampler(target, rules, seed))
    estimator, report = _adaptive(target, rules, sampler, budget, seed, rounds, progress)
    report.mode = mode
    report.networks = getattr(sampler, "networks", 0)
    report.load_average = sampler.load
    if sampler.measured:
        estimator.target_config["machine"] = machine_entry(report)
    estimator.target_config["profiling"] = {"mode": mode, "budget": budget, "seed": seed,
                                            "measurements": report.measurements, "networks": report.networks}
    if mode == "context":
        estimator.kernel_offset_ms = per_kernel_offset(estimator.samples_, sampler.network_ms)
        ratios = sampler.run_over_nodes
        estimator.target_config["profiling"].update(
            overheads_us={key.removesuffix("_ms"): round(value * 1e3, 3) for key, value in dataclasses.asdict(sampler.overheads).items()},
            scale_to_run=scale_to_run,
            # ~1.0-1.1 on a quiet machine; much more means runs waited for a core (busy machine)
            run_over_profiled_nodes={"median": round(float(np.median(ratios)), 3), "p90": round(float(np.percentile(ratios, 90)), 3)}
            if ratios else None,
            # whole-network latencies: what the kernels of each network should add up to (cross-validation)
            network_ms=[round(t, 5) for t in sampler.network_ms],
            kernel_offset_us=round(estimator.kernel_offset_ms * 1e3, 3))
    return estimator, report


def per_kernel_offset(samples: Sequence[Sample], network_ms: Sequence[float]) -> float:
    """What the attribution adds per kernel beyond a network's plain run: the median over the profiled
    networks of (kernel sum - plain run) / kernels, in ms, at least 0.

    The profiler's per-node cost is measured on trivial nodes (`measure_node_overheads`); on real nodes
    it is somewhat larger, so a network's kernels add up to a little more than its plain run: ~0.7 us
    per kernel on a 2-core EPYC, nothing in a 12-kernel 2 ms network, but 8 % of a 55-kernel 0.5 ms
    model (MobileNetV2 0.35 at 96²). The median keeps networks whose plain run waited for a core (a
    busy machine) from pulling it down much. Networks whose kernels were not all kept (one the budget
    cut short, kernels dropped by `attribute`) still count: a missing kernel makes the sum smaller, so
    the offset errs low."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for s in samples:
        if s.network is not None and s.network < len(network_ms):
            sums[s.network] = sums.get(s.network, 0.0) + s.latency_ms
            counts[s.network] = counts.get(s.network, 0) + 1
    if not sums:
        return 0.0
    return max(0.0, float(np.median([(sums[n] - network_ms[n]) / counts[n] for n in sums])))


def machine_entry(report: ProfileReport) -> dict:
    """What a measured estimator only fits: this CPU, this ONNX Runtime, and how busy the machine was."""
    import onnxruntime as ort

    from hwnas.targets.measure import cpu_model

    load = report.load_average
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "date": datetime.date.today().isoformat(),
        "load_average_1min": ({"min": round(min(load), 2), "mean": round(float(np.mean(load)), 2), "max": round(max(load), 2)}
                              if load else None),
        "note": "fits this machine only; re-profile on another (docs/estimator.md). The load average counts the "
                "profiling process itself (~1 on an otherwise idle machine).",
    }


def _load() -> float:
    try:
        return float(os.getloadavg()[0])
    except OSError:  # not available on this platform
        return float("nan")


class _KernelSampler:
    """One-kernel models; on a measured target minus the time of an almost empty model."""

    def __init__(self, target: Target, rules: FusionRules, seed: int):
        self.target, self.rules = target, rules
        self.rng = np.random.default_rng(seed)
        self.pf = target.parallelism_factor
        self.load: list[float] = []
        probe = target.measure(overhead_model(), {})
        self.measured = probe.cycles is None  # simulated targets count cycles; nothing to subtract there
        self.overhead_ms = probe.latency_ms if self.measured else 0.0

    def random(self) -> list[tuple[object, Sample]]:
        return self._measure(random_config(self.rng, self.pf))

    def around(self, origin: KernelConfig) -> list[tuple[object, Sample]]:
        return self._measure(perturb(origin, self.rng, self.pf))

    def _measure(self, config: KernelConfig) -> list[tuple[object, Sample]]:
        if self.measured:
            self.load.append(_load())
        sample = _measure(self.target, config, self.rules, self.overhead_ms)
        return [] if sample is None else [(config, sample)]


class _ContextSampler:
    """Random networks profiled node by node; each kernel's origin is the block that produced it."""

    measured = True

    def __init__(self, target: Target, rules: FusionRules, seed: int, scale_to_run: bool = False):
        self.target, self.rules = target, rules
        self.rng = np.random.default_rng(seed)
        self.pf = target.parallelism_factor
        self.load: list[float] = []
        self.networks = 0
        self.scale_to_run = scale_to_run
        self.run_over_nodes: list[float] = []  # each network's plain-run median / profiled node sum
        self.network_ms: list[float] = []  # each network's plain-run median (index: `Sample.network`)
        self.overheads = measure_node_overheads(target.settings, target.providers)

    def random(self) -> list[tuple[object, Sample]]:
        return self._measure(random_network(self.rng))

    def around(self, origin: tuple[BlockConfig, int, int]) -> list[tuple[object, Sample]]:
        block, c, h = perturb_block(*origin, self.rng, self.pf)
        return self._measure(network_around(self.rng, block, c, h))

    def _measure(self, config: NetworkConfig) -> list[tuple[object, Sample]]:
        model, block_inputs = build_network(config)
        self.load.append(_load())
        profile = measure_in_context(model, {"x": (1, config.c_in, config.size, config.size)}, self.rules,
                                     self.target.settings, self.target.providers, self.overheads, self.scale_to_run)
        network = self.networks
        self.networks += 1
        self.run_over_nodes.append(profile.total_ms / max(profile.nodes_ms, 1e-9))
        self.network_ms.append(profile.total_ms)
        return [((config.blocks[block_of(k)], *block_inputs[block_of(k)]), Sample(k, t, network))
                for k, t in zip(profile.kernels, profile.latency_ms)]


def _adaptive(target: Target, rules: FusionRules, sampler, budget: int, seed: int, rounds: int,
              progress: Callable[[int], None] | None) -> tuple[LatencyEstimator, ProfileReport]:
    samples: list[Sample] = []
    origins: list = []
    report = ProfileReport()

    def take(draws: Callable[[int], list], want: int) -> list:
        got: list = []
        i = 0
        while len(got) < want and len(samples) + len(got) < budget:
            new = draws(i)[: budget - len(samples) - len(got)]
            i += 1
            if progress and new:
                progress(len(new))
            got += new
            if i > 20 * max(want, 1):  # nothing measurable comes out: stop rather than spin
                break
        return got

    first = take(lambda _: sampler.random(), max(1, budget // 3))
    samples += [s for _, s in first]
    origins += [o for o, _ in first]
    per_round = max(1, (budget - len(samples)) // max(rounds, 1))
    estimator = _new_estimator(target, rules, seed).fit(samples)
    while len(samples) < budget:
        worst = _worst(estimator, origins, samples, keep=max(4, per_round // 4))
        got = take(lambda i: sampler.around(worst[(i // 2) % len(worst)]) if i % 2 == 0 else sampler.random(), per_round)
        if not got:
            break
        predicted = [e.latency_ms for e in estimator.predict_kernels([s.kernel for _, s in got])]
        err = relative_errors(predicted, [s.latency_ms for _, s in got])
        report.rounds.append({"measured": len(got), "mape_before_fit": float(np.mean(err)),
                              "within_5pct_before_fit": float(np.mean(err <= 0.05))})
        samples += [s for _, s in got]
        origins += [o for o, _ in got]
        estimator = _new_estimator(target, rules, seed).fit(samples)
    report.measurements = len(samples)
    return estimator, report


def _new_estimator(target: Target, rules: FusionRules, seed: int) -> LatencyEstimator:
    return LatencyEstimator(target.name, target.parallelism_factor, rules, target.describe(), random_state=seed)


def _worst(estimator: LatencyEstimator, origins: list, samples: list[Sample], keep: int) -> list:
    """The origins (configurations, blocks) of the kernels the estimator fits worst (in-sample relative error)."""
    predicted = [e.latency_ms for e in estimator.predict_kernels([s.kernel for s in samples])]
    err = relative_errors(predicted, [s.latency_ms for s in samples])
    order = np.argsort(-err)[:keep]
    return [origins[i] for i in order]

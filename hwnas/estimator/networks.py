"""The profiling samples: one-kernel models (`kernel` mode) and random mobile-CNN-like networks (`context` mode).

One-kernel models: a conv with its epilogue, a depthwise conv, a GEMM, an elementwise op, a pool, a
resize or a concat, with random but realistic hyper-parameters (channel counts and spatial sizes
log-uniform over what mobile CNNs use, aligned and misaligned alike). Random networks: stems, IBN and
depthwise-separable blocks, fused-IBN, grouped convs, SE gates, pools, branches, channel splits and
shuffles, upsampling, heads; activations from Relu to decomposed hard-swish. `perturb`/`perturb_block`
move a configuration a little (channel counts ±1…±PF, sizes ±25 %): what adaptive sampling
(`hwnas.estimator.profile`) draws around the worst-predicted samples.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hwnas.graph.builder import GraphBuilder
from hwnas.targets.kernels import Kernel

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
        return KernelConfig("other", c_in, c_in, size, op=str(rng.choice(["Transpose", "Softmax", "Softmax:last"])), seed=seed)
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
        # Softmax over the channels (axis 1) or the innermost axis ("Softmax:last"): 10-20x apart per element
        op, _, flavour = config.op.partition(":")
        attrs = {"perm": [0, 2, 3, 1]} if op == "Transpose" else {"axis": -1 if flavour == "last" else 1}
        nodes.append(helper.make_node(op, ["x"], ["other"], name="kernel", **attrs))
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


class NetworkBuilder(GraphBuilder):
    """A random network under construction: weights are initializers named by scope, MACs are counted.

    Weights are He-scaled and batch norms near identity, so activations stay O(1) through a deep random
    network: denormal floats would slow a CPU down and distort the timings.
    """

    def __init__(self, seed: int = 0, dry: bool = False):
        super().__init__(seed)
        self.dry = dry  # shapes and MACs only: no weights are drawn
        self.macs = 0
        self.skip = ""  # a tensor a later op may add back (residual); set by whoever builds the graph
        self.keep_width_below = 0  # NetworkConfig.keep_width_below

    def strides(self, h: int, stride: int) -> tuple[int, int]:
        """(height, width) strides of a strided op on a map of `h` rows."""
        return stride, 1 if h < self.keep_width_below else stride

    def const(self, array: np.ndarray) -> str:
        return self.initializer(f"{self.scope}/w{len(self.initializers)}", array)

    def weight(self, shape: Sequence[int], fan_in: int) -> str:
        if self.dry:
            return self.const(np.zeros(0, np.float32))
        return self.const((self.rng.standard_normal(shape) * math.sqrt(2.0 / max(fan_in, 1))).astype(np.float32))

    def scalar(self, value: float) -> str:
        return self.const(np.array(value, np.float32))


ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "hardswish_decomposed", "hardsigmoid", "sigmoid", "swish",
               "leakyrelu", "gelu", "softplus")
_ACT_WEIGHTS = (0.12, 0.22, 0.2, 0.16, 0.1, 0.04, 0.04, 0.06, 0.06, 0.05, 0.03)
# attention: a transformer encoder block on the map's pixels as tokens (text recognisers' SVTR necks,
# hybrid ViTs); large_dw: a depthwise-separable block with a 7x7 or 9x9 depthwise conv (ConvNeXt, newer
# text detectors), a quarter of them 1-D over the pixels as one sequence (1-D text recognisers); pixel_shuffle: a 2x space-to-depth or depth-to-space as a 6-d Reshape/Transpose/Reshape
# (exporters' pixel shuffle, rapidocr lite's detector: 4-8x a 4-d Transpose's time per element) or the
# DepthToSpace op, then a 1x1 conv
BLOCKS = ("conv", "dwsep", "ibn", "fused_ibn", "grouped", "se", "pool", "concat", "upsample", "deconv", "affine",
          "split", "shuffle", "attention", "large_dw", "pixel_shuffle")
# Block weights per mix. "any": every family a user may bring. "mobile": what is deployed quantized (the int8
# networks' mix): mobile CNNs' inverted bottlenecks and depthwise-separable blocks, 57 % of the blocks (44 % in
# "any"). Drawn from "any", a profile's int8 half held ~35 aligned int8 3x3 depthwise convs, and its int8
# regressors put the aligned MobileNetV2s' depthwise convs 12-15 % above their time in context (from "mobile": 0-7 %).
BLOCK_MIXES = {
    "any": (0.16, 0.14, 0.2, 0.06, 0.04, 0.04, 0.04, 0.06, 0.1, 0.03, 0.07, 0.05, 0.04, 0.06, 0.04, 0.03),
    "mobile": (0.14, 0.18, 0.30, 0.06, 0.02, 0.05, 0.03, 0.04, 0.06, 0.02, 0.02, 0.02, 0.01, 0.01, 0.03, 0.01),
}
PIXEL_SHUFFLES = ("space_to_depth", "depth_to_space", "DepthToSpace")
# the side of the map a pixel shuffle reads: depth-to-space forms at most 80; space-to-depth (a detector's stem or
# head: rapidocr lite's at 320x320) at most 320
MAX_DEPTH_TO_SPACE, MAX_SPACE_TO_DEPTH = 80, 320
# Resize attributes as exporters write them: PyTorch's and Paddle's nearest (pixel replication, which ORT's CPU
# runs in its blocked layout at ~0.1 ns per output element), ONNX's defaults (~0.7-1.5), PyTorch's bilinear
# (pytorch_half_pixel, ~1.5: not blocked) and align_corners=True, and half_pixel (~0.4, blocked)
UPSAMPLES = {
    "nearest_asymmetric": dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    "nearest": dict(mode="nearest"),
    "linear": dict(mode="linear"),
    "linear_pytorch": dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
    "linear_align_corners": dict(mode="linear", coordinate_transformation_mode="align_corners"),
}
_UPSAMPLE_WEIGHTS = (0.35, 0.15, 0.2, 0.2, 0.1)
MAX_UPSAMPLED = 320  # an upsample block's output side at most
MAX_TOKENS = 1024  # attention only on maps of at most 32x32: its scores grow with tokens squared
# softmax: over the channels of a map (axis 1, which ORT transposes innermost and back); softmax_last: over
# the classes of each position after a transpose to tokens (a CTC recogniser's head, the innermost axis)
# segment: per-pixel classes bilinearly resized back to the input's side (a segmenter's last op: 8x to 512² in the
# zoo's); upsample blocks stop at MAX_UPSAMPLED and had never drawn an 8x linear one, which on a 2-core Xeon
# ran 2-3x a 2x one's time per element
HEADS = ("classifier", "transpose", "softmax", "softmax_last", "sigmoid", "lstm", "segment")
MAX_LSTM_STEPS = 128  # an LSTM head only on maps at most this wide: its steps run one after another
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
    residual: bool = False  # ibn/fused-ibn: skip connection when shapes allow
    skip: str = ""  # upsample: how an earlier map of the output's size joins ("concat", "add"), if one does
    scale: int = 2  # upsample: the factor
    se: bool = False
    op: str = ""  # flavour: pool type, resize form (UPSAMPLES), head type, affine form, attention's LayerNorm form; ibn: "post_act" after the residual
    groups: int = 2  # shuffle: channel groups; lstm head: directions
    interpolation: str = ""  # segment head: its Resize's form (UPSAMPLES)


@dataclass(frozen=True)
class NetworkConfig:
    c_in: int
    size: int  # input height (and width, unless `width` says otherwise)
    blocks: tuple[BlockConfig, ...]
    seed: int = 0
    # a text line's input (`text_line_network`): `width` columns (0: `size`), and below `keep_width_below` rows a
    # strided conv or pool halves the height only, as text recognisers' (2, 1) strides do (0: never)
    width: int = 0
    keep_width_below: int = 0


def _act(b: NetworkBuilder, x: str, act: str) -> str:
    shape = b.shapes[x]
    if act == "none":
        return x
    if act == "relu6":
        return b.node("Clip", [x, b.scalar(0.0), b.scalar(6.0)], shape)
    if act == "hardswish_decomposed":  # Paddle's export: x · Clip(x + 3, 0, 6) / 6
        gate = b.node("Clip", [b.node("Add", [x, b.scalar(3.0)], shape), b.scalar(0.0), b.scalar(6.0)], shape)
        return b.node("Div", [b.node("Mul", [x, gate], shape), b.scalar(6.0)], shape)
    if act == "softplus":  # log(1 + e^x): detectors' probability maps (rapidocr lite's DB head); ~11 ns per element in ORT
        return b.node("Softplus", [x], shape)
    if act == "swish":
        return b.node("Mul", [x, b.node("Sigmoid", [x], shape)], shape)
    if act == "gelu":  # PyTorch's and Paddle's export: (x · (1 + erf(x / √2))) · 0.5, the order ORT fuses into Gelu
        erf = b.node("Erf", [b.node("Div", [x, b.scalar(math.sqrt(2.0))], shape)], shape)
        gated = b.node("Mul", [x, b.node("Add", [erf, b.scalar(1.0)], shape)], shape)
        return b.node("Mul", [gated, b.scalar(0.5)], shape)
    op, attrs = {"relu": ("Relu", {}), "hardswish": ("HardSwish", {}), "sigmoid": ("Sigmoid", {}),
                 "hardsigmoid": ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}),
                 "leakyrelu": ("LeakyRelu", {"alpha": 0.1})}[act]
    return b.node(op, [x], shape, **attrs)


def _affine(b: NetworkBuilder, x: str, shape: tuple[int, ...], scale_first: bool = False) -> str:
    """x · scale + shift with learnable constants of `shape` (scalar, (C, 1, 1), (1,))."""
    scale = b.const(b.rng.uniform(0.8, 1.2, shape).astype(np.float32))
    shift = b.const(b.rng.normal(0, 0.1, shape).astype(np.float32))
    scaled = b.node("Mul", [scale, x] if scale_first else [x, scale], b.shapes[x])
    return b.node("Add", [scaled, shift], b.shapes[x])


def _bn(b: NetworkBuilder, x: str) -> str:
    c = b.shapes[x][1]
    params = [b.const(b.rng.uniform(0.5, 1.5, c).astype(np.float32)), b.const(b.rng.normal(0, 0.1, c).astype(np.float32)),
              b.const(b.rng.normal(0, 0.1, c).astype(np.float32)), b.const(b.rng.uniform(0.5, 1.5, c).astype(np.float32))]
    return b.node("BatchNormalization", [x, *params], b.shapes[x])


def _conv(b: NetworkBuilder, x: str, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1, bn: bool = True,
          act: str = "none") -> str:
    n, c, h, w = b.shapes[x]
    pad = kernel // 2
    sh, sw = b.strides(h, stride)
    ho, wo = (h + 2 * pad - kernel) // sh + 1, (w + 2 * pad - kernel) // sw + 1
    fan_in = c // groups * kernel * kernel
    inputs = [x, b.weight([c_out, c // groups, kernel, kernel], fan_in)]
    if not bn:
        inputs.append(b.const(b.rng.normal(0, 0.1, c_out).astype(np.float32)))
    y = b.node("Conv", inputs, (n, c_out, ho, wo), kernel_shape=[kernel] * 2, strides=[sh, sw], pads=[pad] * 4,
               group=groups)
    b.macs += n * c_out * ho * wo * fan_in
    return _act(b, _bn(b, y) if bn else y, act)


def _conv1d_depthwise(b: NetworkBuilder, x: str, kernel: int, act: str) -> str:
    """A depthwise conv over the map's pixels as one sequence ([n,c,h,w] -> [n,c,h*w] -> Conv1D -> back), as 1-D
    recognisers run theirs (rapidocr lite's, 9 taps): ORT's blocked NCHWc layout is 2-D only, so a 1-D conv
    takes the im2col path per group, ~6x an aligned 2-D depthwise conv's time per MAC."""
    n, c, h, w = b.shapes[x]
    seq = b.node("Reshape", [x, b.const(np.array([n, c, h * w], np.int64))], (n, c, h * w))
    y = b.node("Conv", [seq, b.weight([c, 1, kernel], kernel)], (n, c, h * w), kernel_shape=[kernel], strides=[1],
               pads=[kernel // 2] * 2, group=c)
    b.macs += n * c * h * w * kernel
    y = _act(b, _bn(b, y), act)
    return b.node("Reshape", [y, b.const(np.array([n, c, h, w], np.int64))], (n, c, h, w))


def _se(b: NetworkBuilder, x: str, squeeze: int, gate: str) -> str:
    n, c, _, _ = b.shapes[x]
    pooled = b.node("GlobalAveragePool", [x], (n, c, 1, 1))
    s = _conv(b, pooled, squeeze, bn=False, act="relu")
    g = _conv(b, s, c, bn=False, act=gate)
    return b.node("Mul", [x, g], b.shapes[x])


def _build_block(b: NetworkBuilder, x: str, blk: BlockConfig, skips: Mapping[int, str]) -> str:
    n, c, h, w = b.shapes[x]
    kind = blk.kind
    if kind == "conv":
        return _conv(b, x, blk.c_out, blk.kernel, blk.stride, 1, blk.bn, blk.act)
    if kind == "affine":  # conv, BN, then a learnable scalar or per-channel affine (PP-LCNetV3), then act
        y = _conv(b, x, blk.c_out, blk.kernel, blk.stride, 1, blk.bn)
        shape = (blk.c_out, 1, 1) if blk.op == "channel" else ()
        y = _affine(b, y, shape)
        if blk.op != "around_act":
            return _act(b, y, blk.act)
        # PP-LCNetV3 as Paddle exports it (PP-OCRv5 det): an affine on either side of the activation, the
        # scale first in the Mul; the one after it ORT runs as nodes of its own (`FusionRules.affine_folds`)
        return _affine(b, _act(b, y, blk.act), (1,), scale_first=True)
    if kind == "dwsep":
        y = _conv1d_depthwise(b, x, blk.kernel, blk.act) if blk.op == "1d" else _conv(b, x, c, blk.kernel, blk.stride, c, True, blk.act)
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
        sh, sw = b.strides(h, 2)
        ho, wo = (h - 1) // sh + 1, (w - 1) // sw + 1
        attrs = {"kernel_shape": [3, 3], "strides": [sh, sw], "pads": [1, 1, 1, 1]}
        return b.node(blk.op or "MaxPool", [x], (n, c, ho, wo), **attrs)
    if kind == "concat":
        first = max(1, min(blk.hidden, blk.c_out - 1))
        left = _conv(b, x, first, 1, blk.stride, act=blk.act)
        right = _conv(b, x, blk.c_out - first, 3, blk.stride, act=blk.act)
        return b.node("Concat", [left, right], (n, blk.c_out, *b.shapes[left][2:]), axis=1)
    if kind == "upsample":
        f = blk.scale
        scales = b.const(np.array([1, 1, f, f], np.float32))
        y = b.node("Resize", [x, "", scales], (n, c, f * h, f * w), **UPSAMPLES[blk.op or "nearest"])
        skip = skips.get(f * h)
        if blk.skip and skip is not None and b.shapes[skip][3] == f * w:
            if blk.skip == "add":  # a feature pyramid's top-down path: the skip through a 1x1 lateral conv, added
                y = b.node("Add", [y, _conv(b, skip, c, 1, bn=False, act="none")], (n, c, f * h, f * w))
            else:
                y = b.node("Concat", [y, skip], (n, c + b.shapes[skip][1], f * h, f * w), axis=1)
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
    if kind == "attention":
        return _attention(b, x, blk)
    if kind == "shuffle":  # channel shuffle: Reshape to groups, swap, Reshape back
        g = blk.groups if c % blk.groups == 0 else 1
        grouped = b.node("Reshape", [x, b.const(np.array([n, g, c // g, h, w], np.int64))], (n, g, c // g, h, w))
        swapped = b.node("Transpose", [grouped], (n, c // g, g, h, w), perm=[0, 2, 1, 3, 4])
        return b.node("Reshape", [swapped, b.const(np.array([n, c, h, w], np.int64))], (n, c, h, w))
    if kind == "pixel_shuffle":
        return _conv(b, _pixel_shuffle(b, x, blk.op), blk.c_out, act=blk.act)
    if kind == "head":
        return _head(b, x, blk)
    raise ValueError(f"unknown block kind {kind!r}")


def _pixel_shuffle(b: NetworkBuilder, x: str, form: str) -> str:
    """A 2x rearrangement of pixels and channels. `space_to_depth`: [n,c,h,w] -> [n,c,h/2,2,w/2,2] ->
    Transpose(0,1,3,5,2,4) -> [n,4c,h/2,w/2] (rapidocr lite's detector; odd maps fall back to the next form);
    `depth_to_space`: PyTorch's PixelShuffle, [n,c,h,w] -> [n,c/4,2,2,h,w] -> Transpose(0,1,4,2,5,3) ->
    [n,c/4,2h,2w] (after a 1x1 conv to a multiple of 4 channels); `DepthToSpace`: the ONNX op for the same."""
    n, c, h, w = b.shapes[x]
    if form == "space_to_depth" and h % 2 == 0 and w % 2 == 0:
        six = b.node("Reshape", [x, b.const(np.array([n, c, h // 2, 2, w // 2, 2], np.int64))], (n, c, h // 2, 2, w // 2, 2))
        moved = b.node("Transpose", [six], (n, c, 2, 2, h // 2, w // 2), perm=[0, 1, 3, 5, 2, 4])
        return b.node("Reshape", [moved, b.const(np.array([n, 4 * c, h // 2, w // 2], np.int64))], (n, 4 * c, h // 2, w // 2))
    if c % 4:
        x = _conv(b, x, max(4, c // 4 * 4))
        c = b.shapes[x][1]
    if form == "DepthToSpace":
        return b.node("DepthToSpace", [x], (n, c // 4, 2 * h, 2 * w), blocksize=2, mode="CRD")
    six = b.node("Reshape", [x, b.const(np.array([n, c // 4, 2, 2, h, w], np.int64))], (n, c // 4, 2, 2, h, w))
    moved = b.node("Transpose", [six], (n, c // 4, h, 2, w, 2), perm=[0, 1, 4, 2, 5, 3])
    return b.node("Reshape", [moved, b.const(np.array([n, c // 4, 2 * h, 2 * w], np.int64))], (n, c // 4, 2 * h, 2 * w))


def _layer_norm(b: NetworkBuilder, x: str, decomposed: bool = False) -> str:
    """LayerNorm over the last axis: the op, or (`decomposed`) the chain exporters write for it before
    opset 17, which ORT fuses back into one LayerNormalization node."""
    shape = b.shapes[x]
    c = shape[-1]
    scale, shift = b.const(b.rng.uniform(0.5, 1.5, c).astype(np.float32)), b.const(b.rng.normal(0, 0.1, c).astype(np.float32))
    if not decomposed:
        return b.node("LayerNormalization", [x, scale, shift], shape, axis=-1)
    reduced = (*shape[:-1], 1)
    centred = b.node("Sub", [x, b.node("ReduceMean", [x], reduced, axes=[-1])], shape)
    variance = b.node("ReduceMean", [b.node("Pow", [centred, b.scalar(2.0)], shape)], reduced, axes=[-1])
    root = b.node("Sqrt", [b.node("Add", [variance, b.scalar(1e-5)], reduced)], reduced)
    return b.node("Add", [b.node("Mul", [b.node("Div", [centred, root], shape), scale], shape), shift], shape)


def _linear(b: NetworkBuilder, x: str, out: int) -> str:
    """MatMul by a [in, out] weight plus a bias Add, as PyTorch exports nn.Linear on 3-d tokens."""
    n, tokens, c = b.shapes[x]
    y = b.node("MatMul", [x, b.weight([c, out], c)], (n, tokens, out))
    b.macs += n * tokens * c * out
    return b.node("Add", [y, b.const(b.rng.normal(0, 0.1, out).astype(np.float32))], (n, tokens, out))


def _attention(b: NetworkBuilder, x: str, blk: BlockConfig) -> str:
    """A pre-norm transformer encoder block on the map's pixels as tokens, back to the map after:
    LayerNorm, QKV projection, `groups` heads of scaled dot-product attention (batched MatMuls, Softmax
    over the last axis), output projection, residual; LayerNorm, MLP of `hidden` with `act`, residual."""
    n, c, h, w = b.shapes[x]
    tokens, heads = h * w, math.gcd(c, blk.groups)  # a perturbed channel count may not split into the heads
    d = c // heads
    flat = b.node("Reshape", [x, b.const(np.array([n, c, tokens], np.int64))], (n, c, tokens))
    t = b.node("Transpose", [flat], (n, tokens, c), perm=[0, 2, 1])
    decomposed = blk.op == "decomposed_ln"
    qkv = _linear(b, _layer_norm(b, t, decomposed), 3 * c)
    parts = [f"{b.scope}/qkv{len(b.nodes)}_{p}" for p in "qkv"]
    b.nodes.append(helper.make_node("Split", [qkv, b.const(np.array([c, c, c], np.int64))], parts,
                                    name=f"{b.scope}/split{len(b.nodes)}", axis=-1))
    for p in parts:
        b.shapes[p] = (n, tokens, c)

    def split_heads(p: str, perm: list[int], shape: tuple[int, ...]) -> str:
        grouped = b.node("Reshape", [p, b.const(np.array([n, tokens, heads, d], np.int64))], (n, tokens, heads, d))
        return b.node("Transpose", [grouped], shape, perm=perm)

    q = split_heads(parts[0], [0, 2, 1, 3], (n, heads, tokens, d))
    k = split_heads(parts[1], [0, 2, 3, 1], (n, heads, d, tokens))
    v = split_heads(parts[2], [0, 2, 1, 3], (n, heads, tokens, d))
    scores = b.node("MatMul", [q, k], (n, heads, tokens, tokens))
    scaled = b.node("Mul", [scores, b.scalar(1.0 / math.sqrt(d))], (n, heads, tokens, tokens))
    attn = b.node("Softmax", [scaled], (n, heads, tokens, tokens), axis=-1)
    o = b.node("MatMul", [attn, v], (n, heads, tokens, d))
    b.macs += 2 * n * heads * tokens * tokens * d
    merged = b.node("Transpose", [o], (n, tokens, heads, d), perm=[0, 2, 1, 3])
    merged = b.node("Reshape", [merged, b.const(np.array([n, tokens, c], np.int64))], (n, tokens, c))
    t = b.node("Add", [t, _linear(b, merged, c)], (n, tokens, c))
    mlp = _linear(b, _act(b, _linear(b, _layer_norm(b, t, decomposed), blk.hidden), blk.act), c)
    t = b.node("Add", [t, mlp], (n, tokens, c))
    back = b.node("Transpose", [t], (n, c, tokens), perm=[0, 2, 1])
    return b.node("Reshape", [back, b.const(np.array([n, c, h, w], np.int64))], (n, c, h, w))


def _head(b: NetworkBuilder, x: str, blk: BlockConfig) -> str:
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
    if blk.op == "lstm":  # a CRNN recogniser's: the map's height averaged away, its columns a sequence through an LSTM
        seq = b.node("ReduceMean", [x], (n, c, w), axes=[2], keepdims=0)
        steps = b.node("Transpose", [seq], (w, n, c), perm=[2, 0, 1])
        dirs, hidden = blk.groups, blk.hidden
        weights = [b.weight([dirs, 4 * hidden, c], c), b.weight([dirs, 4 * hidden, hidden], hidden),
                   b.const(np.zeros((dirs, 8 * hidden), np.float32))]
        y = b.node("LSTM", [steps, *weights], (w, dirs, n, hidden), hidden_size=hidden,
                   direction="bidirectional" if dirs == 2 else "forward")
        b.macs += w * dirs * n * (c + hidden) * 4 * hidden
        if blk.c_out == 1:
            return b.node("Reshape", [y, b.const(np.array([w, n, dirs * hidden], np.int64))], (w, n, dirs * hidden))
        rows = b.node("Reshape", [y, b.const(np.array([w * n, dirs * hidden], np.int64))], (w * n, dirs * hidden))
        b.macs += w * n * dirs * hidden * blk.c_out
        return b.node("Gemm", [rows, b.weight([blk.c_out, dirs * hidden], dirs * hidden), b.const(np.zeros(blk.c_out, np.float32))],
                      (w * n, blk.c_out), transB=1)
    y = _conv(b, x, blk.c_out, 1, bn=False)
    if blk.op == "segment":  # to the input's side (2x where the map is that size already)
        rows, columns = max(b.shapes["x"][2], 2 * h), max(b.shapes["x"][3], 2 * w)
        sizes = b.const(np.array([n, blk.c_out, rows, columns], np.int64))
        return b.node("Resize", [y, "", "", sizes], (n, blk.c_out, rows, columns), **UPSAMPLES[blk.interpolation])
    if blk.op in ("transpose", "softmax_last"):
        t = b.node("Transpose", [y], (n, h, w, blk.c_out), perm=[0, 2, 3, 1])
        tokens = b.node("Reshape", [t, b.const(np.array([n, -1, blk.c_out], np.int64))], (n, h * w, blk.c_out))
        return tokens if blk.op == "transpose" else b.node("Softmax", [tokens], (n, h * w, blk.c_out), axis=-1)
    if blk.op == "softmax":
        return b.node("Softmax", [y], b.shapes[y], axis=1)
    return b.node("Sigmoid", [y], b.shapes[y])


def _apply(b: NetworkBuilder, x: str, index: int, blk: BlockConfig, skips: dict[int, str]) -> str:
    b.scope = f"b{index}"
    y = _build_block(b, x, blk, skips)
    if len(b.shapes[y]) == 4:
        skips[b.shapes[y][2]] = y  # the latest map of each size: what an upsample block may concat
    return y


def build_network(config: NetworkConfig) -> tuple[onnx.ModelProto, list[tuple[int, int]]]:
    """The network's ONNX model and each block's input (channels, size); node names start `b<block>/`."""
    b = NetworkBuilder(config.seed)
    b.keep_width_below = config.keep_width_below
    x = b.input("x", (1, config.c_in, config.size, config.width or config.size))
    skips: dict[int, str] = {}
    block_inputs = []
    for i, blk in enumerate(config.blocks):
        block_inputs.append((b.shapes[x][1], b.shapes[x][2]))
        x = _apply(b, x, i, blk, skips)
    return b.model([x]), block_inputs


def block_of(kernel: Kernel, default: int | None = None) -> int:
    """The index of the block a kernel of `build_network`'s model came from: the first of its nodes named
    `b<block>/...`, else `default` (nodes a rewrite added without such a name: ORT's quantization
    pre-processing splits HardSwish into an unnamed HardSigmoid and Mul)."""
    for name in kernel.nodes:
        match = re.match(r"b(\d+)/", name)
        if match:
            return int(match[1])
    if default is None:
        raise ValueError(f"kernel {kernel.name} has no node named after its block")
    return default


# How a random network's channel counts are drawn, and the share of networks drawn each way. ORT's CPU runs a conv in
# its blocked layout (NCHWc, 16 channels a block with AVX-512) only when its channels are multiples of the block, and
# copies between layouts where a blocked conv meets an unblocked op. Real models keep one layout from end to end, so
# a profile made of networks whose layout changes at every conv prices their kernels with copies they never make:
# - "aligned": every count a multiple of 8 or 16, as most models are (without these, aligned convs were priced
#   like the unaligned ones, +30-50 %);
# - "unaligned": rounded to 2 or not at all, as width multipliers without a divisor and ShuffleNets give them (58,
#   116, 41, 83), so ORT blocks a conv only where a count happens to be a multiple of 16 (without these, ShuffleNet's
#   1x1 convs and channel shuffles were priced with layout copies: +20-35 %);
# - "mixed": each count rounded on its own (to 8, 16, 4 or not at all), the layout changing often.
CHANNEL_LAYOUTS = ("aligned", "unaligned", "mixed")
_CHANNEL_LAYOUT_WEIGHTS = (0.35, 0.25, 0.4)


def _channels(rng: np.random.Generator, lo: int, hi: int, layout: str = "mixed") -> int:
    """Log-uniform in [lo, hi], rounded down to a multiple as a network of `layout` (CHANNEL_LAYOUTS) rounds."""
    c = _log_uniform(rng, lo, max(lo, hi))
    r = rng.random()
    if layout == "aligned":
        multiple = 16 if r < 0.6 else 8
        return max(lo, c // multiple * multiple) if multiple <= c else multiple
    if layout == "unaligned":
        multiple = 2 if r < 0.5 else 1
    else:
        multiple = 8 if r < 0.4 else 16 if r < 0.55 else 4 if r < 0.65 else 1
    return max(lo, c // multiple * multiple) if multiple <= c else c


def _act_choice(rng: np.random.Generator) -> str:
    return str(rng.choice(ACTIVATIONS, p=np.array(_ACT_WEIGHTS) / sum(_ACT_WEIGHTS)))


def random_block(rng: np.random.Generator, c: int, h: int, layout: str = "mixed", mix: str = "any",
                 w: int | None = None) -> BlockConfig:
    """A block that fits an input of `c` channels at `h`×`w` (`w` None: `h`; strides only where `h` allows), its kind
    drawn by `mix`'s weights (BLOCK_MIXES), its channel counts as a network of `layout` draws them (CHANNEL_LAYOUTS)."""
    w = w or h
    kinds = [k for k in BLOCKS if not (k == "pool" and h < 4) and not (k == "deconv" and not 2 <= h <= 160)
             and not (k == "upsample" and not 2 <= min(h, w) <= max(h, w) <= MAX_UPSAMPLED // 2)
             and not (k == "pixel_shuffle" and not 2 <= h <= MAX_SPACE_TO_DEPTH)
             and not (k == "split" and c < 2) and not (k == "attention" and (h * w > MAX_TOKENS or c < 8))]
    weights = np.array([BLOCK_MIXES[mix][BLOCKS.index(k)] for k in kinds])
    kind = str(rng.choice(kinds, p=weights / weights.sum()))
    hi = int(min(1280, max(24, 2**17 / max(h, 1) ** 1.3)))  # wide layers only where the maps are small
    c_out = _channels(rng, 4, hi, layout)
    stride = int(rng.choice([1, 1, 2])) if h >= 4 else 1
    act = _act_choice(rng)
    if kind == "conv":
        kernel = int(rng.choice([1, 1, 3, 3, 3, 5, 7]))
        return BlockConfig("conv", min(c_out, 512) if kernel > 1 else c_out, kernel, stride, act=act,
                           bn=bool(rng.random() < 0.85))
    if kind == "affine":
        return BlockConfig("affine", c_out, int(rng.choice([1, 3])), stride, act=act, op=str(rng.choice(["scalar", "channel", "around_act"])))
    if kind == "dwsep":
        return BlockConfig("dwsep", c_out, int(rng.choice([3, 3, 5])), stride, act=act, se=bool(rng.random() < 0.2),
                           op=str(rng.choice(["act", "linear"])))
    if kind in ("ibn", "fused_ibn"):
        residual = stride == 1 and rng.random() < 0.5
        hidden = _channels(rng, max(4, c), max(4, c * 6), layout) if rng.random() < 0.85 else c
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
    if kind == "attention":
        heads = int(rng.choice([h for h in (1, 2, 4, 8) if c % h == 0]))
        # LayerNorm as the op (opset 17 exports) or decomposed (older exports, Paddle's), which ORT fuses back
        return BlockConfig("attention", c, groups=heads, hidden=_channels(rng, c, 4 * c, layout), act=str(rng.choice(["gelu", "swish", "hardswish"])),
                           op=str(rng.choice(["layernorm", "decomposed_ln"])))
    if kind == "large_dw":  # a quarter of them 1-D, over the map's pixels as one sequence (stride 1)
        one_d = rng.random() < 0.25
        return BlockConfig("dwsep", c_out, int(rng.choice([7, 9])), 1 if one_d else stride, act=str(rng.choice(["gelu", act])),
                           op="1d" if one_d else "act")
    if kind == "pixel_shuffle":
        return BlockConfig("pixel_shuffle", c_out, act=act, op=str(rng.choice(PIXEL_SHUFFLES)) if h <= MAX_DEPTH_TO_SPACE else "space_to_depth")
    if kind == "upsample":  # 2x mostly; 4x and 8x as segmentation heads and feature pyramids' merges do
        factor = int(rng.choice([f for f in (2, 2, 2, 4, 8) if f * h <= MAX_UPSAMPLED]))
        form = str(rng.choice(list(UPSAMPLES), p=np.array(_UPSAMPLE_WEIGHTS) / sum(_UPSAMPLE_WEIGHTS)))
        return BlockConfig("upsample", c_out, op=form, scale=factor, act=act, skip=str(rng.choice(["", "concat", "add"], p=[0.4, 0.3, 0.3])))
    return BlockConfig("deconv", min(c_out, 256), int(rng.choice([2, 3, 4])), 2, act=act, bn=bool(rng.random() < 0.5))


def random_head(rng: np.random.Generator, c: int, h: int = 1, layout: str = "mixed", w: int | None = None) -> BlockConfig:
    w = w or h
    op = str(rng.choice(HEADS, p=[0.38, 0.12, 0.1, 0.1, 0.06, 0.12, 0.12]))
    if op == "lstm" and w <= MAX_LSTM_STEPS:  # a step per column; hidden sizes of CRNN recognisers, bidirectional mostly
        hidden, dirs = int(rng.choice([32, 48, 64, 96, 128, 256, 256, 384, 512])), 2 if rng.random() < 0.7 else 1
        # then mostly each step's scores over a vocabulary, as CTC recognisers' Gemm computes them (c_out 1: none),
        # within a quarter of the network's MAC budget over its w steps
        vocabulary = 1
        if rng.random() < 0.7:
            vocabulary = max(2, min(_channels(rng, 8, 10000, layout), int(_MAX_NETWORK_MACS / 4 / (w * dirs * hidden))))
        return BlockConfig("head", vocabulary, op=op, hidden=hidden, groups=dirs)
    op = "classifier" if op == "lstm" else op
    if op == "classifier":  # ImageNet's 1000 classes often, large vocabularies (text) sometimes; a wide 1x1 conv first half the time
        r = rng.random()
        classes = 1000 if r < 0.35 else _channels(rng, 2000, 10000, layout) if r < 0.5 else _channels(rng, 8, 1280, layout)
        widen = _channels(rng, 256, 1280, layout) if rng.random() < 0.5 else 1
        widen = widen if c * widen * h * w <= 100e6 else 1  # not a conv of billions of MACs on a big map
        return BlockConfig("head", classes, op=op, hidden=_channels(rng, 2, 1000, layout) if rng.random() < 0.3 else 0,
                           act=_act_choice(rng), group_size=widen)
    if op == "segment":
        return BlockConfig("head", _channels(rng, 2, 32, layout), op=op,
                           interpolation=str(rng.choice([f for f in UPSAMPLES if f.startswith("linear")])))
    return BlockConfig("head", _channels(rng, 1, 128, layout), op=op)


def _grow(rng: np.random.Generator, c_in: int, size: int, count: int, given: Sequence[BlockConfig] = (),
          layout: str = "mixed", mix: str = "any", width: int = 0, keep_width_below: int = 0) -> NetworkConfig:
    """`given` blocks, then up to `count` random ones while the network stays under the MAC budget."""
    b = NetworkBuilder(dry=True)
    b.keep_width_below = keep_width_below
    x = b.input("x", (1, c_in, size, width or size))
    skips: dict[int, str] = {}
    blocks = list(given)
    for i, blk in enumerate(blocks):
        x = _apply(b, x, i, blk, skips)
    for _ in range(count):
        if len(b.shapes[x]) != 4:  # a head ended the network
            break
        _, c, h, w = b.shapes[x]
        blk = random_block(rng, c, h, layout, mix, w)
        y = _apply(b, x, len(blocks), blk, skips)
        if b.macs > _MAX_NETWORK_MACS:
            break
        blocks.append(blk)
        x = y
    if rng.random() < 0.5 and len(b.shapes[x]) == 4:
        blocks.append(random_head(rng, b.shapes[x][1], b.shapes[x][2], layout, b.shapes[x][3]))
    return NetworkConfig(c_in, size, tuple(blocks), seed=int(rng.integers(1 << 31)), width=width,
                         keep_width_below=keep_width_below)


def random_network(rng: np.random.Generator, layout: str | None = None, mix: str = "any") -> NetworkConfig:
    """A random mobile-CNN-like network: an image (or feature map) input, a stem, 3 to 11 blocks drawn by `mix`
    (BLOCK_MIXES), maybe a head; its channel counts drawn as `layout` (CHANNEL_LAYOUTS; None: one drawn by
    `_CHANNEL_LAYOUT_WEIGHTS`) draws them."""
    if layout is not None and layout not in CHANNEL_LAYOUTS:
        raise ValueError(f"channel layout {layout!r}: expected one of {', '.join(CHANNEL_LAYOUTS)}")
    if mix not in BLOCK_MIXES:
        raise ValueError(f"block mix {mix!r}: expected one of {', '.join(BLOCK_MIXES)}")
    size = _log_uniform(rng, 16, 320) if rng.random() < 0.9 else int(rng.choice([448, 512, 640]))
    layout = layout or str(rng.choice(CHANNEL_LAYOUTS, p=_CHANNEL_LAYOUT_WEIGHTS))
    c_in = 3 if rng.random() < 0.6 else _channels(rng, 4, 256, layout)
    stem = []
    if c_in == 3 and size >= 32:  # 3x3 mostly; 7x7 as ResNets' stems (over-predicted 2x before any was drawn), 5x5
        kernel = int(rng.choice([3, 5, 7], p=[0.75, 0.1, 0.15]))
        stem.append(BlockConfig("conv", _channels(rng, 8, 64, layout), kernel, 2, act=_act_choice(rng)))
    return _grow(rng, c_in, size, int(rng.integers(3, 12)), stem, layout, mix)


def text_line_network(rng: np.random.Generator) -> NetworkConfig:
    """A random network on a text line, as OCR direction classifiers and recognisers see one: 32 or 48 rows by
    4-10 times as many columns, a stride-2 stem, then blocks drawn by the "mobile" mix whose strides halve the
    height only once it is under a quarter of the input's (their (2, 1) strides): maps of 2-6 rows by 40-160
    columns, which square networks never draw (on a 2-core Xeon the PP-OCR classifier's 5×5 depthwise convs on
    3×96 maps ran at 0.4x what the square maps' samples predicted)."""
    size = int(rng.choice([32, 48]))
    width = min(320, size * int(rng.choice([4, 6, 8, 10])))
    layout = str(rng.choice(CHANNEL_LAYOUTS, p=_CHANNEL_LAYOUT_WEIGHTS))
    stem = (BlockConfig("conv", _channels(rng, 8, 32, layout), 3, 2, act=_act_choice(rng)),)
    return _grow(rng, 3, size, int(rng.integers(4, 12)), stem, layout, "mobile", width, size // 4)


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
    if block.kind == "deconv":
        h2 = min(max(h2, 2), 160)
    if block.kind == "upsample":
        h2 = min(max(h2, 2), MAX_UPSAMPLED // block.scale)
    if block.kind == "pixel_shuffle":
        h2 = min(max(h2, 2), MAX_SPACE_TO_DEPTH if block.op == "space_to_depth" else MAX_DEPTH_TO_SPACE)
    if block.kind == "pool" or block.stride > 1:
        h2 = max(h2, 4)
    if block.kind == "attention":
        h2 = min(h2, math.isqrt(MAX_TOKENS))
    if block.kind == "split":
        c2 = max(c2, 2)
    same = block.kind in ("se", "pool", "split", "shuffle", "attention") or block.residual and block.kind in ("ibn", "fused_ibn")
    c_out = c2 if same else max(2 if block.kind == "concat" else 1, move(block.c_out))
    hidden = move(block.hidden) if block.hidden else 0
    return dataclasses.replace(block, c_out=c_out, hidden=hidden), c2, h2


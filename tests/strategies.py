"""Random but valid CNN ONNX graphs for property tests and the pass fuzzer.

One builder, two sources of choices:

    cnn_models()   a hypothesis strategy (choices drawn from hypothesis, so failures shrink)
    generate(seed) a plain function over numpy only (the fuzz script: fast, no shrinking)

A graph is an input x:1xCxHxW (H, W in 8..32; sometimes declared with dynamic N/H/W and analysed at
batch 1 or 2), a stem conv, 1..6 blocks and sometimes a classifier tail (GlobalAveragePool → Flatten
[→ Dropout] → Gemm (transB 0/1, alpha/beta) or MatMul + Add). Blocks:

    ibn        1×1 expand → act → K×K depthwise (K 3/5/7, stride 1/2) → act → 1×1 project [→ residual Add]
    separable  K×K depthwise (sometimes depth multiplier 2 or dilation 2) → act → 1×1 → act
    plain      K×K conv → act
    concat     two conv branches (or x and one conv) concatenated on channels; sometimes both branch
               convs share one weight tensor
    se         GlobalAveragePool → 1×1 → Relu → 1×1 → HardSigmoid|Sigmoid → Mul
    grouped    [1×1 adapter →] K×K conv with 1 < group < channels
    pool       MaxPool 3×3/2 or 2×2/2, AveragePool 3×3/1

Convs are "same"-padded (output ceil(H / stride)), written with every attribute, with only the
non-default ones (kernel_shape omitted or not), or with auto_pad (SAME_UPPER, SAME_LOWER, VALID).

Every conv is followed by BatchNormalization (unfolded; sometimes with momentum or training_mode=0),
a bias (folded) or nothing, then sometimes a per-channel or scalar affine Mul/Add (constant on either
side, shapes (), (1,), (C,1,1), (1,C,1,1)), now and then a positional Add ((1,C,H,W), (1,1,H,W), (W,))
or a Sub/Div by a constant, then an activation: Relu, Clip(0, 6), HardSwish (opset ≥ 14),
HardSigmoid(x)·x, Sigmoid(x)·x, Paddle's decomposed hard-swish x·Clip(x + 3, 0, 6)/6 (the /6 as Div or
as Mul by 1/6), PRelu (per-channel or shared slope), LeakyRelu, or none. Channel counts are small
(3..40), often odd or prime. Now and then: an Identity after a block, a Dropout before the Gemm, an
affine constant computed at run time (Reshape of constants), a Pad node before an unpadded conv, an SE
pooled by ReduceMean, a channel shuffle (Reshape → Transpose → Reshape) after a grouped conv, Concat
and Flatten with axis -3, an intermediate tensor as a second graph output. Opsets 11..21, IR version
the lowest each opset allows (sometimes one more), weights as initializers or as Constant nodes (as
Paddle exports them). Weights are scaled so that every conv output has a mean square of about 1: float
re-association then stays far below the verifier's tolerance.

The analysis input shape is stored in the model's metadata (`analysis_shapes(model)`), because a
model with dynamic dims needs one for `hwnas.api.run`.

The catalogue of pass option sets and exact pipelines that the property tests, `scripts/fuzz_passes.py`
and `scripts/corpus_table.py` run sits at the bottom.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

T = TypeVar("T")

OPSETS = tuple(range(11, 22))
ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "hsig_x", "sigmoid_x", "paddle_hswish", "prelu", "leakyrelu")
BLOCKS = ("ibn", "separable", "plain", "concat", "se", "grouped", "pool")
SHAPE_KEY = "hwnas.test.analysis_shapes"
MAX_CHANNELS = 40
PRIMES = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


# -- sources of choices ---------------------------------------------------------------------------


class RngChoices:
    """Choices from a numpy Generator: `generate(seed)` is a pure function of the seed."""

    def __init__(self, rng: np.random.Generator):
        self._rng = rng

    def integer(self, low: int, high: int) -> int:
        return int(self._rng.integers(low, high + 1))

    def choice(self, options: Sequence[T]) -> T:
        return options[int(self._rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self._rng.random() < p)


class DrawChoices:
    """Choices drawn from hypothesis; each shrinks towards its simplest value (low, first, False)."""

    def __init__(self, draw: Callable[[Any], Any]):
        from hypothesis import strategies as st

        self._draw, self._st = draw, st

    def integer(self, low: int, high: int) -> int:
        return self._draw(self._st.integers(low, high))

    def choice(self, options: Sequence[T]) -> T:
        return self._draw(self._st.sampled_from(options))

    def chance(self, p: float) -> bool:
        # shrinks to 0, i.e. False: a shrunk example has as few optional features as possible
        return self._draw(self._st.integers(0, 999)) >= round(1000 * (1 - p))


# -- the builder ----------------------------------------------------------------------------------


@dataclass
class _Tensor:
    name: str
    channels: int
    height: int
    width: int
    power: float  # rough mean square, to keep activations of order one


@dataclass
class _Builder:
    pick: Any  # RngChoices | DrawChoices
    rng: np.random.Generator  # weights
    opset: int
    constant_nodes: bool  # weights as Constant nodes instead of initializers
    dynamic: bool  # the input declares dynamic N, H, W
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    features: set[str] = field(default_factory=set)
    _count: int = 0

    def _name(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    def weight(self, base: str, array: np.ndarray, dtype: type = np.float32) -> str:
        name = self._name(base)
        array = np.asarray(array, dtype)
        if self.constant_nodes:
            value = numpy_helper.from_array(array, name)
            self.nodes.append(helper.make_node("Constant", [], [name], name=name + "/const", value=value))
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], like: _Tensor, base: str, power: float | None = None,
             channels: int | None = None, height: int | None = None, width: int | None = None, **attrs) -> _Tensor:
        name = self._name(base)
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return _Tensor(
            name,
            like.channels if channels is None else channels,
            like.height if height is None else height,
            like.width if width is None else width,
            like.power if power is None else power,
        )  # fmt: skip

    # -- layers --

    def conv(self, x: _Tensor, out: int, kernel: int = 1, stride: int = 1, group: int = 1, dilation: int = 1,
             bias: bool = False, base: str = "conv", weight: str | None = None) -> _Tensor:
        """A "same"-padded conv (output ceil(H / stride)); `weight` reuses another conv's weight."""
        fan_in = x.channels // group * kernel * kernel
        std = 1.0 / np.sqrt(fan_in * max(x.power, 1e-3))
        if weight is None:
            weight = self.weight(base + "_w", self.rng.normal(0, std, (out, x.channels // group, kernel, kernel)))
        inputs = [x.name, weight]
        if bias:
            inputs.append(self.weight(base + "_b", self.rng.normal(0, 0.2, out)))
        pad = (kernel - 1) // 2 * dilation
        extent = dilation * (kernel - 1) + 1
        h = (x.height + 2 * pad - extent) // stride + 1
        wd = (x.width + 2 * pad - extent) // stride + 1
        # the same conv written the ways exporters write it: every attribute, only the non-default
        # ones (kernel_shape is optional too), or auto_pad instead of pads (same output size)
        style = self.pick.choice(("explicit", "minimal", "auto_pad"))
        attrs: dict[str, Any] = {}
        if style == "explicit" or self.pick.chance(0.5):
            attrs["kernel_shape"] = [kernel, kernel]
        if style == "explicit" or stride != 1:
            attrs["strides"] = [stride, stride]
        if pad and self.pick.chance(0.1):  # a Pad node before an unpadded conv, as TF exports write it
            self.features.add("pad-node")
            pads = self.weight("pads", np.array([0, 0, pad, pad, 0, 0, pad, pad], np.int64), np.int64)
            padded = self.node("Pad", [x.name, pads], x, "pad", height=x.height + 2 * pad, width=x.width + 2 * pad)
            inputs[0], pad = padded.name, 0
            x = padded
            if style == "auto_pad":
                style = "minimal"
        if style == "auto_pad" and dilation == 1:
            self.features.add("auto_pad")
            trivial = kernel == 1 and stride == 1
            attrs["auto_pad"] = "VALID" if trivial else self.pick.choice(("SAME_UPPER", "SAME_LOWER"))
        elif style == "explicit" or pad:
            attrs["pads"] = [pad] * 4
        if style == "explicit" or group != 1:
            attrs["group"] = group
        if style == "explicit" or dilation != 1:
            attrs["dilations"] = [dilation, dilation]
        return self.node("Conv", inputs, x, base, power=1.0, channels=out, height=h, width=wd, **attrs)

    def conv_unit(self, x: _Tensor, out: int, act: str | None = None, base: str = "conv", **conv_args) -> _Tensor:
        """Conv → BN | bias | nothing → [affine Mul/Add] → activation (`act=None`: draw one)."""
        norm = self.pick.choice(("bn", "bias", "none"))
        y = self.conv(x, out, bias=norm == "bias", base=base, **conv_args)
        if norm == "bn":
            y = self.batchnorm(y)
        if self.pick.chance(0.25):
            y = self.affine(y)
        return self.act(y, self.pick.choice(self.activations()) if act is None else act)

    def batchnorm(self, x: _Tensor) -> _Tensor:
        c = x.channels
        params = [
            self.weight("bn_scale", self.rng.uniform(0.5, 1.5, c)),
            self.weight("bn_bias", self.rng.uniform(-0.3, 0.3, c)),
            self.weight("bn_mean", self.rng.uniform(-0.3, 0.3, c)),
            self.weight("bn_var", self.rng.uniform(0.5, 1.5, c)),
        ]
        self.features.add("bn")
        attrs: dict[str, Any] = {"epsilon": float(self.pick.choice((1e-5, 1e-3)))}
        if self.opset >= 14 and self.pick.chance(0.2):
            attrs["training_mode"] = 0
        if self.pick.chance(0.2):
            attrs["momentum"] = 0.9
        return self.node("BatchNormalization", [x.name, *params], x, "bn", **attrs)

    def affine(self, x: _Tensor) -> _Tensor:
        """A Mul and/or an Add by a per-channel or scalar constant, in either order and operand order."""
        self.features.add("affine")
        kinds = self.pick.choice((("Mul",), ("Add",), ("Mul", "Add"), ("Add", "Mul")))
        for op in kinds:
            shape = self.pick.choice(((1, x.channels, 1, 1), (x.channels, 1, 1), (), (1,)))
            size = int(np.prod(shape)) if shape else 1
            if op == "Mul":
                value = self.rng.uniform(0.5, 1.5, size) * self.rng.choice((-1.0, 1.0), size)
            else:
                value = self.rng.normal(0, 0.3, size)
            if shape and self.pick.chance(0.15):  # computed at run time from constants (fold-constants)
                self.features.add("computed-constant")
                flat = self.weight(f"affine_{op.lower()}_flat", value)
                c = self.node("Reshape", [flat, self.weight("shape", np.array(shape, np.int64), np.int64)], x,
                              f"affine_{op.lower()}_reshape").name  # fmt: skip
            else:
                c = self.weight(f"affine_{op.lower()}", value.reshape(shape))
            inputs = [c, x.name] if self.pick.chance(0.3) else [x.name, c]
            x = self.node(op, inputs, x, f"affine_{op.lower()}")
        if not self.dynamic and self.pick.chance(0.1):  # a positional (not per-channel) bias: nothing may fold it
            self.features.add("affine-positional")
            shape = self.pick.choice(((1, x.channels, x.height, x.width), (1, 1, x.height, x.width), (x.width,)))
            c = self.weight("pos_bias", self.rng.normal(0, 0.3, shape))
            x = self.node("Add", [x.name, c] if self.pick.chance(0.5) else [c, x.name], x, "pos_bias")
        if self.pick.chance(0.15):  # normalisation written as Sub / Div (no pass folds these; all must cope)
            self.features.add("affine-sub-div")
            op = self.pick.choice(("Sub", "Div"))
            shape = self.pick.choice(((1, x.channels, 1, 1), ()))
            size = int(np.prod(shape)) if shape else 1
            value = self.rng.uniform(0.5, 1.5, size) * (self.rng.choice((-1.0, 1.0), size) if op == "Div" else 0.3)
            c = self.weight(f"affine_{op.lower()}", value.reshape(shape))
            inputs = [c, x.name] if op == "Sub" and self.pick.chance(0.3) else [x.name, c]
            x = self.node(op, inputs, x, f"affine_{op.lower()}")
        return x

    def activations(self) -> tuple[str, ...]:
        return tuple(a for a in ACTIVATIONS if a != "hardswish" or self.opset >= 14)

    def scalar(self, base: str, value: float) -> str:
        return self.weight(base, np.array(value, np.float32))

    def act(self, x: _Tensor, kind: str) -> _Tensor:
        self.features.add(f"act:{kind}")
        half = x.power / 2
        if kind == "none":
            return x
        if kind == "relu":
            return self.node("Relu", [x.name], x, "relu", power=half)
        if kind == "relu6":
            bounds = [self.scalar("clip_min", 0.0), self.scalar("clip_max", 6.0)]
            return self.node("Clip", [x.name, *bounds], x, "relu6", power=half)
        if kind == "hardswish":
            assert self.opset >= 14
            return self.node("HardSwish", [x.name], x, "hardswish", power=half)
        if kind in ("hsig_x", "sigmoid_x"):
            gate = (
                self.node("HardSigmoid", [x.name], x, "hsig", alpha=1.0 / 6.0, beta=0.5)
                if kind == "hsig_x"
                else self.node("Sigmoid", [x.name], x, "sigmoid")
            )
            inputs = [x.name, gate.name] if self.pick.chance(0.5) else [gate.name, x.name]
            return self.node("Mul", inputs, x, "swish", power=half)
        if kind == "paddle_hswish":
            shifted = self.node("Add", [x.name, self.scalar("hs_three", 3.0)], x, "hs_add")
            bounds = [self.scalar("hs_min", 0.0), self.scalar("hs_max", 6.0)]
            clipped = self.node("Clip", [shifted.name, *bounds], x, "hs_clip")
            prod = self.node("Mul", [x.name, clipped.name], x, "hs_mul")
            if self.pick.chance(0.5):
                return self.node("Div", [prod.name, self.scalar("hs_six", 6.0)], x, "hs_div", power=half)
            return self.node("Mul", [prod.name, self.scalar("hs_sixth", 1.0 / 6.0)], x, "hs_scale", power=half)
        if kind == "prelu":  # per-channel (C,1,1) or shared (1,) slope
            shape = self.pick.choice(((x.channels, 1, 1), (1,)))
            slope = self.weight("prelu_slope", self.rng.uniform(0.05, 0.5, shape))
            return self.node("PRelu", [x.name, slope], x, "prelu", power=half)
        if kind == "leakyrelu":
            return self.node("LeakyRelu", [x.name], x, "leakyrelu", power=half, alpha=0.1)
        raise ValueError(kind)

    # -- blocks --

    def channels(self) -> int:
        """A small channel count, often odd or prime."""
        return self.pick.choice(PRIMES) if self.pick.chance(0.4) else self.pick.integer(3, MAX_CHANNELS)

    def stride(self, x: _Tensor) -> int:
        return 2 if min(x.height, x.width) >= 4 and self.pick.chance(0.3) else 1

    def ibn(self, x: _Tensor) -> _Tensor:
        self.features.add("block:ibn")
        if self.pick.chance(0.6):  # an expansion ratio, as MobileNets have, or any count
            expand = max(2, min(self.pick.integer(1, 6) * x.channels, 3 * MAX_CHANNELS))
        else:
            expand = self.channels()
        kernel, stride = self.pick.choice((3, 5, 7)), self.stride(x)
        act = self.pick.choice(self.activations()[1:])
        h = self.conv_unit(x, expand, act=act, base="expand")
        h = self.conv_unit(h, expand, act=act, base="dw", kernel=kernel, stride=stride, group=expand)
        out = x.channels if stride == 1 and self.pick.chance(0.6) else self.channels()
        y = self.conv_unit(h, out, act="none", base="project")
        if stride == 1 and out == x.channels:
            self.features.add("residual")
            inputs = [x.name, y.name] if self.pick.chance(0.5) else [y.name, x.name]
            y = self.node("Add", inputs, y, "residual", power=x.power + y.power)
        return y

    def separable(self, x: _Tensor) -> _Tensor:
        self.features.add("block:separable")
        kernel, stride = self.pick.choice((3, 5, 7)), self.stride(x)
        multiplier = 2 if self.pick.chance(0.1) else 1
        dilation = 2 if stride == 1 and self.pick.chance(0.1) else 1
        if multiplier > 1:
            self.features.add("depth-multiplier")
        if dilation > 1:
            self.features.add("dilation")
        act = "none" if self.pick.chance(0.3) else None  # dw → 1×1 with nothing between: fuse-ibn{mode=linear}
        h = self.conv_unit(x, multiplier * x.channels, act=act, base="dw", kernel=kernel, stride=stride,
                           group=x.channels, dilation=dilation)  # fmt: skip
        return self.conv_unit(h, self.channels(), base="pw")

    def plain(self, x: _Tensor) -> _Tensor:
        self.features.add("block:plain")
        kernel = self.pick.choice((1, 3, 5))
        return self.conv_unit(x, self.channels(), base="conv", kernel=kernel, stride=self.stride(x))

    def concat(self, x: _Tensor) -> _Tensor:
        self.features.add("block:concat")
        if self.pick.chance(0.3):  # dense-style: x itself is one branch
            branches = [x, self.conv_unit(x, self.channels(), base="branch", kernel=self.pick.choice((1, 3)))]
        else:
            stride, kernel, out = self.stride(x), self.pick.choice((1, 3, 5)), self.channels()
            first = self.conv_unit(x, out, base="branch", kernel=kernel, stride=stride)
            if self.pick.chance(0.15):  # both branches use one weight tensor (a shared-weight export)
                self.features.add("shared-weight")
                shared = next(n for n in reversed(self.nodes) if n.op_type == "Conv").input[1]
                second = self.conv_unit(x, out, base="branch", kernel=kernel, stride=stride, weight=shared)
            else:
                kernel = self.pick.choice((1, 3, 5))
                second = self.conv_unit(x, self.channels(), base="branch", kernel=kernel, stride=stride)
            branches = [first, second]
        if self.pick.chance(0.5):
            branches.reverse()
        total = sum(b.channels for b in branches)
        y = self.node("Concat", [b.name for b in branches], branches[0], "concat", channels=total,
                      power=max(b.power for b in branches), axis=self.pick.choice((1, -3)))  # fmt: skip
        if total > 2 * MAX_CHANNELS:  # keep the graph small
            y = self.conv_unit(y, self.channels(), base="squeeze")
        return y

    def se(self, x: _Tensor) -> _Tensor:
        self.features.add("block:se")
        squeezed = max(2, x.channels // self.pick.choice((2, 4)))
        if self.pick.chance(0.3):  # Keras-style SE: ReduceMean over H, W (axes an input from opset 18)
            self.features.add("reduce-mean")
            if self.opset >= 18:
                axes = self.weight("axes", np.array([2, 3], np.int64), np.int64)
                pooled = self.node("ReduceMean", [x.name, axes], x, "se_pool", height=1, width=1, keepdims=1)
            else:
                pooled = self.node("ReduceMean", [x.name], x, "se_pool", height=1, width=1, axes=[2, 3], keepdims=1)
        else:
            pooled = self.node("GlobalAveragePool", [x.name], x, "se_pool", height=1, width=1)
        h = self.node("Relu", [self.conv(pooled, squeezed, bias=True, base="se_reduce").name], pooled, "se_relu",
                      channels=squeezed, power=0.5)  # fmt: skip
        h = self.conv(h, x.channels, bias=True, base="se_expand")
        if self.pick.chance(0.7):
            gate = self.node("HardSigmoid", [h.name], h, "se_gate", alpha=1.0 / 6.0, beta=0.5)
        else:
            gate = self.node("Sigmoid", [h.name], h, "se_gate")
        inputs = [x.name, gate.name] if self.pick.chance(0.7) else [gate.name, x.name]
        return self.node("Mul", inputs, x, "se_scale", power=x.power * 0.3)

    def pool(self, x: _Tensor) -> _Tensor:
        """MaxPool 3×3/2 (pads 1) or 2×2/2, or AveragePool 3×3/1 (pads 1)."""
        self.features.add("block:pool")
        kind = self.pick.choice(("max3", "max2", "avg3"))
        if kind == "max2" and min(x.height, x.width) < 2:
            kind = "avg3"
        if kind == "max3":
            h, w = (x.height - 1) // 2 + 1, (x.width - 1) // 2 + 1
            return self.node("MaxPool", [x.name], x, "maxpool", height=h, width=w, kernel_shape=[3, 3], strides=[2, 2],
                             pads=[1] * 4)  # fmt: skip
        if kind == "max2":
            return self.node("MaxPool", [x.name], x, "maxpool", height=x.height // 2, width=x.width // 2,
                             kernel_shape=[2, 2], strides=[2, 2])  # fmt: skip
        return self.node("AveragePool", [x.name], x, "avgpool", kernel_shape=[3, 3], pads=[1] * 4,
                         count_include_pad=self.pick.choice((0, 1)))  # fmt: skip

    def grouped(self, x: _Tensor) -> _Tensor:
        self.features.add("block:grouped")
        group = self.pick.integer(2, 4)
        if x.channels % group or x.channels == group:
            x = self.conv_unit(x, group * self.pick.integer(2, 6), base="adapter")
        out = group * self.pick.integer(1, MAX_CHANNELS // group)
        kernel = self.pick.choice((1, 3, 5))
        y = self.conv_unit(x, out, base="grouped", kernel=kernel, stride=self.stride(x), group=group)
        if not self.dynamic and self.pick.chance(0.3):  # ShuffleNet's channel shuffle
            self.features.add("channel-shuffle")
            split = self.weight("shuffle_split", np.array([0, group, out // group, y.height, y.width]), np.int64)
            merge = self.weight("shuffle_merge", np.array([0, out, y.height, y.width]), np.int64)
            h = self.node("Reshape", [y.name, split], y, "shuffle_split")
            h = self.node("Transpose", [h.name], h, "shuffle_transpose", perm=[0, 2, 1, 3, 4])
            y = self.node("Reshape", [h.name, merge], y, "shuffle_merge")
        return y


def build_model(pick: Any) -> onnx.ModelProto:
    """A random CNN from a source of choices (`RngChoices` or `DrawChoices`)."""
    opset = pick.choice(OPSETS)
    dynamic = pick.chance(0.15)
    rng = np.random.default_rng(pick.integer(0, 2**32 - 1))
    b = _Builder(pick, rng, opset, constant_nodes=pick.chance(0.2), dynamic=dynamic)
    in_channels = pick.choice((3, 1, 4))
    height, width = pick.integer(8, 32), pick.integer(8, 32)
    x = _Tensor("x", in_channels, height, width, 1.0)
    y = b.conv_unit(x, b.channels(), base="stem", kernel=pick.choice((3, 1, 5)), stride=b.stride(x))
    extra_output = None
    for _ in range(pick.integer(1, 6)):
        y = getattr(b, pick.choice(BLOCKS))(y)
        if pick.chance(0.08):
            b.features.add("identity")
            y = b.node("Identity", [y.name], y, "identity")
        if extra_output is None and pick.chance(0.1):
            extra_output = y
    if pick.chance(0.3):
        b.features.add("tail:classifier")
        pooled = b.node("GlobalAveragePool", [y.name], y, "pool", height=1, width=1)
        flat = b.node("Flatten", [pooled.name], pooled, "flatten", axis=pick.choice((1, -3)))
        if pick.chance(0.4):
            b.features.add("dropout")
            flat = b.node("Dropout", [flat.name], flat, "dropout")
        classes = pick.integer(2, 20)
        w = b.rng.normal(0, 1 / np.sqrt(y.channels), (classes, y.channels))
        bias = b.weight("fc_b", b.rng.normal(0, 0.1, classes))
        layout = pick.choice(("gemm-transB", "gemm", "gemm-scaled", "matmul"))
        b.features.add(f"tail:{layout}")
        if layout == "matmul":
            prod = b.node("MatMul", [flat.name, b.weight("fc_w", w.T)], flat, "fc", channels=classes, height=0, width=0)
            out = b.node("Add", [prod.name, bias], prod, "fc_bias")
        else:
            attrs = {"transB": 1} if layout == "gemm-transB" else {}
            if layout == "gemm-scaled":
                attrs = {"alpha": 0.5, "beta": 2.0, "transB": pick.choice((0, 1))}
            weights = b.weight("fc_w", w if attrs.get("transB") else w.T)
            out = b.node("Gemm", [flat.name, weights, bias], flat, "fc", channels=classes, height=0, width=0, **attrs)
    else:
        out = y

    if dynamic:
        b.features.add("dynamic")

    def declare(t: _Tensor) -> onnx.ValueInfoProto:
        """Static dims, or symbols where the input is dynamic (height 0: a rank-2 Gemm output)."""
        spatial = [] if t.height == 0 else ([f"{t.name}_h", f"{t.name}_w"] if dynamic else [t.height, t.width])
        return helper.make_tensor_value_info(t.name, TensorProto.FLOAT, ["N" if dynamic else 1, t.channels, *spatial])

    outputs = [declare(out)]
    if extra_output is not None and extra_output.name != out.name:
        b.features.add("extra-output")
        outputs.append(declare(extra_output))
    in_dims = ["N", in_channels, "H", "W"] if dynamic else [1, in_channels, height, width]
    graph = helper.make_graph(b.nodes, "generated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_dims)],
                              outputs, b.initializers)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="hwnas-tests")
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import)) + (1 if pick.chance(0.2) else 0)
    batch = pick.choice((1, 2)) if dynamic else 1
    shape_text = "x".join(str(d) for d in (batch, in_channels, height, width))
    helper.set_model_props(model, {SHAPE_KEY: f"x:{shape_text}", "hwnas.test.features": ",".join(sorted(b.features))})
    onnx.checker.check_model(model, full_check=True)
    return model


def generate(seed: int) -> onnx.ModelProto:
    """A random CNN, a pure function of `seed` (numpy only; no hypothesis)."""
    return build_model(RngChoices(np.random.default_rng(seed)))


def cnn_models():
    """Hypothesis strategy of random valid CNN ONNX models (see the module docstring).

    Falsifying examples print as `describe(model)` rather than as a protobuf dump.
    """
    from hypothesis import strategies as st

    _register_printer()

    @st.composite
    def models(draw):
        return build_model(DrawChoices(draw))

    return models()


def _register_printer() -> None:
    try:
        from hypothesis.vendor import pretty
    except ImportError:  # a vendored module: best effort only
        return
    printer = getattr(pretty, "for_type_by_name", None)
    if printer is not None:
        printer("onnx.onnx_ml_pb2", "ModelProto", lambda obj, p, cycle: p.text("<ModelProto>\n" + describe(obj)))


def analysis_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The input shapes a generated model is analysed and verified at (its inputs may be dynamic)."""
    props = {p.key: p.value for p in model.metadata_props}
    name, dims = props[SHAPE_KEY].split(":")
    return {name: tuple(int(d) for d in dims.split("x"))}


def describe(model: onnx.ModelProto) -> str:
    """A compact text form of a generated graph (no weights), for failure messages."""
    consts = {t.name: tuple(t.dims) for t in model.graph.initializer}
    consts.update({n.output[0]: tuple(n.attribute[0].t.dims) for n in model.graph.node if n.op_type == "Constant"})
    lines = [f"opset {model.opset_import[0].version}, IR {model.ir_version}, inputs {analysis_shapes(model)}"]
    for n in model.graph.node:
        if n.op_type == "Constant":
            continue
        args = ", ".join(f"{i}{list(consts[i])}" if i in consts else i for i in n.input)
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        lines.append(f"  {n.output[0]} = {n.op_type}({args}) {attrs if attrs else ''}".rstrip())
    lines.append(f"  outputs: {[o.name for o in model.graph.output]}")
    return "\n".join(lines)


# -- what to run: pass option sets and exact pipelines ---------------------------------------------

# Option sets per pass; a pass not listed runs with its default options. Instances that are not exact
# are left out of the exact runs.
OPTION_SETS: dict[str, list[dict[str, Any]]] = {
    "replace-conv": [
        {"mode": "grouped", "group_size": 2},
        {"mode": "grouped", "group_size": 4},
        {"mode": "grouped", "group_size": 8},
        {"mode": "grouped", "group_size": 16},
        {"mode": "dense"},
    ],
    "align-channels": [
        {"multiple": 8, "mode": "pad"},
        {"multiple": 4, "mode": "pad"},
        {"multiple": 16, "mode": "pad"},
        {"multiple": 8, "mode": "trim"},
    ],
    "fuse-ibn": [{"mode": "linear"}, {"mode": "mbconv"}],
    "scale-depth": [{"multiplier": 0.75, "round_to": 8}],
}

# Pipelines as lists of steps; steps whose pass does not exist (yet) are dropped, and so is a pipeline
# left with fewer than two steps.
PIPELINES: list[list[str]] = [
    ["fold-bn", "fold-affine", "fuse-ibn{mode=linear}", "replace-conv{mode=grouped,group_size=8}",
     "align-channels{multiple=8,mode=pad}"],
    ["fold-constants", "eliminate-identity", "fold-bn", "fold-affine", "align-channels{multiple=4,mode=pad}",
     "schedule-memory"],
    ["replace-conv{mode=dense}", "fuse-ibn{mode=linear}", "fold-bn", "align-channels{multiple=16,mode=pad}"],
]  # fmt: skip


def spec_text(name: str, options: dict[str, Any]) -> str:
    if not options:
        return name
    return name + "{" + ",".join(f"{k}={v}" for k, v in options.items()) + "}"


@dataclass(frozen=True)
class PassVariant:
    spec: str  # pipeline text of one step
    exact: bool | None  # None: the options are not accepted
    problem: str | None = None  # why the option set was rejected


def pass_variants() -> list[PassVariant]:
    """Every registered pass with each of its option sets, and whether that instance is exact."""
    from hwnas.errors import BadInputError
    from hwnas.passes import Exactness, all_passes

    variants = []
    for name, cls in all_passes().items():
        for options in OPTION_SETS.get(name, [{}]):
            spec = spec_text(name, options)
            try:
                instance = cls(**options)
            except BadInputError as e:
                variants.append(PassVariant(spec, None, str(e)))
                continue
            variants.append(PassVariant(spec, instance.exactness is Exactness.EXACT))
    return variants


def exact_specs() -> list[str]:
    return [v.spec for v in pass_variants() if v.exact]


def exact_pipelines() -> list[str]:
    """The PIPELINES, keeping only steps that exist now and are exact."""
    exact = set(exact_specs())
    out = []
    for steps in PIPELINES:
        kept = [s for s in steps if s in exact]
        if len(kept) >= 2 and ",".join(kept) not in out:
            out.append(",".join(kept))
    return out


@dataclass(frozen=True)
class RunOutcome:
    """How one exact pass or pipeline fared on one model.

    status: `verified` (something was rewritten and ORT agrees), `no-site` (nothing applicable; the
    first skip reason in `detail`), `mismatch` (CheckFailedError or a changed signature) or `crash`
    (any other exception: a bug, since the input is a valid model).
    """

    status: str
    detail: str = ""
    sites: int = 0


def signature(model: onnx.ModelProto) -> tuple:
    """What a drop-in replacement must keep: inputs, outputs, IR version, opsets."""
    return (
        [v.SerializeToString() for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer}],
        [v.SerializeToString() for v in model.graph.output],
        model.ir_version,
        sorted((o.domain, o.version) for o in model.opset_import),
    )


def run_exact(model: onnx.ModelProto, spec: str) -> RunOutcome:
    """`hwnas.api.run` of an exact pass or pipeline on `model`, classified (never raises)."""
    from hwnas import api
    from hwnas.errors import CheckFailedError

    try:
        result = api.run(model, spec, input_shapes=analysis_shapes(model))
    except CheckFailedError as e:
        return RunOutcome("mismatch", str(e))
    except Exception as e:  # noqa: BLE001  (anything else escaping a pass is a bug to report)
        return RunOutcome("crash", f"{type(e).__name__}: {e}")
    if not result.verified:
        return RunOutcome("mismatch", "not verified")
    if signature(result.model) != signature(model):
        return RunOutcome("mismatch", "the rewritten model's signature (inputs, outputs, IR, opsets) changed")
    unexplained = [s for r in result.records for s in r.skipped if not (isinstance(s.reason, str) and s.reason)]
    if unexplained:
        return RunOutcome("crash", f"skipped site without a reason: {unexplained[0]}")
    applied = sum(len(r.applied) for r in result.records)
    if applied == 0:
        reasons = [s.reason for r in result.records for s in r.skipped]
        return RunOutcome("no-site", reasons[0] if reasons else "no site")
    return RunOutcome("verified", "", applied)

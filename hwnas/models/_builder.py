"""The model zoo's layers on the shared graph builder (`hwnas.graph.builder`).

Every node's output tensor carries the node's name, so a name such as `block3/dw/conv` identifies
both. The builder tracks each tensor's static shape (batch fixed to 1) so that callers can ask for
channel counts and spatial sizes, e.g. to size a Resize or a Reshape.

Weights are drawn from one seeded numpy Generator in construction order, so a model is a pure
function of its options and seed. Conv weights are He-normal (fan-in). BatchNormalization gets
random, non-trivial gamma/beta/mean/var, with the running statistics on roughly the scale of the
data that reaches it, as in a trained network: the builder propagates a crude estimate of each
tensor's mean square (its "power": doubled by a He-normal conv, halved by a rectifier, reset to 1
by BN, summed by Add) and draws the running variance around it. With unit running variances
instead, BN normalises nothing, activations grow ~1.4x per block where HardSwish does not saturate,
and the segmenter's logits reach a std of ~2.5e3; with the estimate they stay within ~1..10.
"""

from __future__ import annotations

import numpy as np

from hwnas.graph.builder import GraphBuilder

BN_EPSILON = 1e-5

# Mean square of a rectifier's output relative to its zero-mean input (half the mass survives).
_RECTIFIERS = ("relu", "relu6", "hardswish")
# Mean square of a gate's output for inputs of order one, whatever their scale.
_GATES = ("hardsigmoid", "sigmoid")
_GATE_POWER = 0.3


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """torchvision's `_make_divisible`: round to the nearest multiple of `divisor`, >= 90 % of value."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ZooBuilder(GraphBuilder):
    """Named layers; each tensor also carries an estimate of its mean square (its "power")."""

    producer = "hwnas.models"

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self._power: dict[str, float] = {}
        self._constants: set[str] = set()

    def channels(self, x: str) -> int:
        return self.shapes[x][1]

    def spatial(self, x: str) -> tuple[int, int]:
        _, _, height, width = self.shapes[x]
        return height, width

    # -- plumbing -----------------------------------------------------------------------------

    def image(self, name: str, channels: int, height: int, width: int) -> str:
        """A standard-normal image input (power 1)."""
        self._power[name] = 1.0
        return self.input(name, (1, channels, height, width))

    def _node(
        self, op: str, name: str, inputs: list[str], shape: tuple[int, ...], power: float, **attrs
    ) -> str:
        self.node(op, inputs, shape, name=name, **attrs)
        self._power[name] = power
        return name

    def _constant(self, name: str, array: np.ndarray) -> str:
        """A shared constant initializer, created on first use."""
        if name not in self._constants:
            self._constants.add(self.initializer(name, array))
        return name

    def _normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def _uniform(self, size: int, low: float, high: float) -> np.ndarray:
        return self.rng.uniform(low, high, size).astype(np.float32)

    # -- layers -------------------------------------------------------------------------------

    def conv(
        self,
        x: str,
        name: str,
        out_channels: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = False,
    ) -> str:
        """Conv with "same"-style padding (k - 1) // 2 * dilation, as torchvision's models use."""
        _, in_channels, height, width = self.shapes[x]
        fan_in = in_channels // groups * kernel * kernel
        weight = self._normal((out_channels, in_channels // groups, kernel, kernel), np.sqrt(2.0 / fan_in))
        inputs = [x, self.initializer(f"{name}/weight", weight)]
        if bias:
            inputs.append(self.initializer(f"{name}/bias", self._normal((out_channels,), 0.01)))
        pad = (kernel - 1) // 2 * dilation
        extent = dilation * (kernel - 1) + 1
        out_h = (height + 2 * pad - extent) // stride + 1
        out_w = (width + 2 * pad - extent) // stride + 1
        # He-normal weights double the expected mean square (fan_in * 2 / fan_in).
        return self._node(
            "Conv", name, inputs, (1, out_channels, out_h, out_w), 2.0 * self._power[x],
            kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4,
            dilations=[dilation, dilation], group=groups,
        )  # fmt: skip

    def bn(self, x: str, name: str) -> str:
        channels = self.channels(x)
        scale = np.sqrt(self._power[x])
        params = {
            "scale": self._uniform(channels, 0.5, 1.5),
            "bias": self._uniform(channels, -0.2, 0.2),
            "mean": self._uniform(channels, -0.2, 0.2) * np.float32(scale),
            "var": self._uniform(channels, 0.5, 1.5) * np.float32(scale * scale),
        }
        inputs = [x] + [self.initializer(f"{name}/{key}", value) for key, value in params.items()]
        return self._node("BatchNormalization", name, inputs, self.shapes[x], 1.0, epsilon=BN_EPSILON)

    def act(self, x: str, name: str, kind: str) -> str:
        """`kind` is relu, relu6, hardswish, hardsigmoid or sigmoid; the node is named `name`."""
        shape = self.shapes[x]
        power = 0.5 * self._power[x] if kind in _RECTIFIERS else _GATE_POWER
        if kind == "relu":
            return self._node("Relu", name, [x], shape, power)
        if kind == "relu6":
            # Clip takes its bounds as inputs since opset 11; one shared pair serves every ReLU6.
            low = self._constant("const/relu6_min", np.array(0.0, np.float32))
            high = self._constant("const/relu6_max", np.array(6.0, np.float32))
            return self._node("Clip", name, [x, low, high], shape, power)
        if kind == "hardswish":
            return self._node("HardSwish", name, [x], shape, power)
        if kind == "hardsigmoid":
            # PyTorch's Hardsigmoid is relu6(x + 3) / 6; ONNX's default alpha is 0.2.
            return self._node("HardSigmoid", name, [x], shape, power, alpha=1.0 / 6.0, beta=0.5)
        if kind == "sigmoid":
            return self._node("Sigmoid", name, [x], shape, power)
        raise ValueError(f"unknown activation {kind!r}")

    def conv_bn_act(self, x: str, scope: str, out_channels: int, act: str | None, **conv_args) -> str:
        """`scope/conv` -> `scope/bn` [-> `scope/<act>`]; `act=None` keeps the output linear."""
        y = self.bn(self.conv(x, f"{scope}/conv", out_channels, **conv_args), f"{scope}/bn")
        return y if act is None else self.act(y, f"{scope}/{act}", act)

    def add(self, a: str, b: str, name: str) -> str:
        return self._node("Add", name, [a, b], self.shapes[a], self._power[a] + self._power[b])

    def mul(self, x: str, gate: str, name: str) -> str:
        """x * gate, where gate may broadcast (e.g. [1, C, 1, 1])."""
        return self._node("Mul", name, [x, gate], self.shapes[x], self._power[x] * self._power[gate])

    def global_avg_pool(self, x: str, name: str) -> str:
        # The mean square of a spatial mean is at most the input's; the bound is close enough here.
        return self._node("GlobalAveragePool", name, [x], (1, self.channels(x), 1, 1), self._power[x])

    def resize(self, x: str, name: str, height: int, width: int) -> str:
        """Bilinear resize as PyTorch's interpolate(mode="bilinear", align_corners=False)."""
        shape = (1, self.channels(x), height, width)
        sizes = self.initializer(f"{name}/sizes", np.array(shape, np.int64))
        return self._node(
            "Resize", name, [x, "", "", sizes], shape, self._power[x],
            mode="linear", coordinate_transformation_mode="half_pixel",
        )  # fmt: skip

    def flatten(self, x: str, name: str) -> str:
        shape = (1, int(np.prod(self.shapes[x][1:])))
        return self._node("Flatten", name, [x], shape, self._power[x])

    def gemm(self, x: str, name: str, out_features: int) -> str:
        """Fully connected layer with LeCun-normal weights (it feeds no rectifier)."""
        in_features = self.shapes[x][1]
        weight = self._normal((out_features, in_features), np.sqrt(1.0 / in_features))
        inputs = [
            x,
            self.initializer(f"{name}/weight", weight),
            self.initializer(f"{name}/bias", self._normal((out_features,), 0.01)),
        ]
        return self._node("Gemm", name, inputs, (1, out_features), self._power[x], transB=1)

    def rows(self, x: str, scope: str, row_length: int) -> str:
        """[1, A*k, H, W] -> [1, H*W*A, k]: one row per anchor, in (y, x, anchor) order."""
        _, channels, height, width = self.shapes[x]
        nhwc_shape = (1, height, width, channels)
        power = self._power[x]
        nhwc = self._node("Transpose", f"{scope}/transpose", [x], nhwc_shape, power, perm=[0, 2, 3, 1])
        shape = (1, height * width * channels // row_length, row_length)
        target = self.initializer(f"{scope}/reshape/shape", np.array(shape, np.int64))
        return self._node("Reshape", f"{scope}/reshape", [nhwc, target], shape, power)

    def concat(self, xs: list[str], name: str, axis: int) -> str:
        shape = list(self.shapes[xs[0]])
        shape[axis] = sum(self.shapes[x][axis] for x in xs)
        return self._node("Concat", name, xs, tuple(shape), max(self._power[x] for x in xs), axis=axis)

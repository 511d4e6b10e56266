"""MobileNetV2 for ImageNet classification.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018, Table 2,
with torchvision's width-multiplier rounding (`make_divisible`):

    input       operator               t     c     n   s
    224²×3      conv2d 3×3             -     32    1   2
    112²×32     bottleneck             1     16    1   1
    112²×16     bottleneck             6     24    2   2
    56²×24      bottleneck             6     32    3   2
    28²×32      bottleneck             6     64    4   2
    14²×64      bottleneck             6     96    3   1
    14²×96      bottleneck             6     160   3   2
    7²×160      bottleneck             6     320   1   1
    7²×320      conv2d 1×1             -     1280  1   1
    7²×1280     avgpool 7×7            -     -     1   -
    1×1×1280    conv2d 1×1 (Gemm)      -     1000  -   -

A bottleneck (inverted residual) block is [1×1 expand conv → BN → ReLU6] (absent when t = 1) →
3×3 depthwise conv → BN → ReLU6 → 1×1 project conv → BN (linear) → Add of the block input when the
stride is 1 and the channel counts match. The 17 blocks are named `block0` … `block16`; `block0` is
the t = 1 block, the other 16 have an expansion.

At width 1.0, 224×224: 300,774,272 MACs (Conv + Gemm) and 3,538,986 parameters, which are
torchvision's 3,504,872 plus the BN running means/variances (2 × 17,056) and the two ReLU6 bounds.
Width 0.75: 209,069,792 MACs, 2,663,066 parameters; width 1.4: 582,195,824 MACs, 6,156,714.
"""

from __future__ import annotations

from typing import NamedTuple

import onnx

from hwnas.models._builder import ZooBuilder, make_divisible

# (t, c, n, s) rows of Table 2.
SETTINGS = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)  # fmt: skip
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
NUM_CLASSES = 1000
DEFAULT_RESOLUTION = 224

# The ReLU6 output of block13's expansion: 576 channels at stride 16, SSDLite's first feature map.
C4_EXPANSION = "block13/expand/relu6"


class Block(NamedTuple):
    expand_ratio: int
    out_channels: int
    stride: int


def blocks(width: float, divisor: int) -> list[Block]:
    """The 17 bottleneck blocks, with the width multiplier applied to their output channels."""
    return [
        Block(t, make_divisible(c * width, divisor), s if i == 0 else 1)
        for t, c, n, s in SETTINGS
        for i in range(n)
    ]


def inverted_residual(b: ZooBuilder, x: str, scope: str, block: Block) -> str:
    in_channels = b.channels(x)
    # torchvision sizes the hidden layer round(in × t) without the divisor: it is only as aligned
    # as the block input.
    hidden = int(round(in_channels * block.expand_ratio))
    h = x
    if block.expand_ratio != 1:
        h = b.conv_bn_act(h, f"{scope}/expand", hidden, "relu6")
    h = b.conv_bn_act(h, f"{scope}/dw", hidden, "relu6", kernel=3, stride=block.stride, groups=hidden)
    h = b.conv_bn_act(h, f"{scope}/project", block.out_channels, None)
    if block.stride == 1 and in_channels == block.out_channels:
        h = b.add(x, h, f"{scope}/add")
    return h


def features(b: ZooBuilder, x: str, width: float, divisor: int) -> str:
    """Stem, the 17 blocks and the 1×1 conv to 1280 (scaled up, never down, by the width)."""
    h = b.conv_bn_act(x, "stem", make_divisible(STEM_CHANNELS * width, divisor), "relu6", kernel=3, stride=2)
    for i, block in enumerate(blocks(width, divisor)):
        h = inverted_residual(b, h, f"block{i}", block)
    return b.conv_bn_act(h, "last", make_divisible(LAST_CHANNELS * max(1.0, width), divisor), "relu6")


def build(width: float, resolution: int, divisor: int, seed: int) -> onnx.ModelProto:
    b = ZooBuilder(seed)
    x = b.image("input", 3, resolution, resolution)
    h = features(b, x, width, divisor)
    h = b.flatten(b.global_avg_pool(h, "classifier/pool"), "classifier/flatten")
    logits = b.gemm(h, "logits", NUM_CLASSES)
    return b.model([logits], graph_name="mobilenetv2")

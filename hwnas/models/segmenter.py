"""MobileNetV3-Large with the LR-ASPP segmentation head.

Howard et al., "Searching for MobileNetV3", ICCV 2019: Table 1 (backbone) and §6.3 / Figure 10
(LR-ASPP), arranged as torchvision's `lraspp_mobilenet_v3_large` (backbone built with
`dilated=True`, 21 classes). Backbone rows (exp = expanded channels, SE = squeeze-excite,
NL = nonlinearity, RE = ReLU, HS = HardSwish):

    block    input      operator     exp   out   SE  NL  s
    stem     224²×3     conv2d 3×3   -     16    -   HS  2
    block0   112²×16    bneck 3×3    16    16    -   RE  1
    block1   112²×16    bneck 3×3    64    24    -   RE  2
    block2   56²×24     bneck 3×3    72    24    -   RE  1
    block3   56²×24     bneck 5×5    72    40    ✓   RE  2   <- low-level features (stride 8)
    block4   28²×40     bneck 5×5    120   40    ✓   RE  1
    block5   28²×40     bneck 5×5    120   40    ✓   RE  1
    block6   28²×40     bneck 3×3    240   80    -   HS  2
    block7   14²×80     bneck 3×3    200   80    -   HS  1
    block8   14²×80     bneck 3×3    184   80    -   HS  1
    block9   14²×80     bneck 3×3    184   80    -   HS  1
    block10  14²×80     bneck 3×3    480   112   ✓   HS  1
    block11  14²×112    bneck 3×3    672   112   ✓   HS  1
    block12  14²×112    bneck 5×5    672   160   ✓   HS  2   stride 1, dilation 2 (torchvision)
    block13  7²×160     bneck 5×5    960   160   ✓   HS  1   dilation 2
    block14  7²×160     bneck 5×5    960   160   ✓   HS  1   dilation 2
    last     7²×160     conv2d 1×1   -     960   -   HS  1   <- high-level features (stride 16)

A bneck is [1×1 expand conv → BN → NL] (absent when exp == in, block0 only) → k×k depthwise conv →
BN → NL → [SE: GlobalAveragePool → 1×1 conv (make_divisible(exp // 4)) → ReLU → 1×1 conv →
HardSigmoid → Mul] → 1×1 project conv → BN → residual Add when stride 1 and in == out. Dilating the
last stage instead of striding keeps the output stride at 16, as the paper's segmentation setup.
The low-level tap is torchvision's (`features[4]`, the output of block3).

LR-ASPP (`lraspp/...`): high = 1×1 conv 128 → BN → ReLU, gated by GlobalAveragePool → 1×1 conv 128
→ Sigmoid; bilinear Resize to the stride-8 size; 1×1 classifiers (with bias) on the low-level
features and on the gated high branch are summed; a final bilinear Resize gives `logits`
[1, 21, R, R]. Width, divisor and rounding apply to the backbone; the head keeps 128 channels.

The default resolution is 512×512, which runs in well under a second on a CPU. At width 1.0,
512×512: 1,974,665,088 MACs and 3,246,194 parameters, i.e. torchvision's 3,221,538 plus the BN
running statistics (2 × 12,328); 15 blocks, of which 14 expand (IBN). At 520×520, torchvision's
evaluation size, the count is 2,086,219,688 MACs, matching the 2.09 G it lists for
`lraspp_mobilenet_v3_large`. The paper's Cityscapes figures (19 classes, 1024×2048, halved last
stage) are a different configuration.
"""

from __future__ import annotations

from typing import NamedTuple

import onnx

from hwnas.models._builder import ZooBuilder, make_divisible


class Bneck(NamedTuple):
    kernel: int
    expanded: int
    out: int
    se: bool
    act: str
    stride: int
    dilation: int


RE, HS = "relu", "hardswish"
BNECKS = (
    Bneck(3, 16, 16, False, RE, 1, 1),
    Bneck(3, 64, 24, False, RE, 2, 1),
    Bneck(3, 72, 24, False, RE, 1, 1),
    Bneck(5, 72, 40, True, RE, 2, 1),
    Bneck(5, 120, 40, True, RE, 1, 1),
    Bneck(5, 120, 40, True, RE, 1, 1),
    Bneck(3, 240, 80, False, HS, 2, 1),
    Bneck(3, 200, 80, False, HS, 1, 1),
    Bneck(3, 184, 80, False, HS, 1, 1),
    Bneck(3, 184, 80, False, HS, 1, 1),
    Bneck(3, 480, 112, True, HS, 1, 1),
    Bneck(3, 672, 112, True, HS, 1, 1),
    Bneck(5, 672, 160, True, HS, 1, 2),
    Bneck(5, 960, 160, True, HS, 1, 2),
    Bneck(5, 960, 160, True, HS, 1, 2),
)
STEM_CHANNELS = 16
LOW_LEVEL_BLOCK = 3
HEAD_CHANNELS = 128
NUM_CLASSES = 21
DEFAULT_RESOLUTION = 512


def squeeze_excite(b: ZooBuilder, x: str, scope: str, divisor: int) -> str:
    squeezed = make_divisible(b.channels(x) // 4, divisor)
    s = b.global_avg_pool(x, f"{scope}/pool")
    s = b.act(b.conv(s, f"{scope}/fc1", squeezed, bias=True), f"{scope}/relu", "relu")
    s = b.act(b.conv(s, f"{scope}/fc2", b.channels(x), bias=True), f"{scope}/hardsigmoid", "hardsigmoid")
    return b.mul(x, s, f"{scope}/mul")


def bneck(b: ZooBuilder, x: str, scope: str, cfg: Bneck, width: float, divisor: int) -> str:
    in_channels = b.channels(x)
    expanded = make_divisible(cfg.expanded * width, divisor)
    h = x
    if expanded != in_channels:
        h = b.conv_bn_act(h, f"{scope}/expand", expanded, cfg.act)
    h = b.conv_bn_act(
        h, f"{scope}/dw", expanded, cfg.act,
        kernel=cfg.kernel, stride=cfg.stride, groups=expanded, dilation=cfg.dilation,
    )  # fmt: skip
    if cfg.se:
        h = squeeze_excite(b, h, f"{scope}/se", divisor)
    h = b.conv_bn_act(h, f"{scope}/project", make_divisible(cfg.out * width, divisor), None)
    if cfg.stride == 1 and in_channels == b.channels(h):
        h = b.add(x, h, f"{scope}/add")
    return h


def backbone(b: ZooBuilder, x: str, width: float, divisor: int) -> tuple[str, str]:
    """Returns the (stride-8 low-level, stride-16 high-level) feature tensors."""
    h = b.conv_bn_act(x, "stem", make_divisible(STEM_CHANNELS * width, divisor), HS, kernel=3, stride=2)
    outputs = []
    for i, cfg in enumerate(BNECKS):
        h = bneck(b, h, f"block{i}", cfg, width, divisor)
        outputs.append(h)
    return outputs[LOW_LEVEL_BLOCK], b.conv_bn_act(h, "last", 6 * b.channels(h), HS)


def lraspp(b: ZooBuilder, low: str, high: str, resolution: int) -> str:
    h = b.conv_bn_act(high, "lraspp/cbr", HEAD_CHANNELS, "relu")
    s = b.global_avg_pool(high, "lraspp/scale/pool")
    s = b.act(b.conv(s, "lraspp/scale/conv", HEAD_CHANNELS), "lraspp/scale/sigmoid", "sigmoid")
    h = b.resize(b.mul(h, s, "lraspp/gate"), "lraspp/upsample", *b.spatial(low))
    out = b.add(
        b.conv(low, "lraspp/low_classifier", NUM_CLASSES, bias=True),
        b.conv(h, "lraspp/high_classifier", NUM_CLASSES, bias=True),
        "lraspp/sum",
    )
    return b.resize(out, "logits", resolution, resolution)


def build(width: float, resolution: int, divisor: int, seed: int) -> onnx.ModelProto:
    b = ZooBuilder(seed)
    x = b.image("input", 3, resolution, resolution)
    low, high = backbone(b, x, width, divisor)
    logits = lraspp(b, low, high, resolution)
    return b.model([logits], graph_name="segmenter")

"""SSDLite with a MobileNetV2 backbone: an object detector built from IBN blocks.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018, §6.2 (SSDLite:
every regular conv of the SSD prediction layers replaced by a depthwise-separable one), laid out as
TensorFlow's `ssdlite_mobilenet_v2` and torchvision's `ssdlite320_mobilenet_v3_large`:

    feature map                                   size (320²)  channels  anchors/cell
    block13 expansion output (ReLU6, stride 16)   20×20        576       3
    last 1×1 conv of MobileNetV2 (stride 32)      10×10        1280      6
    extra0                                        5×5          512       6
    extra1                                        3×3          256       6
    extra2                                        2×2          256       6
    extra3                                        1×1          128       6

An extra layer `extraN` is 1×1 conv to half its output channels → BN → ReLU6 (`reduce`) → 3×3
depthwise stride 2 → BN → ReLU6 (`dw`) → 1×1 conv → BN → ReLU6 (`pw`). Its output channels are
scaled by the width multiplier like the backbone's. Each feature map has two heads, `headN/box`
(anchors × 4) and `headN/cls` (anchors × 91 COCO classes, background included): 3×3 depthwise →
BN → ReLU6 (`dw`) → 1×1 conv with bias (`conv`), then Transpose + Reshape to one row per anchor,
concatenated into `boxes` [1, A, 4] and `scores` [1, A, 91] (raw logits, no decoding or NMS).

The lowest map has 3 anchors per cell, as TF's SSD configs (`reduce_boxes_in_lowest_layer`), the
others 6 (2 scales × ratio 1 + ratios 2, 1/2, 3, 1/3): 1,200 + 6 × 139 = 2,034 anchors at 320².

At width 1.0, 320×320: 804,397,504 MACs and 4,551,297 parameters (4,500,545 without the BN running
statistics) against the paper's 0.8 B MAdds and 4.3 M parameters; 21 blocks (17 backbone + 4
extra), of which the 16 expanding backbone blocks are IBN blocks (an extra layer reduces, not
expands, before its depthwise conv).
"""

from __future__ import annotations

import onnx

from hwnas.models import mobilenetv2
from hwnas.models._builder import ZooBuilder, make_divisible

EXTRA_CHANNELS = (512, 256, 256, 128)
ANCHORS = (3, 6, 6, 6, 6, 6)
NUM_CLASSES = 91
BOX_CODE = 4
DEFAULT_RESOLUTION = 320


def extra_layer(b: ZooBuilder, x: str, scope: str, out_channels: int) -> str:
    h = b.conv_bn_act(x, f"{scope}/reduce", out_channels // 2, "relu6")
    h = b.conv_bn_act(h, f"{scope}/dw", b.channels(h), "relu6", kernel=3, stride=2, groups=b.channels(h))
    return b.conv_bn_act(h, f"{scope}/pw", out_channels, "relu6")


def prediction(b: ZooBuilder, x: str, scope: str, anchors: int, code: int) -> str:
    """Depthwise-separable head, reshaped to [1, cells · anchors, code]."""
    channels = b.channels(x)
    h = b.conv_bn_act(x, f"{scope}/dw", channels, "relu6", kernel=3, groups=channels)
    h = b.conv(h, f"{scope}/conv", anchors * code, bias=True)
    return b.rows(h, scope, code)


def build(width: float, resolution: int, divisor: int, seed: int) -> onnx.ModelProto:
    b = ZooBuilder(seed)
    x = b.image("input", 3, resolution, resolution)
    maps = [mobilenetv2.C4_EXPANSION, mobilenetv2.features(b, x, width, divisor)]
    for i, channels in enumerate(EXTRA_CHANNELS):
        maps.append(extra_layer(b, maps[-1], f"extra{i}", make_divisible(channels * width, divisor)))
    boxes = [prediction(b, f, f"head{i}/box", a, BOX_CODE) for i, (f, a) in enumerate(zip(maps, ANCHORS))]
    scores = [prediction(b, f, f"head{i}/cls", a, NUM_CLASSES) for i, (f, a) in enumerate(zip(maps, ANCHORS))]
    b.concat(boxes, "boxes", axis=1)
    b.concat(scores, "scores", axis=1)
    return b.model(["boxes", "scores"], graph_name="ibn-detector")

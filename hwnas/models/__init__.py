"""Reference CNN workloads, built as ONNX models with onnx + numpy only.

Each model is opset 17, IR version 8, float32, batch 1, with seeded random weights as initializers
and BatchNormalization left unfolded after every bias-free Conv, as a training export has it:

    mobilenetv2    MobileNetV2 ImageNet classifier (Sandler et al. 2018), 224²
    ibn-detector   SSDLite-MobileNetV2 COCO detector (Sandler et al. 2018, §6.2), 320²
    segmenter      MobileNetV3-Large + LR-ASPP semantic segmentation (Howard et al. 2019), 512²

`build(name, width, resolution, divisor, seed)` returns the model; `zoo_info` counts its MACs,
parameters and (IBN) blocks from the built graph. `width` scales channel counts, rounded by
torchvision's `_make_divisible(c * width, divisor)`; `divisor=1` leaves them unaligned.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import onnx

from hwnas.graph.flops import count_macs, count_params
from hwnas.models import ibn_detector, mobilenetv2, segmenter

ZOO_NAMES = ("mobilenetv2", "ibn-detector", "segmenter")
MIN_RESOLUTION = 32  # the backbones stride by 32; below that the deepest maps are mostly padding


@dataclass(frozen=True)
class ZooSpec:
    name: str
    description: str
    default_resolution: int


@dataclass(frozen=True)
class ZooInfo:
    macs: int
    params: int
    ibn_blocks: int
    blocks: int


SPECS = MappingProxyType(
    {
        "mobilenetv2": ZooSpec(
            "mobilenetv2",
            "MobileNetV2 ImageNet classifier, 1000 classes (Sandler et al. 2018)",
            mobilenetv2.DEFAULT_RESOLUTION,
        ),
        "ibn-detector": ZooSpec(
            "ibn-detector",
            "SSDLite-MobileNetV2 COCO detector, 91 classes, 2034 anchors at 320² (Sandler et al. 2018)",
            ibn_detector.DEFAULT_RESOLUTION,
        ),
        "segmenter": ZooSpec(
            "segmenter",
            "MobileNetV3-Large + LR-ASPP segmenter, 21 classes, output stride 16 (Howard et al. 2019)",
            segmenter.DEFAULT_RESOLUTION,
        ),
    }
)

_BUILDERS: dict[str, Callable[[float, int, int, int], onnx.ModelProto]] = {
    "mobilenetv2": mobilenetv2.build,
    "ibn-detector": ibn_detector.build,
    "segmenter": segmenter.build,
}

# A block is a scope `blockN` / `extraN` holding a depthwise conv; an IBN block also expands
# (has `<scope>/expand/conv`) before it.
_BLOCK_DW = re.compile(r"^((?:block|extra)\d+)/dw/conv$")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _spec(name: str) -> ZooSpec:
    if name not in SPECS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(ZOO_NAMES)}")
    return SPECS[name]


def _check_options(width: float, resolution: int, divisor: int, seed: int) -> None:
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or not (0 < width < math.inf):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")
    if not _is_int(resolution) or resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be an integer >= {MIN_RESOLUTION}, got {resolution!r}")
    if not _is_int(divisor) or divisor < 1:
        raise ValueError(f"divisor must be an integer >= 1, got {divisor!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def build(
    name: str, width: float = 1.0, resolution: int | None = None, divisor: int = 8, seed: int = 0
) -> onnx.ModelProto:
    """Build zoo model `name`; `resolution` (square input side) defaults to the model's own."""
    spec = _spec(name)
    resolution = spec.default_resolution if resolution is None else resolution
    _check_options(width, resolution, divisor, seed)
    model = _BUILDERS[name](float(width), int(resolution), int(divisor), int(seed))
    options = f"width={width}, resolution={resolution}, divisor={divisor}, seed={seed}"
    model.doc_string = f"{spec.description}; {options}"
    return model


def count_blocks(model: onnx.ModelProto) -> tuple[int, int]:
    """(IBN blocks, blocks) of a zoo model, from its node names."""
    names = {node.name for node in model.graph.node}
    scopes = [m[1] for m in map(_BLOCK_DW.match, sorted(names)) if m]
    return sum(f"{scope}/expand/conv" in names for scope in scopes), len(scopes)


def zoo_info(
    name: str, width: float = 1.0, resolution: int | None = None, divisor: int = 8, seed: int = 0
) -> ZooInfo:
    model = build(name, width, resolution, divisor, seed)
    ibn_blocks, blocks = count_blocks(model)
    return ZooInfo(sum(count_macs(model).values()), count_params(model), ibn_blocks, blocks)

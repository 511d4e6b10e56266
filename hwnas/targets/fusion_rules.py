"""Which ops a target runs fused into one kernel: data, one set of rules per target.

A fused kernel starts at an *anchor* (a Conv, a Gemm...) and absorbs the chain of ops that directly
follow it, as long as each intermediate tensor has no other consumer and is not a graph output:

- `epilogue_ops`: unary ops whose other inputs are constants (BatchNormalization, Relu, Clip...);
- `affine`: Mul/Add/Sub/Div by a scalar or per-channel constant (x / c, never c / x);
- `affine_folds`: affine ops ride along only before the anchor's activation, where they fold into its
  weights and bias; after one (a learnable affine block, y = a · act(x) + b) they run as kernels of their
  own (ONNX Runtime's CPU provider: checked on its optimized graphs, 1.32). A self gate's `/ 6` still rides;
- `self_gate`: x · g(x) where g is a chain of absorbable unary ops applied to x, i.e. the decomposed
  forms of swish (x·Sigmoid(x)) and hard-swish (Paddle's x·Clip(x+3, 0, 6) / 6, the `/ 6` being affine);
- `residual_add`: a final Add of a same-shape tensor computed elsewhere (the IBN skip connection);
- `residual_epilogue`: `epilogue_ops` after that Add ride along too (ResNet's Add → Relu, which ORT runs
  inside the conv's node);
- `output_dequantize`: a DequantizeLinear that writes a graph output is a kernel of its own, and so is the
  QuantizeLinear before it after an op that does not write integers itself (ONNX Runtime's CPU provider runs
  both over the whole output: ~1 ms each after a segmenter's 512² upsample); elsewhere a Q → DQ pair is free;
- `int8_channels_last`: the target runs int8 convs channels-last (ONNX Runtime's CPU provider: QLinearConv
  in NHWC), so a Transpose to NHWC of a quantized conv output, between a DQ and Q of the same scale, runs
  no node (it cancels against the conv's own layout transpose): free;
- `float_linear_resize`: a Resize that interpolates (linear, cubic) between a DQ and a Q runs in float (ONNX
  Runtime's CPU provider keeps the DQ and Q: its integer Resize is nearest only), so its kernel is float;
- `patterns`: op chains that exporters write for one layer and the target runs as one node, each made one
  kernel named after the op it becomes (`PATTERNS`): the erf GELU `x·0.5·(1 + erf(x/√2))` (with a
  bias Add before it, ORT's BiasGelu), the decomposed LayerNorm (ReduceMean, Sub, Pow, ReduceMean, Add,
  Sqrt, Div, Mul, Add), RMSNorm (the same from Pow to Mul) and SiLU `x·sigmoid(x)` (ORT's QuickGelu) where no anchor took it as a `self_gate`.

The npu's rules ship as `data/fusion_npu.json`; other targets' rules (the cpu's are found by measurement)
are plain dicts or JSON files with the same keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hwnas.errors import BadInputError
from hwnas.report.json_report import read_json

_BOOL_KEYS = ("affine", "affine_folds", "self_gate", "residual_add", "residual_epilogue", "output_dequantize",
              "int8_channels_last", "float_linear_resize")
# written only when set: rules written before these keys keep their form
_WRITTEN_WHEN_SET = ("residual_epilogue", "affine_folds", "output_dequantize", "int8_channels_last", "float_linear_resize")
_SET_KEYS = ("anchors", "epilogue_ops", "patterns")
# the chains `patterns` may name (matched in hwnas.targets.kernels), by the op the target runs them as
PATTERNS = ("Gelu", "LayerNormalization", "QuickGelu", "SimplifiedLayerNormalization")


@dataclass(frozen=True)
class FusionRules:
    anchors: frozenset[str] = frozenset()
    epilogue_ops: frozenset[str] = frozenset()
    affine: bool = False
    affine_folds: bool = False
    self_gate: bool = False
    residual_add: bool = False
    residual_epilogue: bool = False
    output_dequantize: bool = False
    int8_channels_last: bool = False
    float_linear_resize: bool = False
    patterns: frozenset[str] = frozenset()

    @classmethod
    def from_dict(cls, data: dict, origin: str = "fusion rules") -> FusionRules:
        if not isinstance(data, dict):
            raise BadInputError(f"{origin}: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_SET_KEYS) - set(_BOOL_KEYS))
        if unknown:
            raise BadInputError(f"{origin}: unknown keys {unknown}; known: {sorted(_SET_KEYS + _BOOL_KEYS)}")
        values: dict = {}
        for key in _SET_KEYS:
            ops = data.get(key, [])
            if not isinstance(ops, list) or not all(isinstance(op, str) and op for op in ops):
                raise BadInputError(f"{origin}: {key!r} must be a list of op type names")
            values[key] = frozenset(ops)
        unknown_patterns = sorted(values["patterns"] - set(PATTERNS))
        if unknown_patterns:
            raise BadInputError(f"{origin}: unknown patterns {unknown_patterns}; known: {list(PATTERNS)}")
        for key in _BOOL_KEYS:
            flag = data.get(key, False)
            if not isinstance(flag, bool):
                raise BadInputError(f"{origin}: {key!r} must be true or false, got {flag!r}")
            values[key] = flag
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> FusionRules:
        return cls.from_dict(read_json(path, "fusion rules"), origin=str(path))

    def to_dict(self) -> dict:
        return {
            "anchors": sorted(self.anchors),
            "epilogue_ops": sorted(self.epilogue_ops),
            **{key: getattr(self, key) for key in _BOOL_KEYS if key not in _WRITTEN_WHEN_SET or getattr(self, key)},
            # patterns likewise only when any
            **({"patterns": sorted(self.patterns)} if self.patterns else {}),
        }


def builtin_rules(target_kind: str) -> FusionRules:
    """The rules shipped for a target kind (`npu`), from `hwnas/targets/data/fusion_<kind>.json`."""
    resource = resources.files("hwnas.targets") / "data" / f"fusion_{target_kind}.json"
    if not resource.is_file():
        raise BadInputError(f"no built-in fusion rules for target kind {target_kind!r}")
    return FusionRules.from_dict(json.loads(resource.read_text()), origin=f"fusion_{target_kind}.json")

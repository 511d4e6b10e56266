"""Input shapes and shape inference.

`--input-shape x:1x3x640x640` fixes dynamic dims *for analysis only* (estimation, calibration,
verification); the written model keeps its dynamic signature (docs/design.md, "Verification").
A dynamic leading (batch) dim defaults to 1; any other dynamic dim must be given.

Every tensor's shape comes from ONNX shape inference with data propagation; where that leaves a
tensor without a static shape (Paddle exports compute Reshape targets at run time), ONNX Runtime runs
the model once on zeros and reports the shapes it saw.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper

from hwnas.errors import BadInputError
from hwnas.graph.io import graph_inputs
from hwnas.graph.session import probe_session, random_feeds

Shape = tuple[int, ...]
_SHAPE_RE = re.compile(r"^(?:(?P<name>.+):)?(?P<dims>\d+(?:x\d+)*)$")


def auto_pads(auto_pad: str | bytes, size: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[int, int] | None:
    """(begin, end) padding of one spatial axis of `size` under a conv's or pool's `auto_pad`: SAME_UPPER puts the
    odd one at the end, SAME_LOWER at the begin, VALID none; None for NOTSET (its `pads` hold)."""
    mode = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if mode in ("NOTSET", ""):
        return None
    if mode == "VALID":
        return 0, 0
    total = max(0, (math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size)
    small, large = total // 2, total - total // 2
    return (large, small) if mode == "SAME_LOWER" else (small, large)


def parse_input_shapes(specs: Iterable[str]) -> dict[str, Shape]:
    """Parse `name:1x3x224x224` items (the name may be omitted for single-input models: key '')."""
    shapes: dict[str, Shape] = {}
    for spec in specs:
        m = _SHAPE_RE.match(spec.strip())
        if not m:
            raise BadInputError(f"bad --input-shape {spec!r}: expected NAME:DxDxD..., e.g. x:1x3x224x224")
        dims = tuple(int(d) for d in m["dims"].split("x"))
        if any(d <= 0 for d in dims):
            raise BadInputError(f"bad --input-shape {spec!r}: dims must be positive")
        shapes[m["name"] or ""] = dims
    return shapes


def declared_dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """Dims as declared: ints where static, the symbol (or '?') where dynamic."""
    out: list[int | str] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(d.dim_value)
        else:
            out.append(d.dim_param or "?")
    return out


def resolve_input_shapes(model: onnx.ModelProto, overrides: Mapping[str, Shape] | None = None) -> dict[str, Shape]:
    """Concrete shape of every model input, from the declaration and the user's overrides."""
    overrides = dict(overrides or {})
    inputs = graph_inputs(model)
    if "" in overrides:
        if len(inputs) != 1:
            raise BadInputError("--input-shape without a name is only allowed for single-input models")
        overrides[inputs[0].name] = overrides.pop("")
    names = {i.name for i in inputs}
    for name in overrides:
        if name not in names:
            raise BadInputError(f"--input-shape names {name!r}, but the model's inputs are {sorted(names)}")
    shapes: dict[str, Shape] = {}
    for value in inputs:
        dims = declared_dims(value)
        given = overrides.get(value.name)
        if given is not None:
            if len(given) != len(dims):
                raise BadInputError(f"--input-shape {value.name}: rank {len(given)}, but the model declares {dims}")
            for want, have in zip(dims, given):
                if isinstance(want, int) and want != have:
                    raise BadInputError(f"--input-shape {value.name}:{'x'.join(map(str, given))} contradicts the declared {dims}")
            shapes[value.name] = tuple(given)
            continue
        fixed = [1 if (i == 0 and not isinstance(d, int)) else d for i, d in enumerate(dims)]
        if not all(isinstance(d, int) for d in fixed):
            example = "x".join(str(d) if isinstance(d, int) else "N" for d in fixed)
            raise BadInputError(
                f"input {value.name!r} has dynamic dims {dims}; give --input-shape {value.name}:{example}"
            )
        shapes[value.name] = tuple(fixed)  # type: ignore[arg-type]
    return shapes


def with_static_inputs(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> onnx.ModelProto:
    """A copy of `model` whose inputs declare the given concrete shapes and no stale value_info."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _declare_input_shapes(out.graph, shapes)
    del out.graph.value_info[:]
    return out


def _declare_input_shapes(graph: onnx.GraphProto, shapes: Mapping[str, Shape]) -> None:
    for value in graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[value.name]:
                dims.add().dim_value = d


def _static_shape(value: onnx.ValueInfoProto) -> Shape | None:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = declared_dims(value)
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None  # type: ignore[return-value]


_INLINE_LIMIT = 64  # initializers up to this many elements keep their values (shape arithmetic needs them)


def _shape_only(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> onnx.ModelProto:
    """The model at static input shapes with its large weights declared as inputs instead of stored.

    Serializing (or even copying) megabytes of weights dominates ONNX shape inference; only small
    tensors (Reshape targets, Resize scales...) take part in data propagation, so only they keep their
    values. The model itself is not copied.
    """
    graph = model.graph
    # math.prod: np.prod per initializer was a tenth of a long chain's shape inference
    small = [t for t in graph.initializer if math.prod(t.dims) <= _INLINE_LIMIT]
    declared = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                for t in graph.initializer if math.prod(t.dims) > _INLINE_LIMIT]
    lean = helper.make_graph(list(graph.node), graph.name, list(graph.input) + declared, list(graph.output), small)
    out = helper.make_model(lean, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    _declare_input_shapes(out.graph, shapes)
    return out


# Recent `infer_tensors` results by the digest of the shape-only model (its graph, small constants, the large ones'
# dims and types, the input shapes: everything a shape follows from). One `hwnas estimate` infers the same model's
# shapes three times (kernels, memory, lane warnings); where onnx's inference leaves tensors unknown, each ran the
# model in ORT: PP-OCRv4 det at 640² spent ~1 s of its 2 s there.
_INFERRED: OrderedDict[str, tuple[dict[str, Shape], dict[str, int]]] = OrderedDict()
_INFERRED_KEPT = 8


def infer_tensors(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> tuple[dict[str, Shape], dict[str, int]]:
    """(static shape, ONNX element type) of every top-level tensor at the given input shapes."""
    static = _shape_only(model, shapes)
    key = hashlib.sha256(static.SerializeToString(deterministic=True)).hexdigest()
    if key not in _INFERRED:
        _INFERRED[key] = _infer_tensors(model, shapes, static)
        if len(_INFERRED) > _INFERRED_KEPT:
            _INFERRED.popitem(last=False)
    _INFERRED.move_to_end(key)
    inferred, types = _INFERRED[key]
    return dict(inferred), dict(types)  # copies: a caller may add to them


def _infer_tensors(model: onnx.ModelProto, shapes: Mapping[str, Shape],
                   static: onnx.ModelProto) -> tuple[dict[str, Shape], dict[str, int]]:
    result: dict[str, Shape] = {name: tuple(s) for name, s in shapes.items()}
    types: dict[str, int] = {}
    for t in model.graph.initializer:
        result[t.name] = tuple(t.dims)
        types[t.name] = t.data_type
    try:
        inferred = onnx.shape_inference.infer_shapes(static, data_prop=True)
        for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
            if value.type.tensor_type.elem_type:
                types.setdefault(value.name, value.type.tensor_type.elem_type)
            s = _static_shape(value)
            if s is not None:
                result.setdefault(value.name, s)
    except (onnx.shape_inference.InferenceError, ValueError):
        pass  # ORT below fills in everything
    missing = [o for n in static.graph.node for o in n.output if o and o not in result]
    if missing:
        result.update(_shapes_from_ort(with_static_inputs(model, shapes), shapes, missing))
    return result, types


def tensor_shapes(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """Static shape of every top-level tensor (inputs, initializers, node outputs) at the given input shapes."""
    return infer_tensors(model, shapes)[0]


def _shapes_from_ort(model: onnx.ModelProto, shapes: Mapping[str, Shape], names: list[str]) -> dict[str, Shape]:
    session = probe_session(model, names)
    feeds = random_feeds(model, shapes, seed=0)
    outs = session.run(names, feeds)
    return {name: tuple(np.shape(v)) for name, v in zip(names, outs)}

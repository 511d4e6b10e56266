"""Graph → kernels: the units a target runs as one, e.g. conv + bn + act [+ residual add].

`decompose(model, input_shapes, rules)` walks the top-level nodes in order. An anchor op (per the
target's `FusionRules`) absorbs the chain of epilogue ops that follows it (Identity and Dropout, which
exporters leave mid-chain, always pass through); an op chain the target runs as one node (the rules'
`patterns`: an exporter's erf GELU, decomposed LayerNorm, x·sigmoid(x)) is one kernel named after that
op (`op` "Gelu", "LayerNormalization", "QuickGelu", of the kind that op has); every other node is a
kernel of its own. Every
top-level node ends up in exactly one kernel; nothing is dropped. Kernels come back in execution order
(by their last node), so summing them in order is a valid schedule.

Kinds (the op semantics, the same on every target):

    conv         Conv, dense or grouped
    dwconv       Conv with groups == input channels > 1 (depthwise, depth multiplier allowed)
    deconv       ConvTranspose
    gemm         Gemm, MatMul
    elementwise  unary/binary per-element ops (Add, Mul, Clip, BatchNormalization standing alone...)
    pool         pooling and reductions (each output reads a window of `window` inputs)
    resize       Resize, Upsample, DepthToSpace, SpaceToDepth
    concat       Concat
    free         moves no data: Reshape, Flatten, Squeeze, Unsqueeze, Identity, Dropout, every node
                 computed from constants and shapes alone (Constant, Shape, the arithmetic that sizes a
                 Reshape, a weight's DequantizeLinear): a compiler resolves those before run time; and a
                 QuantizeLinear → DequantizeLinear pair between kernels: it marks the tensor as int8, which
                 the kernels on either side read and write as such (ORT fuses DQ → Conv → Q into QLinearConv);
                 not, under the rules' `output_dequantize`, a DequantizeLinear that writes a graph output (nor
                 the QuantizeLinear before it after an op that writes no integers): elementwise kernels;
                 under `int8_channels_last` a quantized conv output's Transpose to NHWC (ORT: no node);
                 under `float_linear_resize` an interpolating Resize between Q/DQ is a float kernel
    other        anything else (Transpose, Slice, Softmax, custom ops...): kept, costed by a fallback

Conv-like kernels also carry their GEMM view (`GemmShape`), the way a systolic array runs them:
`groups` independent products of a P×K matrix (P = output pixels × batch, K = R·S·C_in/g) by a K×N one
(N = C_out/g). ConvTranspose runs as a stride-1 conv over its zero-stuffed input (P = output pixels),
so its GEMM does stride² × the MACs that `macs` counts. Batched MatMuls (both operands with batch dims)
run their batch like groups, one product after another.

Sizes are element counts; a target multiplies by its bytes per element (`Kernel.bytes_moved`), except for
tensors stored in a fixed-size type: int8/uint8 1 byte, int16/uint16 2, int32 4; at a QuantizeLinear →
DequantizeLinear boundary the integer tensor between them is what is stored (`_stored_itemsize`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hwnas.graph.constants import constant_node_value, denormal_mask
from hwnas.graph.shapes import Shape, auto_pads, infer_tensors, resolve_input_shapes
from hwnas.targets.fusion_rules import FusionRules

_KINDS_BY_OP = MappingProxyType(
    {
        **{op: "elementwise" for op in (
            "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "Abs", "Neg", "Reciprocal", "Relu",
            "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Clip", "Sigmoid", "HardSigmoid",
            "HardSwish", "Tanh", "Softplus", "Softsign", "Erf", "Mish", "BatchNormalization", "Max",
            "Min", "Mean", "Sum", "Where", "Equal", "Greater", "Less", "And", "Or", "Not", "Floor",
            "Ceil", "Round", "Sign", "Cast", "QuantizeLinear", "DequantizeLinear", "QuickGelu",
        )},
        **{op: "pool" for op in (
            "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
            "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
            "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin",
        )},
        **{op: "resize" for op in ("Resize", "Upsample", "DepthToSpace", "SpaceToDepth")},
        **{op: "free" for op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout")},
        "Concat": "concat",
        "ConvTranspose": "deconv",
        "Gemm": "gemm",
        "MatMul": "gemm",
        # recurrent layers: a matrix-vector product per time step and direction (`_recurrent_features`)
        **{op: "gemm" for op in ("LSTM", "GRU", "RNN")},
    }
)
_RECURRENT_GATES = MappingProxyType({"LSTM": 4, "GRU": 3, "RNN": 1})
_AFFINE_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
_PASS_THROUGH = frozenset({"Identity", "Dropout"})  # exporters put these mid-chain; they never stop a fusion
# what an anchor absorbs into its weights, after which an affine op still folds (`FusionRules.affine_folds`)
_FOLDING_OPS = _AFFINE_OPS | {"BatchNormalization"} | _PASS_THROUGH
_STATIC_SOURCES = frozenset({"Constant", "Shape", "Size"})  # outputs known before run time
_ONNX_DOMAINS = ("", "ai.onnx")
_SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
# what ONNX Runtime's CPU provider runs as a kernel that writes integers when a QuantizeLinear follows
# (QDQSelectorActionTransformer: QLinearConv, QGemm, QLinearAdd, QLinearConcat...); after any other op the
# QuantizeLinear runs as a node of its own (`FusionRules.output_dequantize`)
_QLINEAR_OPS = frozenset({"Conv", "MatMul", "Gemm", "Add", "Mul", "AveragePool", "GlobalAveragePool", "LeakyRelu",
                          "Sigmoid", "Softmax", "Concat", "Where"})
# ops that move integers as they are: between a DequantizeLinear and a QuantizeLinear of the same scale and zero
# point ORT drops both and runs the op on the integers (QDQSelectorActionTransformer's "drop" rules; a Resize
# unless it interpolates, `_resizes_in_float`)
_INT8_MOVES = frozenset({"Gather", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Resize", "Split",
                         "DepthToSpace", "SpaceToDepth"})


@dataclass(frozen=True)
class GemmShape:
    """`groups` products of a p×k by a k×n matrix, run one after another."""

    p: int
    k: int
    n: int
    groups: int = 1


@dataclass(frozen=True)
class Kernel:
    name: str  # the anchor (first) node's name
    op: str  # the anchor's op type
    kind: str
    nodes: tuple[str, ...]  # every node covered, anchor first
    ops: tuple[str, ...]  # their op types, in the same order
    input_shapes: tuple[Shape, ...]  # activations entering the kernel (weights excluded)
    output_shapes: tuple[Shape, ...]  # tensors leaving it
    c_in: int = 1
    c_out: int = 1
    kernel_h: int = 1
    kernel_w: int = 1
    stride_h: int = 1
    stride_w: int = 1
    dilation_h: int = 1
    dilation_w: int = 1
    groups: int = 1
    window: int = 1  # inputs each output element reads (pool window); 1 elsewhere
    # Softmax family: the elements between two neighbours along the normalized axis, 1 for the last axis
    # (ORT transposes any other axis last and back: 10-20x the time per element)
    inner: int = 1
    macs: int = 0
    input_elements: int = 0
    weight_elements: int = 0
    output_elements: int = 0
    gemm: GemmShape | None = None
    residual: bool = False  # a residual Add is fused in
    int8: bool = False  # an activation enters through a DequantizeLinear: the kernel runs quantized
    # of input + weight + output elements, those stored as float32 (None: all of them), and the bytes of
    # the rest, whose type fixes their size (`_stored_itemsize`)
    float_elements: int | None = None
    fixed_bytes: int = 0
    # Resize/Upsample: how an output finds its inputs, `mode:coordinate_transformation_mode[:nearest_mode]`
    # ("nearest:asymmetric:floor", PyTorch's and Paddle's exports, is pure pixel replication, which ORT's CPU
    # runs in its blocked layout ~10x faster than "nearest:half_pixel:round_prefer_floor"); "" elsewhere
    interpolation: str = ""
    # elements quantized by free QuantizeLinear nodes that ORT runs before this kernel (`_carry_quantizes`)
    quantize_elements: int = 0

    @property
    def fused_ops(self) -> tuple[str, ...]:
        return self.ops[1:]

    def bytes_moved(self, bytes_per_element: int) -> int:
        """DRAM traffic if inputs, weights and outputs each cross once; float elements at `bytes_per_element`."""
        total = self.input_elements + self.weight_elements + self.output_elements
        return self.fixed_bytes + (total if self.float_elements is None else self.float_elements) * bytes_per_element


@dataclass(frozen=True)
class _Graph:
    """Indexes over the top-level nodes that the decomposition asks about."""

    nodes: tuple[onnx.NodeProto, ...]
    keys: tuple[str, ...]
    producer: Mapping[str, int]
    consumers: Mapping[str, tuple[int, ...]]
    outputs: frozenset[str]
    static: frozenset[str]
    shapes: Mapping[str, Shape]
    types: Mapping[str, int]  # ONNX element type by tensor, where known
    # constants known without running anything, as a runtime folds them: initializers, Constant nodes, and
    # what is computed from those alone (not from a Shape); values of the first two
    folded: frozenset[str]
    values: Mapping[str, np.ndarray]
    opset: int  # of the default domain
    rules: FusionRules  # what the int8 boundary checks read (output_dequantize, int8_channels_last, float_linear_resize)


def decompose(model: onnx.ModelProto, input_shapes: Mapping[str, Shape], rules: FusionRules) -> list[Kernel]:
    """The kernels `model` runs as at `input_shapes` under `rules`, in execution order."""
    shapes = resolve_input_shapes(model, input_shapes)
    graph = _index(model, *infer_tensors(model, shapes), rules)
    claimed: set[int] = set()
    groups: list[tuple[list[int], bool, str | None]] = []
    patterns = _patterns(graph, rules)
    for i, node in enumerate(graph.nodes):
        if i in claimed:
            continue
        match = patterns.get(i)
        if match is not None:
            members = [m for m in match.members if m not in claimed]
            if set(match.members) - set(members) <= match.optional:  # a chain an anchor took part of stays apart
                claimed.update(members)
                groups.append((members, False, match.op))
                continue
        members, residual = [i], False
        if _kind(graph, i) != "free" and _is_anchor(node, rules):
            chain, residual = _epilogue(graph, node.output[0], rules, claimed | {i})
            members += chain
        claimed.update(members)
        groups.append((members, residual, None))
    groups.sort(key=lambda group: max(group[0]))
    return _carry_quantizes(graph, groups, [_make_kernel(graph, members, residual, op) for members, residual, op in groups])


def carriers(kernels: Sequence[Kernel]) -> list[int | None]:
    """Which kernel carries each kernel's time in an in-context profile: itself, or for a free one (costed 0 by
    the estimator) the next kernel that is not free (the previous one at the end)."""
    live = [i for i, k in enumerate(kernels) if k.kind != "free"]
    if not live:
        return [None] * len(kernels)
    return [i if kernels[i].kind != "free" else next((j for j in live if j > i), live[-1]) for i in range(len(kernels))]


def _carry_quantizes(graph: _Graph, groups: list[tuple[list[int], bool, str | None]], kernels: list[Kernel]) -> list[Kernel]:
    """Each kernel with the elements of the free QuantizeLinear nodes ORT runs before it (`quantize_elements`).

    A Q → DQ pair is free, but its Q runs as a node of its own where nothing before it writes integers (a float
    HardSigmoid's output, a graph input), and an in-context profile charges that node to its `carriers` kernel:
    a QLinearMul after a float HardSigmoid measured 0.50-0.55 ns an element, one after a QLinearConv 0.27-0.30.
    Counted on the same kernel, so that the two can be told apart."""
    carried = [0] * len(kernels)
    for (members, _, _), kernel, carrier in zip(groups, kernels, carriers(kernels)):
        if kernel.kind == "free" and carrier is not None and any(_runs_quantize(graph, graph.nodes[m]) for m in members):
            carried[carrier] += kernel.output_elements
    return [dataclasses.replace(k, quantize_elements=n) if n else k for k, n in zip(kernels, carried)]


def _runs_quantize(graph: _Graph, node: onnx.NodeProto) -> bool:
    """A QuantizeLinear that ORT runs as a node of its own: nothing before it writes integers."""
    return node.op_type == "QuantizeLinear" and node.domain in _ONNX_DOMAINS and not _writes_integers(graph, node)


def node_keys(nodes: list[onnx.NodeProto] | tuple[onnx.NodeProto, ...]) -> tuple[str, ...]:
    """A unique name per node: its own, or `<op>#<index>` when it has none or repeats an earlier one."""
    keys: list[str] = []
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        key = node.name if node.name and node.name not in seen else f"{node.name or node.op_type}#{i}"
        seen.add(key)
        keys.append(key)
    return tuple(keys)


def _index(model: onnx.ModelProto, shapes: Mapping[str, Shape], types: Mapping[str, int],
           rules: FusionRules) -> _Graph:
    folded, values = _folded_constants(model)
    nodes = tuple(model.graph.node)
    producer: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.output:
            if name:
                producer[name] = i
        for name in dict.fromkeys(n for n in node.input if n):
            consumers.setdefault(name, []).append(i)
    return _Graph(
        nodes=nodes,
        keys=node_keys(nodes),
        producer=MappingProxyType(producer),
        consumers=MappingProxyType({k: tuple(v) for k, v in consumers.items()}),
        outputs=frozenset(o.name for o in model.graph.output),
        static=_static_tensors(model),
        shapes=MappingProxyType(dict(shapes)),
        types=MappingProxyType(dict(types)),
        folded=folded,
        values=MappingProxyType(values),
        opset=next((o.version for o in model.opset_import if o.domain in _ONNX_DOMAINS), 0),
        rules=rules,
    )


def _static_tensors(model: onnx.ModelProto) -> frozenset[str]:
    """Tensors known before run time: weights, shapes, and whatever is computed from those alone."""
    static = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        from_shapes = node.op_type in _STATIC_SOURCES and node.domain in _ONNX_DOMAINS
        if from_shapes or all(n in static for n in node.input if n):
            static.update(o for o in node.output if o)
    return frozenset(static)


_MAX_VALUE_ELEMENTS = 64  # the constants patterns compare (scalars, axes, epsilons) are this small


def _folded_constants(model: onnx.ModelProto) -> tuple[frozenset[str], dict[str, np.ndarray]]:
    """The tensors computable from constants alone, and the values of the small ones (weights are not read:
    a large model's external data stays on disk)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
              if t.data_location != onnx.TensorProto.EXTERNAL and math.prod(t.dims) <= _MAX_VALUE_ELEMENTS}
    folded = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in _ONNX_DOMAINS and node.attribute:
            if node.attribute[0].name == "value":
                values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            folded.add(node.output[0])
        elif node.op_type not in _STATIC_SOURCES and node.input and all(n in folded for n in node.input if n):
            folded.update(o for o in node.output if o)
    return frozenset(folded), values


def _is_static_node(graph: _Graph, node: onnx.NodeProto) -> bool:
    return all(o in graph.static for o in node.output if o)


def _is_anchor(node: onnx.NodeProto, rules: FusionRules) -> bool:
    return node.domain in _ONNX_DOMAINS and node.op_type in rules.anchors


def _kind(graph: _Graph, i: int) -> str:
    node = graph.nodes[i]
    if _is_static_node(graph, node) or _is_int8_boundary(graph, node) or _cancels_int8_layout(graph, node):
        return "free"
    if node.domain not in _ONNX_DOMAINS:
        return "other"
    if node.op_type == "Conv":
        groups = _attr(node, "group", 1)
        channels = graph.shapes[node.input[0]][1]
        return "dwconv" if groups == channels > 1 else "conv"
    return _KINDS_BY_OP.get(node.op_type, "other")


def _is_int8_boundary(graph: _Graph, node: onnx.NodeProto) -> bool:
    """A QuantizeLinear → DequantizeLinear pair between kernels: it marks the tensor as int8 and costs
    nothing of its own (ORT fuses it into QLinearConv, QLinearAdd..., or runs it beside a float op, whose
    in-context profile carries it). Under `FusionRules.output_dequantize` not a DequantizeLinear that writes
    a graph output, nor the QuantizeLinear before it unless the op before that writes integers itself."""
    if node.domain not in _ONNX_DOMAINS:
        return False
    if node.op_type == "QuantizeLinear":
        users = graph.consumers.get(node.output[0], ())
        if not users or not all(graph.nodes[u].op_type == "DequantizeLinear" for u in users):
            return False
        return _writes_integers(graph, node) or not any(_dequantizes_output(graph, graph.nodes[u]) for u in users)
    if node.op_type == "DequantizeLinear":
        source = graph.producer.get(node.input[0])
        return source is not None and graph.nodes[source].op_type == "QuantizeLinear" and not _dequantizes_output(graph, node)
    return False


def _writes_integers(graph: _Graph, q: onnx.NodeProto) -> bool:
    """What QuantizeLinear `q` reads is integers already in ORT's graph: a QLinear kernel wrote it, or an op that
    moves integers as they are (`_moves_integers`); then `q` runs no node."""
    source = graph.producer.get(q.input[0])
    return source is not None and (graph.nodes[source].op_type in _QLINEAR_OPS or _moves_integers(graph, graph.nodes[source], q))


def _moves_integers(graph: _Graph, node: onnx.NodeProto, q: onnx.NodeProto) -> bool:
    """`node` moves data (`_INT8_MOVES`, or a chain of such ops) from a DequantizeLinear of `q`'s quantization: ORT
    runs it on the integers and `q` does not run (a profiling network's DQ -> Reshape -> Q -> DQ to a graph output:
    that Q took 0.01 ms for 1.2-2.4 M elements, which the Q regressor took for the cost of quantizing them)."""
    while node.op_type in _INT8_MOVES and node.domain in _ONNX_DOMAINS and not _resizes_in_float(graph, node):
        source = graph.producer.get(node.input[0])
        if source is None:
            return False
        node = graph.nodes[source]
        if node.op_type == "DequantizeLinear":
            return _same_quantization(graph, node, q)
    return False


def _cancels_int8_layout(graph: _Graph, node: onnx.NodeProto) -> bool:
    """Under `FusionRules.int8_channels_last`: a Transpose to NHWC between a DequantizeLinear and
    QuantizeLinears of the same scale and zero point, of what a conv wrote through a Q → DQ pair. ORT runs
    the int8 conv channels-last already: it drops the Q/DQ and the Transpose cancels against the conv's
    own layout transpose (a detector head's conv → Transpose → Reshape: no node)."""
    if not graph.rules.int8_channels_last or node.op_type != "Transpose" or node.domain not in _ONNX_DOMAINS:
        return False
    if list(_attr(node, "perm", [])) != [0, 2, 3, 1]:
        return False
    chain, tensor = [], node.input[0]
    for op in ("DequantizeLinear", "QuantizeLinear", "Conv"):
        i = graph.producer.get(tensor)
        if i is None or graph.nodes[i].op_type != op:
            return False
        chain.append(graph.nodes[i])
        tensor = graph.nodes[i].input[0]
    readers = graph.consumers.get(node.output[0], ())
    return (node.output[0] not in graph.outputs and bool(readers)
            and all(graph.nodes[r].op_type == "QuantizeLinear" and _same_quantization(graph, chain[0], graph.nodes[r])
                    for r in readers))


def _same_quantization(graph: _Graph, dq: onnx.NodeProto, q: onnx.NodeProto) -> bool:
    """Same scale and zero point: the same tensors, or constants of equal value (what ORT compares)."""
    def params(n: onnx.NodeProto) -> list[str]:
        return (list(n.input[1:3]) + ["", ""])[:2]

    return all(a == b or (a in graph.values and b in graph.values and np.array_equal(graph.values[a], graph.values[b]))
               for a, b in zip(params(dq), params(q)))


def _resizes_in_float(graph: _Graph, node: onnx.NodeProto) -> bool:
    """Under `FusionRules.float_linear_resize`: a Resize that interpolates (not nearest) runs in float between
    its DequantizeLinear and QuantizeLinear (ORT CPU's integer Resize is nearest only): a float kernel."""
    mode = _attr(node, "mode", b"nearest")
    return (graph.rules.float_linear_resize and node.op_type == "Resize" and node.domain in _ONNX_DOMAINS
            and (mode.decode() if isinstance(mode, bytes) else mode) != "nearest")


def _dequantizes_output(graph: _Graph, node: onnx.NodeProto) -> bool:
    return graph.rules.output_dequantize and node.output[0] in graph.outputs


# ---- fusion ------------------------------------------------------------------------------------


def _epilogue(graph: _Graph, tensor: str, rules: FusionRules, claimed: set[int]) -> tuple[list[int], bool]:
    """The nodes after the anchor that ride along in its kernel, and whether a residual Add is one of them."""
    absorbed: list[int] = []
    gated = False
    while tensor not in graph.outputs:
        users = graph.consumers.get(tensor, ())
        if any(u in claimed for u in users):
            break
        # `affine_folds`: an affine op rides along where it folds into the weights, nothing but folding ops
        # before it; after a self gate (hard-swish's `/ 6`) as `affine` says
        folding = None if gated else all(graph.nodes[a].op_type in _FOLDING_OPS for a in absorbed)
        if len(users) == 1 and _rides_along(graph, graph.nodes[users[0]], tensor, rules, folding):
            absorbed.append(users[0])
            tensor = graph.nodes[users[0]].output[0]
            continue
        gate = _self_gate(graph, tensor, rules) if rules.self_gate and len(users) == 2 else None
        if gate is not None:
            absorbed += gate
            gated = True
            tensor = graph.nodes[gate[-1]].output[0]
            continue
        if len(users) == 1 and rules.residual_add and _is_residual_add(graph, graph.nodes[users[0]], tensor):
            absorbed.append(users[0])
            return absorbed + (_after_residual(graph, graph.nodes[users[0]].output[0], rules, claimed)
                               if rules.residual_epilogue else []), True
        break
    return absorbed, False


def _after_residual(graph: _Graph, tensor: str, rules: FusionRules, claimed: set[int]) -> list[int]:
    """The unary epilogue ops (an activation) that follow a fused residual Add."""
    chain: list[int] = []
    while tensor not in graph.outputs:
        users = graph.consumers.get(tensor, ())
        if len(users) != 1 or users[0] in claimed:
            break
        node = graph.nodes[users[0]]
        if node.op_type not in rules.epilogue_ops or not _rides_along(graph, node, tensor, rules):
            break
        chain.append(users[0])
        tensor = node.output[0]
    return chain


def _rides_along(graph: _Graph, node: onnx.NodeProto, tensor: str, rules: FusionRules, folding: bool | None = None) -> bool:
    """`node` is a unary op on `tensor` (its other inputs constant) that the rules let fuse. `folding`, in an
    anchor's own chain: whether only ops that fold into its weights came before (`affine_folds` asks it of
    an affine op); None elsewhere (a self gate's inner chain), where `affine` alone decides."""
    if node.domain not in _ONNX_DOMAINS or len([o for o in node.output if o]) != 1:
        return False
    others = [n for n in node.input if n and n != tensor]
    if tensor not in node.input or not all(n in graph.static for n in others):
        return False
    if node.op_type in rules.epilogue_ops or node.op_type in _PASS_THROUGH:
        return node.input[0] == tensor
    if rules.affine_folds and folding is not None:
        return folding and _is_affine(graph, node, tensor)
    return rules.affine and _is_affine(graph, node, tensor)


def _is_affine(graph: _Graph, node: onnx.NodeProto, tensor: str) -> bool:
    """Mul/Add/Sub/Div of `tensor` by a scalar or per-channel constant (c / x is not affine)."""
    if node.op_type not in _AFFINE_OPS or len(node.input) != 2 or node.input[0] == node.input[1]:
        return False
    if node.op_type == "Div" and node.input[0] != tensor:
        return False
    const = node.input[1] if node.input[0] == tensor else node.input[0]
    return _per_channel(graph.shapes[const], graph.shapes[tensor])


def _per_channel(const: Shape, data: Shape) -> bool:
    """`const` broadcasts over `data` along its channel axis only (axis 1, or the only axis of a vector)."""
    if len(const) > len(data):
        return False
    padded = (1,) * (len(data) - len(const)) + tuple(const)
    channel_axis = 1 if len(data) >= 2 else 0
    return all(d == 1 or (axis == channel_axis and d == data[axis]) for axis, d in enumerate(padded))


def _self_gate(graph: _Graph, tensor: str, rules: FusionRules) -> list[int] | None:
    """x · g(x) with g a chain of fusable unary ops (swish, decomposed hard-swish): the chain, then the Mul."""
    users = graph.consumers[tensor]
    muls = [u for u in users if graph.nodes[u].op_type == "Mul" and len(graph.nodes[u].input) == 2]
    for mul in muls:
        gate_input = [n for n in graph.nodes[mul].input if n != tensor]
        if len(gate_input) != 1:
            continue  # x · x is not a gate
        head = next(u for u in users if u != mul)
        chain = _unary_chain(graph, head, tensor, gate_input[0], rules)
        if chain is not None and graph.consumers.get(gate_input[0], ()) == (mul,):
            return chain + [mul]
    return None


def _unary_chain(graph: _Graph, head: int, tensor: str, end: str, rules: FusionRules) -> list[int] | None:
    """The fusable unary ops from `tensor` (starting at node `head`) to `end`, or None if there are others."""
    chain, node, current = [head], graph.nodes[head], tensor
    while True:
        if not _rides_along(graph, node, current, rules):
            return None
        current = node.output[0]
        if current == end:
            return chain
        users = graph.consumers.get(current, ())
        if len(users) != 1 or current in graph.outputs:
            return None
        chain.append(users[0])
        node = graph.nodes[users[0]]


def _is_residual_add(graph: _Graph, node: onnx.NodeProto, tensor: str) -> bool:
    """An Add of `tensor` and another run-time tensor of the same shape."""
    if node.op_type != "Add" or node.domain not in _ONNX_DOMAINS or len(node.input) != 2:
        return False
    other = node.input[1] if node.input[0] == tensor else node.input[0]
    return other != tensor and other not in graph.static and graph.shapes[other] == graph.shapes[tensor]


# ---- patterns: op chains the target runs as one node -------------------------------------------


@dataclass(frozen=True)
class _Match:
    op: str  # what the target runs the chain as
    members: tuple[int, ...]  # in graph order
    optional: frozenset[int] = frozenset()  # members an anchor may have taken already (a bias Add)


def _patterns(graph: _Graph, rules: FusionRules) -> dict[int, _Match]:
    """Every chain of `rules.patterns` in the graph, by each of its nodes; a node joins one chain at most.

    The chains are those ONNX Runtime (1.32) fuses, with its conditions: intermediate tensors read by the
    chain alone, the constants it checks (√2, 1, 0.5, exponent 2) and weights that fold to constants
    (a LayerNorm scale reshaped by a Shape it computes at run time stays unfused)."""
    matchers = (("Gelu", _gelu), ("LayerNormalization", _layer_norm), ("QuickGelu", _quick_gelu),
                ("SimplifiedLayerNormalization", _simplified_layer_norm))
    found: dict[int, _Match] = {}
    for tensor in graph.consumers:
        if tensor in graph.static:
            continue
        for op, matcher in matchers:
            match = matcher(graph, tensor) if op in rules.patterns else None
            if match is not None and not any(m in found for m in match.members):
                found.update(dict.fromkeys(match.members, match))
    return found


def _node_is(graph: _Graph, i: int, op: str) -> bool:
    return graph.nodes[i].op_type == op and graph.nodes[i].domain in _ONNX_DOMAINS


def _only_user(graph: _Graph, tensor: str, op: str) -> int | None:
    """The one consumer of `tensor` if it is an `op` node and `tensor` is no graph output."""
    users = graph.consumers.get(tensor, ())
    return users[0] if len(users) == 1 and tensor not in graph.outputs and _node_is(graph, users[0], op) else None


def _out(graph: _Graph, i: int) -> str:
    return graph.nodes[i].output[0]


def _operand(graph: _Graph, i: int, tensor: str) -> str | None:
    """The other input of binary node `i`, one of whose inputs is `tensor`."""
    inputs = list(graph.nodes[i].input)
    if len(inputs) != 2 or tensor not in inputs:
        return None
    return inputs[1] if inputs[0] == tensor else inputs[0]


def _constant_is(graph: _Graph, tensor: str | None, value: float, tolerance: float = 1e-3) -> bool:
    array = graph.values.get(tensor) if tensor else None
    return array is not None and array.size >= 1 and bool(np.allclose(array, value, rtol=tolerance, atol=0))


def _gelu(graph: _Graph, x: str) -> _Match | None:
    """x·0.5·(1 + erf(x/√2)), in both of ORT's orders: Div(x, √2) → Erf → Add(1) → Mul(x, ·) → Mul(0.5),
    or the same Add times Mul(x, 0.5) (ORT 1.32 leaves x · (1/√2) in place of the Div unfused). A bias Add
    (a constant vector along the last axis) writing x for the chain alone joins it, as ORT's BiasGelu."""
    for scale in graph.consumers.get(x, ()):
        if not _node_is(graph, scale, "Div") or graph.nodes[scale].input[0] != x or \
                not _constant_is(graph, graph.nodes[scale].input[1], math.sqrt(2)):
            continue
        erf = _only_user(graph, _out(graph, scale), "Erf")
        one = erf is not None and _only_user(graph, _out(graph, erf), "Add")
        if not one or not _constant_is(graph, _operand(graph, one, _out(graph, erf)), 1.0):
            continue
        product = _only_user(graph, _out(graph, one), "Mul")
        other = product is not None and _operand(graph, product, _out(graph, one))
        if other == x:  # (x · (1 + erf)) · 0.5
            half = _only_user(graph, _out(graph, product), "Mul")
            if half is None or not _constant_is(graph, _operand(graph, half, _out(graph, product)), 0.5):
                continue
            members = [scale, erf, one, product, half]
        elif other and graph.producer.get(other) is not None:  # (x · 0.5) · (1 + erf)
            half = graph.producer[other]
            if (not _node_is(graph, half, "Mul") or _only_user(graph, other, "Mul") != product
                    or not _constant_is(graph, _operand(graph, half, x), 0.5)):
                continue
            members = [half, scale, erf, one, product]
        else:
            continue
        bias = _bias_add(graph, x, members)
        return _Match("Gelu", tuple(sorted(members + ([bias] if bias is not None else []))),
                      frozenset({bias}) if bias is not None else frozenset())
    return None


def _bias_add(graph: _Graph, x: str, chain: list[int]) -> int | None:
    """The Add of a constant vector along the last axis that writes `x`, read by `chain` alone."""
    add = graph.producer.get(x)
    if add is None or not _node_is(graph, add, "Add") or x in graph.outputs:
        return None
    if not set(graph.consumers.get(x, ())) <= set(chain):
        return None
    bias = [n for n in graph.nodes[add].input if n in graph.folded]
    return add if len(bias) == 1 and graph.shapes.get(bias[0]) == (graph.shapes[x][-1],) else None


def _reduces_last_axis(graph: _Graph, i: int, tensor: str) -> bool:
    node = graph.nodes[i]
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1] in graph.values:
        axes = graph.values[node.input[1]].ravel().tolist()
    rank = len(graph.shapes[tensor])
    return axes is not None and [a % rank for a in axes] == [rank - 1] and _attr(node, "keepdims", 1) == 1


def _layer_norm(graph: _Graph, x: str) -> _Match | None:
    """ReduceMean(x) → Sub(x, mean) → [Pow(2) → ReduceMean → Add(eps) → Sqrt → Div(x − mean, ·)] →
    Mul(scale) → Add(shift), both means over the last axis, scale and shift constants. (ORT's transpose
    optimizer sometimes moves a Transpose before x past the mean and the subtraction first, and then fuses
    only the part from Pow on: PP-OCRv5's recogniser, one LayerNorm of five.)"""
    for mean in graph.consumers.get(x, ()):
        if not _node_is(graph, mean, "ReduceMean") or not _reduces_last_axis(graph, mean, x):
            continue
        sub = _only_user(graph, _out(graph, mean), "Sub")
        if sub is None or list(graph.nodes[sub].input) != [x, _out(graph, mean)]:
            continue
        normalized = _over_rms(graph, _out(graph, sub))
        scale = normalized is not None and _only_user(graph, _out(graph, normalized[-1]), "Mul")
        shift = scale and _only_user(graph, _out(graph, scale), "Add")
        if shift and _operand(graph, scale, _out(graph, normalized[-1])) in graph.folded and \
                _operand(graph, shift, _out(graph, scale)) in graph.folded:
            return _Match("LayerNormalization", tuple(sorted([mean, sub, *normalized, scale, shift])))
    return None


def _simplified_layer_norm(graph: _Graph, x: str) -> _Match | None:
    """[x over its root mean square] → Mul(scale): RMSNorm, ORT's SimplifiedLayerNormalization."""
    normalized = _over_rms(graph, x)
    scale = normalized is not None and _only_user(graph, _out(graph, normalized[-1]), "Mul")
    if scale and _operand(graph, scale, _out(graph, normalized[-1])) in graph.folded:
        return _Match("SimplifiedLayerNormalization", tuple(sorted([*normalized, scale])))
    return None


def _over_rms(graph: _Graph, x: str) -> list[int] | None:
    """Pow(x, 2) → ReduceMean (last axis) → Add(eps) → Sqrt → Div(x, ·), x read by Pow and Div alone;
    the nodes, the Div last."""
    users = graph.consumers.get(x, ())
    square = next((u for u in users if _node_is(graph, u, "Pow")), None)
    divide = next((u for u in users if _node_is(graph, u, "Div")), None)
    if len(users) != 2 or square is None or divide is None or x in graph.outputs:
        return None
    if graph.nodes[square].input[0] != x or not _constant_is(graph, graph.nodes[square].input[1], 2.0):
        return None
    variance = _only_user(graph, _out(graph, square), "ReduceMean")
    if variance is None or not _reduces_last_axis(graph, variance, _out(graph, square)):
        return None
    eps = _only_user(graph, _out(graph, variance), "Add")
    root = eps is not None and _only_user(graph, _out(graph, eps), "Sqrt")
    if not root or _operand(graph, eps, _out(graph, variance)) not in graph.values:
        return None
    if list(graph.nodes[divide].input) != [x, _out(graph, root)]:
        return None
    return [square, variance, eps, root, divide]


def _quick_gelu(graph: _Graph, x: str) -> _Match | None:
    """x · Sigmoid(x) (SiLU, swish), or x · Sigmoid(α·x): ORT's QuickGelu."""
    for head in graph.consumers.get(x, ()):
        chain = [head]
        if _node_is(graph, head, "Mul") and _operand(graph, head, x) in graph.values:
            sigmoid = _only_user(graph, _out(graph, head), "Sigmoid")
            chain += [sigmoid] if sigmoid is not None else []
        if not _node_is(graph, chain[-1], "Sigmoid") or graph.nodes[chain[-1]].input[0] != (_out(graph, head) if len(chain) > 1 else x):
            continue
        gate = _only_user(graph, _out(graph, chain[-1]), "Mul")
        if gate is not None and _operand(graph, gate, _out(graph, chain[-1])) == x:
            return _Match("QuickGelu", tuple(sorted(chain + [gate])))
    return None


# ---- features ----------------------------------------------------------------------------------


def _make_kernel(graph: _Graph, members: list[int], residual: bool, pattern: str | None = None) -> Kernel:
    """One kernel of `members`; a `pattern` chain is named, kinded and featured as the op it runs as."""
    member_set = set(members)
    tensors_in = [n for i in members for n in graph.nodes[i].input if n]
    activations = list(dict.fromkeys(
        n for n in tensors_in if n not in graph.static and graph.producer.get(n) not in member_set
    ))
    weights = list(dict.fromkeys(n for n in tensors_in if n in graph.static))
    produced = [o for i in members for o in graph.nodes[i].output if o]
    leaving = [
        o for o in produced if o in graph.outputs or any(c not in member_set for c in graph.consumers.get(o, ()))
    ]
    head = graph.nodes[members[0]]
    kind = _kind(graph, members[0]) if pattern is None else _KINDS_BY_OP.get(pattern, "other")
    moved = activations + leaving + ([] if kind == "free" else weights)
    sizes = [(math.prod(graph.shapes[n]), _stored_itemsize(graph, n)) for n in moved]
    return Kernel(
        name=graph.keys[members[0]],
        op=head.op_type if pattern is None else pattern,
        kind=kind,
        nodes=tuple(graph.keys[i] for i in members),
        ops=tuple(graph.nodes[i].op_type for i in members),
        input_shapes=tuple(graph.shapes[n] for n in activations),
        output_shapes=tuple(graph.shapes[n] for n in leaving),
        input_elements=sum(math.prod(graph.shapes[n]) for n in activations),
        weight_elements=0 if kind == "free" else sum(math.prod(graph.shapes[n]) for n in weights),
        output_elements=sum(math.prod(graph.shapes[n]) for n in leaving),
        residual=residual,
        int8=kind != "free" and any(graph.nodes[graph.producer[n]].op_type == "DequantizeLinear"
                                    for n in activations if n in graph.producer) and not _resizes_in_float(graph, head),
        float_elements=sum(count for count, size in sizes if size is None),
        fixed_bytes=sum(count * size for count, size in sizes if size is not None),
        **(_head_features(graph, head, kind) if pattern is None else
           {"c_in": _channels(graph.shapes[activations[0]]) if activations else 1,
            "c_out": _channels(graph.shapes[leaving[0]]) if leaving else 1}),
    )


def _stored_itemsize(graph: _Graph, tensor: str) -> int | None:
    """Bytes per element `tensor` crosses memory with; None for float32 (the target's bytes per element).

    The integer tensor of a Q → DQ boundary is what is stored: a DequantizeLinear's output counts as its
    input, a tensor read only by QuantizeLinear nodes as their output (int8/uint8 1 byte, uint16 2)."""
    producer = graph.producer.get(tensor)
    users = graph.consumers.get(tensor, ())
    if producer is not None and graph.nodes[producer].op_type == "DequantizeLinear":
        tensor = graph.nodes[producer].input[0]
    elif users and tensor not in graph.outputs and all(graph.nodes[u].op_type == "QuantizeLinear" for u in users):
        tensor = graph.nodes[users[0]].output[0]
    elem_type = graph.types.get(tensor)
    if not elem_type or elem_type == onnx.TensorProto.FLOAT:
        return None
    return helper.tensor_dtype_to_np_dtype(elem_type).itemsize


def _head_features(graph: _Graph, node: onnx.NodeProto, kind: str) -> dict:
    """Layer hyper-parameters, MACs and GEMM view of the kernel's first node."""
    if kind in ("conv", "dwconv", "deconv"):
        return _conv_features(graph, node, transposed=kind == "deconv")
    if node.op_type == "Gemm" and kind == "gemm":
        return _gemm_features(graph, node)
    if node.op_type == "MatMul" and kind == "gemm":
        return _matmul_features(graph, node)
    if node.op_type in _RECURRENT_GATES:
        return _recurrent_features(graph, node)
    data_in = graph.shapes[node.input[0]] if node.input and node.input[0] else ()
    data_out = graph.shapes[node.output[0]]
    features = {"c_in": _channels(data_in), "c_out": _channels(data_out)}
    if kind == "pool":
        features.update(_pool_features(node, data_in, data_out))
    if node.op_type in ("Resize", "Upsample"):
        features["interpolation"] = interpolation_of(node)
    if node.op_type in _SOFTMAX_OPS and data_in and graph.opset >= 13:
        # before opset 13 Softmax normalizes the flattened axes from `axis` on: the innermost, always
        axis = _attr(node, "axis", -1) % len(data_in)
        features["inner"] = math.prod(data_in[axis + 1:])
    return features


def _conv_features(graph: _Graph, node: onnx.NodeProto, transposed: bool) -> dict:
    x, w, y = (graph.shapes[n] for n in (node.input[0], node.input[1], node.output[0]))
    groups = _attr(node, "group", 1)
    window = w[2:]
    c_in, c_out = x[1], y[1]
    strides = _attr(node, "strides", [1] * len(window))
    dilations = _attr(node, "dilations", [1] * len(window))
    # MACs as hwnas.graph.flops counts them; a ConvTranspose's GEMM runs over the zero-stuffed input.
    macs = math.prod(x if transposed else y) * math.prod(w[1:])
    return {
        "c_in": c_in,
        "c_out": c_out,
        "kernel_h": _dim(window, 0),
        "kernel_w": _dim(window, 1),
        "stride_h": _dim(strides, 0),
        "stride_w": _dim(strides, 1),
        "dilation_h": _dim(dilations, 0),
        "dilation_w": _dim(dilations, 1),
        "groups": groups,
        "macs": macs,
        "gemm": GemmShape(
            p=y[0] * math.prod(y[2:]), k=(c_in // groups) * math.prod(window), n=c_out // groups, groups=groups
        ),
    }


def _gemm_features(graph: _Graph, node: onnx.NodeProto) -> dict:
    a, b = graph.shapes[node.input[0]], graph.shapes[node.input[1]]
    p, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
    n = b[0] if _attr(node, "transB", 0) else b[1]
    return {"c_in": k, "c_out": n, "macs": p * k * n, "gemm": GemmShape(p=p, k=k, n=n)}


def _recurrent_features(graph: _Graph, node: onnx.NodeProto) -> dict:
    """An LSTM/GRU/RNN as what it computes: per time step and direction, one product of the batch's
    [x_t, h_t-1] (K = input + hidden) by the gate weights (N = gates × hidden), the steps one after
    another (`groups`, as a batched MatMul's). Counted as 0 MACs before, so costed as a cheap elementwise op."""
    x, w = graph.shapes[node.input[0]], graph.shapes[node.input[1]]
    hidden = _attr(node, "hidden_size", w[1] // _RECURRENT_GATES[node.op_type])
    steps, batch = (x[1], x[0]) if _attr(node, "layout", 0) else (x[0], x[1])
    k, n = x[-1] + hidden, _RECURRENT_GATES[node.op_type] * hidden
    gemm = GemmShape(p=batch, k=k, n=n, groups=steps * w[0])
    return {"c_in": x[-1], "c_out": hidden, "macs": gemm.groups * batch * k * n, "gemm": gemm}


def _matmul_features(graph: _Graph, node: onnx.NodeProto) -> dict:
    a, b, y = (graph.shapes[n] for n in (node.input[0], node.input[1], node.output[0]))
    k = a[-1]
    n = b[-1] if len(b) >= 2 else 1
    if len(b) <= 2:  # one weight matrix: every row of A streams through it
        gemm = GemmShape(p=math.prod(a[:-1]), k=k, n=n)
    else:
        gemm = GemmShape(p=a[-2] if len(a) >= 2 else 1, k=k, n=n, groups=math.prod(y[:-2]))
    return {"c_in": k, "c_out": n, "macs": math.prod(y) * k, "gemm": gemm}


def interpolation_of(node: onnx.NodeProto) -> str:
    """A Resize's (an Upsample's: asymmetric coordinates) `mode:coordinate_transformation_mode[:nearest_mode]`,
    the attributes' defaults filled in."""
    def text(name: str, default: str) -> str:
        value = _attr(node, name, default)
        return value.decode() if isinstance(value, bytes) else str(value)

    mode = text("mode", "nearest")
    coordinates = "asymmetric" if node.op_type == "Upsample" else text("coordinate_transformation_mode", "half_pixel")
    if mode != "nearest":
        return f"{mode}:{coordinates}"
    nearest = "floor" if node.op_type == "Upsample" else text("nearest_mode", "round_prefer_floor")
    return f"{mode}:{coordinates}:{nearest}"


def _pool_features(node: onnx.NodeProto, data_in: Shape, data_out: Shape) -> dict:
    window = _attr(node, "kernel_shape", None)
    if window is None:  # global pools and reductions read everything that folds into one output
        return {"window": max(1, math.prod(data_in) // max(1, math.prod(data_out)))}
    strides = _attr(node, "strides", [1] * len(window))
    return {
        "window": math.prod(window),
        "kernel_h": _dim(window, 0),
        "kernel_w": _dim(window, 1),
        "stride_h": _dim(strides, 0),
        "stride_w": _dim(strides, 1),
    }


def _channels(shape: Shape) -> int:
    if not shape:
        return 1
    return shape[1] if len(shape) >= 2 else shape[0]


def _dim(values, i: int) -> int:
    return int(values[i]) if len(values) > i else 1


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def denormal_uses(model: onnx.ModelProto, kernels: Sequence[Kernel], lanes: int = 16) -> dict[str, int]:
    """By kernel name, the vector multiply-adds that read a denormal (subnormal) weight, where any.

    A CPU without denormals-are-zero set (ORT sets it on its pool threads only, never on the caller thread a
    1-thread session runs on) takes a microcode assist for each such instruction (`hwnas.estimator.denormal`
    prices one). ORT's CPU kernels hold `lanes` output channels of a weight in one vector (MLAS's packed GEMM
    panels and NCHWc blocks alike) and read each such vector at every output row of the kernel's GEMM view
    where its tap lands inside the input: the count is the weight vectors holding a denormal times those
    reads. Weights stored outside the file are not read."""
    heads = {kernel.name: kernel for kernel in kernels if kernel.gemm is not None and kernel.kind in ("conv", "dwconv", "gemm")}
    if not heads:
        return {}
    constants = {t.name: t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    constants.update({n.output[0]: value for n in model.graph.node
                      if n.op_type == "Constant" and (value := constant_node_value(n)) is not None})
    keys = node_keys(model.graph.node)
    by_key = dict(zip(keys, model.graph.node))
    uses = {}
    for key, node in zip(keys, model.graph.node):
        kernel = heads.get(key)
        if kernel is None or len(node.input) < 2 or node.input[1] not in constants:
            continue
        weight = numpy_helper.to_array(constants[node.input[1]])
        if weight.dtype.kind != "f" or weight.ndim < 2:
            continue
        if kernel.ops[1:2] == ("BatchNormalization",) and node.op_type == "Conv":
            # ORT folds the batch norm into the weights before it runs them (PP-OCRv3 det: denormals scaled normal)
            weight = _bn_folded(by_key[kernel.nodes[1]], weight, constants)
        denormal = denormal_mask(weight)
        if not denormal.any():
            continue
        if node.op_type == "Conv":
            # a tap is read only at the outputs where it lands inside the input: ORT's blocked convs skip the
            # padding (PP-OCRv3 rec's 3x3 convs over a 1-row map, 2/3 of their weights denormal, cost nothing)
            by_output = denormal.reshape(*denormal.shape[:2], -1)
            reads = _tap_reads(node, kernel.input_shapes[0], kernel.output_shapes[0], denormal.shape[2:])
        else:  # a MatMul's (K, N) or a Gemm's B, output channels first; every vector read at each of the P rows
            by_output = (denormal if _attr(node, "transB", 0) else denormal.reshape(-1, denormal.shape[-1]).T)[:, :, None]
            reads = np.full(1, kernel.gemm.p)
        padded = np.pad(by_output, [(0, -by_output.shape[0] % lanes), (0, 0), (0, 0)])  # to whole vectors
        vectors_per_tap = padded.reshape(-1, lanes, *by_output.shape[1:]).any(axis=1).sum(axis=(0, 1))
        if count := int(vectors_per_tap @ reads):
            uses[kernel.name] = count
    return uses


def _tap_reads(node: onnx.NodeProto, data_in: Shape, data_out: Shape, window: tuple[int, ...]) -> np.ndarray:
    """For each tap of a conv window (flattened), the output positions at which it reads inside the input."""
    spatial = len(window)
    strides = _attr(node, "strides", [1] * spatial)
    dilations = _attr(node, "dilations", [1] * spatial)
    pads = _attr(node, "pads", [0] * 2 * spatial)
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    per_axis = []
    for axis in range(spatial):
        size_in, size_out, k = data_in[2 + axis], data_out[2 + axis], window[axis]
        automatic = auto_pads(auto_pad, size_in, k, strides[axis], dilations[axis])
        begin = pads[axis] if automatic is None else automatic[0]
        at = np.arange(size_out)[:, None] * strides[axis] - begin + np.arange(k)[None, :] * dilations[axis]
        per_axis.append(((at >= 0) & (at < size_in)).sum(axis=0))
    reads = np.array(data_out[0])  # every image of the batch
    for counts in per_axis:
        reads = np.multiply.outer(reads, counts)
    return reads.reshape(-1)


def _bn_folded(bn: onnx.NodeProto, weight: np.ndarray, constants: Mapping[str, onnx.TensorProto]) -> np.ndarray:
    """Conv weights times the batch norm's per-channel scale, in the weights' precision as ORT folds them."""
    if len(bn.input) < 5:
        return weight
    gamma_name, var_name = bn.input[1], bn.input[4]
    if gamma_name not in constants or var_name not in constants:
        return weight
    gamma, var = (numpy_helper.to_array(constants[name]).astype(weight.dtype) for name in (gamma_name, var_name))
    scale = gamma / np.sqrt(var + weight.dtype.type(_attr(bn, "epsilon", 1e-5)))
    return weight * scale.reshape(-1, *[1] * (weight.ndim - 1))

"""Channel groups: which tensors' channel axes must change together (NCHW: axis 1, also of [N, C]).

A *group* is a set of activation tensors whose channel counts must stay equal: give one of them more
channels and every other must get the same channels, or the graph is no longer valid. For each group:

- producers: Conv / ConvTranspose / Gemm / MatMul whose outputs define the channels (their weight's
  output axis and their bias are indexed by the group's channels);
- consumers: the same ops reading the group (their weight's input axis);
- pass-through nodes, which keep channel c in channel c: elementwise activations, BatchNormalization
  (its parameters are per channel), Add/Mul/Sub/Div/PRelu with a constant (per channel or scalar),
  Add/Mul of two activations (a residual Add, an SE block's x · gate[N, C, 1, 1]: both inputs and the
  output are one group), depthwise Conv (group == C; its weight and bias are indexed on axis 0),
  pools, spatial reductions (ReduceMean over H, W) and Pad, Resize, and a classifier tail's
  Flatten/Reshape/Squeeze of [N, C, 1, 1] to [N, C];
- params: every constant indexed by the group's channels: node, input, axis, and the value a new channel
  takes there so that the op stays exact (`fill`; hwnas/passes/align_channels.py says why these values);
- segments: the channel layout. A plain group has one segment, itself.

Concat along channels: the output's channels are its inputs' channels one after another. Its group is
a *concatenated* group whose segments are the inputs' groups in order (a nested concat's segments are
flattened in). Giving input group g k more channels adds k channels at the end of g's segment, which
is in the middle of the concat output; every param of the concatenated group (the input axis of a
consumer of the concat, a BN after it) gets its new entries at those same positions. A concatenated
group changes only through its segments; when it is blocked, every group in its segments is blocked.
A Concat along another axis keeps channels: its inputs and output are one group.

Blocked, with a reason naming the op: groups holding a graph input or output (the signature must not
change); anything read or written by an op not listed above (Transpose, Split, Slice, Gather, Shape,
Softmax, ...) or used in a way the handler does not accept (grouped non-depthwise Conv, a constant or
computed shape whose channel axis cannot be identified, a Div by an activation, a broadcast along
channels). The analysis never guesses: anything it does not understand blocks.

"Activations" are tensors computed from the graph inputs; tensors computed from constants alone (a
Reshape of an initializer, as Paddle exports write biases) are "computed constants": a per-channel one
blocks its group until `fold-constants` has turned it into an initializer. Tensors of rank < 2 (shape
arithmetic) have no channel axis and belong to no group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np
import onnx_graphsurgeon as gs

from hwnas.graph.gsgraph import const_value
from hwnas.graph.shapes import Shape

CHANNEL_AXIS = 1


@dataclass(frozen=True)
class ChannelParam:
    """A constant indexed by a group's channels: input `input` of node `node`, along `axis`.

    With `shape_vector` the constant is a shape (a Reshape target, Resize sizes) whose element `axis`
    is the channel count itself.
    """

    node: str
    input: int
    axis: int
    fill: float = 0.0
    shape_vector: bool = False


@dataclass(frozen=True)
class Segment:
    group: int  # id of the plain group whose channels these are
    channels: int


@dataclass(frozen=True)
class ChannelGroup:
    """Tensors whose channel counts change together, and every constant indexed by those channels.

    `segments` is the channel layout: the group itself for a plain group, its concat's inputs' groups
    for a concatenated one, empty where the layout cannot be known (such a group is blocked).
    """

    id: int
    channels: int
    members: tuple[str, ...]  # tensor names; the channel axis is CHANNEL_AXIS
    producers: tuple[str, ...]  # node labels (see node_labels)
    consumers: tuple[str, ...]
    passthrough: tuple[str, ...]
    params: tuple[ChannelParam, ...]
    segments: tuple[Segment, ...]
    blocked_reason: str | None = None

    @property
    def blocked(self) -> bool:
        return self.blocked_reason is not None

    @property
    def concatenated(self) -> bool:
        return self.segments != (Segment(self.id, self.channels),)


def node_labels(graph: gs.Graph) -> dict[str, gs.Node]:
    """Label → node: the node's name, or `op#index` where the name is empty or not unique."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        counts[node.name] = counts.get(node.name, 0) + 1
    return {
        (node.name if node.name and counts[node.name] == 1 else f"{node.op}#{i}"): node
        for i, node in enumerate(graph.nodes)
    }


# -- what one node says ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeChannels:
    """One node's view: tensors it couples into one group, how it touches groups, what it blocks."""

    links: tuple[str, ...] = ()  # tensors of one group (a pass-through node)
    produces: tuple[str, ...] = ()
    consumes: tuple[str, ...] = ()
    params: tuple[tuple[str, ChannelParam], ...] = ()  # (tensor whose group indexes it, param)
    blocks: tuple[tuple[str, str], ...] = ()  # (tensor, why)
    concat: tuple[str, tuple[str, ...]] | None = None  # (output, inputs) of a channel concat


@dataclass(frozen=True)
class View:
    """What handlers may ask about a node's tensors."""

    shapes: Mapping[str, Shape]
    activations: frozenset[str]
    graph_outputs: frozenset[str]
    opset: int  # of the default domain
    label: str  # of the node being handled

    def is_activation(self, tensor: gs.Tensor) -> bool:
        return tensor.name in self.activations

    def shape(self, tensor: gs.Tensor) -> Shape:
        return tuple(self.shapes[tensor.name])

    def channels(self, tensor: gs.Tensor) -> int:
        return self.shape(tensor)[CHANNEL_AXIS]

    def param(self, input: int, axis: int, fill: float = 0.0, shape_vector: bool = False) -> ChannelParam:
        return ChannelParam(self.label, input, axis, fill, shape_vector)


Handler = Callable[[gs.Node, View], NodeChannels]


def _activations_of(node: gs.Node, view: View) -> list[gs.Tensor]:
    return [t for t in [*node.inputs, *node.outputs] if view.is_activation(t)]


def _block(node: gs.Node, view: View, why: str) -> NodeChannels:
    return NodeChannels(blocks=tuple((t.name, why) for t in _activations_of(node, view)))


def _subgraph_reads(node: gs.Node) -> set[str]:
    """Names the node's subgraphs (If, Loop, Scan bodies) read, among them enclosing-scope tensors."""
    names: set[str] = set()
    for value in node.attrs.values():
        for graph in value if isinstance(value, list) else [value]:
            if isinstance(graph, gs.Graph):
                for inner in graph.nodes:
                    names.update(t.name for t in inner.inputs)
                    names.update(_subgraph_reads(inner))
    return names


def _unknown(node: gs.Node, view: View) -> NodeChannels:
    why = "is not understood by the channel analysis"
    implicit = sorted(n for n in _subgraph_reads(node) if n in view.activations)
    return NodeChannels(blocks=tuple((t, why) for t in [*(t.name for t in _activations_of(node, view)), *implicit]))


def _extra_outputs_used(node: gs.Node, view: View) -> bool:
    return any(t.outputs or t.name in view.graph_outputs for t in node.outputs[1:])


def _unary(node: gs.Node, view: View) -> NodeChannels:
    """y[c] = f(x[c]); other inputs (Clip bounds, Dropout ratio) are scalars by the operator's spec."""
    x, y = node.inputs[0], node.outputs[0]
    if not view.is_activation(x) or any(view.is_activation(t) for t in node.inputs[1:]):
        return _block(node, view, "has activation inputs other than its first")
    if _extra_outputs_used(node, view):
        return _block(node, view, "has a second output in use")
    return NodeChannels(links=(x.name, y.name))


def _per_channel_constants(fills: tuple[float, ...]) -> Handler:
    """BatchNormalization, InstanceNormalization: inputs 1.. are [C] constants; `fills` per input."""

    def handler(node: gs.Node, view: View) -> NodeChannels:
        if node.attrs.get("training_mode", 0) or _extra_outputs_used(node, view):
            return _block(node, view, "is in training mode")
        x, y = node.inputs[0], node.outputs[0]
        channels = view.channels(x)
        params = []
        for index, fill in enumerate(fills, start=1):
            value = const_value(node.inputs[index])
            if value is None or value.shape != (channels,):
                why = f"parameter {node.inputs[index].name} is not a constant of shape [{channels}]"
                return _block(node, view, why)
            params.append((y.name, view.param(index, 0, fill)))
        return NodeChannels(links=(x.name, y.name), params=tuple(params))

    return handler


def _constant_channel_axis(constant_shape: Shape, out_rank: int) -> int | None:
    """Axis of a constant that lines up with the channel axis under numpy broadcasting, if any."""
    axis = CHANNEL_AXIS - out_rank + len(constant_shape)
    return axis if axis >= 0 else None


def _elementwise(node: gs.Node, view: View) -> NodeChannels:
    """Add, Sub, Mul, Div, Max, Min, Sum, Mean, PRelu: activations with the output's channels couple;
    constants are the same for every channel or indexed by channels."""
    y = node.outputs[0]
    rank, channels = len(view.shape(y)), view.channels(y)
    links, params, blocks = [y.name], [], []
    for index, t in enumerate(node.inputs):
        shape = view.shape(t)
        if view.is_activation(t):
            if node.op == "Div" and index == 1:
                return _block(node, view, "divides by an activation (a new channel could divide by zero)")
            if len(shape) != rank:
                return _block(node, view, f"broadcasts {t.name} {list(shape)} to rank {rank}")
            if shape[CHANNEL_AXIS] == channels:
                links.append(t.name)
            elif shape[CHANNEL_AXIS] == 1:
                blocks.append((t.name, f"broadcasts {t.name} along channels"))
            else:
                return _block(node, view, "has inputs with different channel counts")
            continue
        axis = _constant_channel_axis(shape, rank)
        if axis is None or shape[axis] == 1:
            continue  # the same value for every channel: a new channel gets it too
        if shape[axis] != channels:
            return _block(node, view, f"constant {t.name} {list(shape)} has no axis matching {channels} channels")
        if const_value(t) is None:
            return _block(node, view, f"per-channel {t.name} is computed at run time (run fold-constants first)")
        fill = 1.0 if node.op == "Div" else 0.0  # a constant divisor (index 1): a new channel divides by 1, never 0
        params.append((y.name, view.param(index, axis, fill)))
    return NodeChannels(links=tuple(links), params=tuple(params), blocks=tuple(blocks))


def _weight(node: gs.Node, index: int) -> np.ndarray | None:
    return const_value(node.inputs[index]) if len(node.inputs) > index else None


def _constant_weights(node: gs.Node) -> bool:
    """The weight (input 1) and the bias (input 2, where given) are constants."""
    return all(const_value(t) is not None for t in node.inputs[1:3] if t.name)


def _bias_params(node: gs.Node, view: View, index: int) -> tuple[tuple[str, ChannelParam], ...]:
    has_bias = len(node.inputs) > index and node.inputs[index].name
    return ((node.outputs[0].name, view.param(index, 0)),) if has_bias else ()


def _conv(node: gs.Node, view: View) -> NodeChannels:
    """Dense Conv: consumer of x (weight axis 1), producer of y (weight axis 0, bias). Depthwise Conv
    (group == C_in == C_out): pass-through, weight and bias indexed on axis 0."""
    x, y = node.inputs[0], node.outputs[0]
    if not _constant_weights(node):
        return _block(node, view, "has a weight or bias that is not a constant")
    group = node.attrs.get("group", 1)
    if group == 1:
        return NodeChannels(
            produces=(y.name,),
            consumes=(x.name,),
            params=((x.name, view.param(1, 1)), (y.name, view.param(1, 0)), *_bias_params(node, view, 2)),
        )
    if group == view.channels(x) == view.channels(y):
        return NodeChannels(links=(x.name, y.name), params=((y.name, view.param(1, 0)), *_bias_params(node, view, 2)))
    counts = f"{view.channels(x)} → {view.channels(y)} channels"
    return _block(node, view, f"is a grouped conv (group {group}, {counts}), not depthwise")


def _conv_transpose(node: gs.Node, view: View) -> NodeChannels:
    """ConvTranspose with group 1: weight [C_in, C_out, k, k]."""
    x, y = node.inputs[0], node.outputs[0]
    if node.attrs.get("group", 1) != 1:
        return _block(node, view, "is a grouped ConvTranspose")
    if not _constant_weights(node):
        return _block(node, view, "has a weight or bias that is not a constant")
    return NodeChannels(
        produces=(y.name,),
        consumes=(x.name,),
        params=((x.name, view.param(1, 0)), (y.name, view.param(1, 1)), *_bias_params(node, view, 2)),
    )


def _gemm(node: gs.Node, view: View) -> NodeChannels:
    """Y[N, M] = A[N, K] · B (B is [K, M], or [M, K] with transB) + C."""
    a, y = node.inputs[0], node.outputs[0]
    if node.attrs.get("transA", 0) or not _constant_weights(node):
        return _block(node, view, "has transA or a weight or bias that is not a constant")
    trans_b = node.attrs.get("transB", 0)
    params = [(a.name, view.param(1, 1 if trans_b else 0)), (y.name, view.param(1, 0 if trans_b else 1))]
    bias = _weight(node, 2)
    if bias is not None and bias.ndim and bias.shape[-1] == view.channels(y) != 1:
        params.append((y.name, view.param(2, bias.ndim - 1)))  # a bias of one column broadcasts: nothing to pad
    return NodeChannels(produces=(y.name,), consumes=(a.name,), params=tuple(params))


def _matmul(node: gs.Node, view: View) -> NodeChannels:
    """Y[N, M] = A[N, K] · B[K, M] with B constant; other forms (batched, weight first) block."""
    a, y = node.inputs[0], node.outputs[0]
    weight = _weight(node, 1)
    if not view.is_activation(a) or weight is None or weight.ndim != 2 or len(view.shape(a)) != 2:
        return _block(node, view, "is not an [N, K] activation times a constant [K, M] matrix")
    return NodeChannels(
        produces=(y.name,), consumes=(a.name,), params=((a.name, view.param(1, 0)), (y.name, view.param(1, 1)))
    )


def _resize(node: gs.Node, view: View) -> NodeChannels:
    """Resize resamples each channel on its own: scales must keep the channel axis (1); sizes name
    the channel count, so they are rewritten with it. Opset 10 has (X, scales); later (X, roi, scales, sizes)."""
    x, y = node.inputs[0], node.outputs[0]
    if node.attrs.get("axes") is not None or node.attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        return _block(node, view, "has axes or a region of interest")
    scales_at, sizes_at = (1, None) if view.opset < 11 else (2, 3)
    params = []
    for index in (scales_at, sizes_at):
        if index is None or len(node.inputs) <= index or not node.inputs[index].name:
            continue
        value = _weight(node, index)
        if value is None or value.ndim != 1 or len(value) <= CHANNEL_AXIS:
            return _block(node, view, f"has scales or sizes {node.inputs[index].name} computed at run time")
        if index == scales_at and value[CHANNEL_AXIS] != 1:
            return _block(node, view, "scales the channel axis")
        if index == sizes_at:
            params.append((y.name, view.param(index, CHANNEL_AXIS, shape_vector=True)))
    return NodeChannels(links=(x.name, y.name), params=tuple(params))


def _is_channel_column(in_shape: Shape, out_shape: Shape) -> bool:
    """[N, C, 1, ..] ↔ [N, C, 1, ..]: only unit dims move, so channel c stays channel c."""
    return (
        len(in_shape) >= 2
        and len(out_shape) >= 2
        and in_shape[:2] == out_shape[:2]
        and all(d == 1 for d in (*in_shape[2:], *out_shape[2:]))
    )


def _axes(node: gs.Node, rank: int) -> list[int] | None:
    """The `axes` attribute or constant input 1, normalised for `rank`; None when absent or computed."""
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        axes = _weight(node, 1)
    return None if axes is None else [int(a) % rank for a in np.ravel(axes)]


def _unit_axes_only(node: gs.Node, view: View) -> bool:
    """Flatten at axis 1; Squeeze/Unsqueeze of axes ≥ 2 (never the batch or channel axis)."""
    if node.op == "Flatten":
        return node.attrs.get("axis", 1) % len(view.shape(node.inputs[0])) == CHANNEL_AXIS
    rank = len(view.shape(node.outputs[0] if node.op == "Unsqueeze" else node.inputs[0]))
    axes = _axes(node, rank)  # a Squeeze without axes drops every unit axis, the batch axis among them
    return bool(axes) and min(axes) > CHANNEL_AXIS


def _reduce(node: gs.Node, view: View) -> NodeChannels:
    """ReduceMean/Max/Min/Sum/... over spatial axes only (an SE block's squeeze): per channel."""
    x, y = node.inputs[0], node.outputs[0]
    axes = _axes(node, len(view.shape(x)))
    if not axes or min(axes) <= CHANNEL_AXIS:
        return _block(node, view, "reduces over the batch or channel axis, or over axes computed at run time")
    return NodeChannels(links=(x.name, y.name))


def _pad(node: gs.Node, view: View) -> NodeChannels:
    """Pad of spatial axes only (any mode): per channel."""
    x, y = node.inputs[0], node.outputs[0]
    rank = len(view.shape(x))
    pads = node.attrs.get("pads") if view.opset < 11 else _weight(node, 1)
    given_axes = len(node.inputs) > 3 and node.inputs[3].name
    axes = _weight(node, 3) if given_axes else np.arange(rank)
    if pads is None or axes is None:
        return _block(node, view, "has pads or axes computed at run time")
    pads, axes = np.ravel(pads), [int(a) % rank for a in np.ravel(axes)]
    padded_axes = {a for i, a in enumerate(axes) if pads[i] or pads[i + len(axes)]}
    if padded_axes & {0, CHANNEL_AXIS}:
        return _block(node, view, "pads the batch or channel axis")
    return NodeChannels(links=(x.name, y.name))


def _classifier_tail(node: gs.Node, view: View) -> NodeChannels:
    """Flatten / Squeeze / Unsqueeze / Reshape between [N, C, 1, 1] and [N, C]."""
    x, y = node.inputs[0], node.outputs[0]
    if not _is_channel_column(view.shape(x), view.shape(y)):
        return _block(node, view, f"reshapes {list(view.shape(x))} to {list(view.shape(y))}")
    if node.op != "Reshape":
        if not _unit_axes_only(node, view):
            return _block(node, view, "moves the batch or channel axis")
        return NodeChannels(links=(x.name, y.name))
    target = _weight(node, 1)
    if target is None:
        return _block(node, view, "has a target shape computed at run time")
    channels = view.channels(x)
    keeps = target[CHANNEL_AXIS] == -1 or (target[CHANNEL_AXIS] == 0 and not node.attrs.get("allowzero", 0))
    if keeps:
        return NodeChannels(links=(x.name, y.name))
    if target[CHANNEL_AXIS] != channels:
        return _block(node, view, f"has target shape {target.tolist()}")
    return NodeChannels(links=(x.name, y.name), params=((y.name, view.param(1, CHANNEL_AXIS, shape_vector=True)),))


def _concat(node: gs.Node, view: View) -> NodeChannels:
    """Along channels: a concatenated group. Along another axis: every input keeps its channels."""
    y = node.outputs[0]
    if not all(view.is_activation(t) for t in node.inputs):
        return _block(node, view, "concatenates a constant")
    axis = node.attrs["axis"] % len(view.shape(y))
    names = tuple(t.name for t in node.inputs)
    if axis == CHANNEL_AXIS:
        return NodeChannels(concat=(y.name, names))
    return NodeChannels(links=(y.name, *names))


_UNARY = (
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Clip", "HardSwish", "HardSigmoid",
    "Sigmoid", "Tanh", "Softsign", "Softplus", "Gelu", "Mish", "Erf", "Neg", "Abs", "Sign", "Floor", "Ceil",
    "Round", "Identity", "Dropout",
    "AveragePool", "MaxPool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
)  # fmt: skip

# Finite on finite inputs; ReduceLogSum is not (log 0 on a zero channel).
_REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare")

HANDLERS: Mapping[str, Handler] = MappingProxyType(
    {
        **{op: _unary for op in _UNARY},
        **{op: _elementwise for op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu")},
        "BatchNormalization": _per_channel_constants((0.0, 0.0, 0.0, 1.0)),  # γ, β, mean, var
        "InstanceNormalization": _per_channel_constants((0.0, 0.0)),  # scale, bias
        "Conv": _conv,
        "ConvTranspose": _conv_transpose,
        "Gemm": _gemm,
        "MatMul": _matmul,
        "Resize": _resize,
        "Flatten": _classifier_tail,
        "Reshape": _classifier_tail,
        "Squeeze": _classifier_tail,
        "Unsqueeze": _classifier_tail,
        "Concat": _concat,
        "Pad": _pad,
        **{op: _reduce for op in _REDUCE},
    }
)


# -- putting the nodes together -------------------------------------------------------------------


def activation_names(graph: gs.Graph) -> frozenset[str]:
    """Tensors computed from the graph inputs (graph.nodes must be in topological order)."""
    live = {t.name for t in graph.inputs}
    for node in graph.nodes:
        if any(t.name in live for t in node.inputs) or not live.isdisjoint(_subgraph_reads(node)):
            live.update(t.name for t in node.outputs if t.name)
    return frozenset(live)


@dataclass
class _Builder:
    """Union-find over tensor names plus what the nodes said about each set."""

    parent: dict[str, str] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)  # first-seen position: the earliest tensor is the root
    producers: dict[str, list[str]] = field(default_factory=dict)
    consumers: dict[str, list[str]] = field(default_factory=dict)
    passthrough: dict[str, list[str]] = field(default_factory=dict)
    params: dict[str, list[ChannelParam]] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    concats: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # output → (node, inputs)

    def add(self, name: str) -> None:
        if name not in self.parent:
            self.parent[name] = name
            self.order[name] = len(self.order)

    def find(self, name: str) -> str:
        root = name
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[name] != root:
            self.parent[name], name = root, self.parent[name]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            first, second = sorted((ra, rb), key=self.order.__getitem__)
            self.parent[second] = first

    def record(self, label: str, op: str, said: NodeChannels) -> None:
        for a, b in zip(said.links, said.links[1:]):
            self.union(a, b)
        for name in said.links:
            self.passthrough.setdefault(name, []).append(label)
        for name in said.produces:
            self.producers.setdefault(name, []).append(label)
        for name in said.consumes:
            self.consumers.setdefault(name, []).append(label)
        for name, param in said.params:
            self.params.setdefault(name, []).append(param)
        for name, why in said.blocks:
            self.reasons.setdefault(name, []).append(f"{op} {label} {why}")
        if said.concat:
            output, inputs = said.concat
            self.concats[output] = (label, inputs)


def _node_channels(node: gs.Node, view: View) -> NodeChannels:
    tensors = _activations_of(node, view)
    missing = [t.name for t in tensors if t.name not in view.shapes]
    if missing:
        return _block(node, view, f"has no static shape for {missing[0]}")
    if all(len(view.shape(t)) < 2 for t in tensors):
        return NodeChannels()  # constants or shape arithmetic: no channel axis anywhere
    handler = HANDLERS.get(node.op, _unknown) if node.domain in (None, "", "ai.onnx") else _unknown
    said = handler(node, view)
    named = [*said.links, *said.produces, *said.consumes, *(name for name, _ in said.params)]
    if said.concat:
        named += [said.concat[0], *said.concat[1]]
    if not all(name in view.activations for name in named):
        return _block(node, view, "mixes constants and activations in a way the analysis does not handle")
    return said


def analyze_channel_groups(graph: gs.Graph, shapes: Mapping[str, Shape]) -> list[ChannelGroup]:
    """Every channel group of `graph` (toposorted) at the given tensor shapes, in graph order."""
    activations = activation_names(graph)
    builder = _Builder()
    for t in graph.inputs:
        builder.add(t.name)
        builder.reasons[t.name] = [f"holds graph input {t.name}"]
    for t in graph.outputs:  # the model's signature must not change
        builder.reasons.setdefault(t.name, []).append(f"holds graph output {t.name}")
    outputs = frozenset(t.name for t in graph.outputs)
    opset = graph.opset or 1
    for label, node in node_labels(graph).items():
        view = View(shapes, activations, outputs, opset, label)
        for t in _activations_of(node, view):
            builder.add(t.name)
        builder.record(label, node.op, _node_channels(node, view))
    return _groups(builder, shapes)


def _groups(builder: _Builder, shapes: Mapping[str, Shape]) -> list[ChannelGroup]:
    sets: dict[str, list[str]] = {}
    for name in builder.parent:
        sets.setdefault(builder.find(name), []).append(name)
    sets = {root: members for root, members in sets.items() if any(len(shapes.get(m, ())) >= 2 for m in members)}
    group_of = {m: gid for gid, members in enumerate(sets.values()) for m in members}
    concats = [
        (label, group_of[out], tuple(group_of[i] for i in ins)) for out, (label, ins) in builder.concats.items()
    ]
    groups = [_plain_group(gid, members, builder, shapes) for gid, members in enumerate(sets.values())]
    groups = _with_layouts(groups, concats)
    return _propagate_concat_blocks(groups, concats)


def _collect(table: Mapping[str, list], members: list[str]) -> tuple:
    seen: dict = {}
    for m in members:
        for item in table.get(m, ()):
            seen.setdefault(item, None)
    return tuple(seen)


def _plain_group(gid: int, members: list[str], builder: _Builder, shapes: Mapping[str, Shape]) -> ChannelGroup:
    reasons = list(_collect(builder.reasons, members))
    flat = [m for m in members if len(shapes.get(m, ())) < 2]
    if flat:
        reasons.append(f"{flat[0]} has no channel axis (shape {list(shapes.get(flat[0], ()))})")
    counts = {shapes[m][CHANNEL_AXIS] for m in members if m not in flat}
    if len(counts) > 1:
        reasons.append(f"its tensors disagree on the channel count ({sorted(counts)})")
    channels = min(counts)
    return ChannelGroup(
        id=gid,
        channels=channels,
        members=tuple(members),
        producers=_collect(builder.producers, members),
        consumers=_collect(builder.consumers, members),
        passthrough=_collect(builder.passthrough, members),
        params=_collect(builder.params, members),
        segments=(Segment(gid, channels),),
        blocked_reason=reasons[0] if reasons else None,
    )


Concat = tuple[str, int, tuple[int, ...]]  # (node label, output group, input groups)


def _with_layouts(groups: list[ChannelGroup], concats: list[Concat]) -> list[ChannelGroup]:
    """Give each concatenated group its segments: its concat's inputs' segments, flattened.

    A group whose layout cannot be known (two concats meet in it, or it feeds itself) is blocked with
    no segments."""
    made: dict[int, list[Concat]] = {}
    for c in concats:
        made.setdefault(c[1], []).append(c)
    layouts: dict[int, tuple[Segment, ...] | str] = {}

    def layout(gid: int, visiting: frozenset[int]) -> tuple[Segment, ...] | str:
        if gid not in made:
            return groups[gid].segments
        if gid in visiting:
            return "is concatenated into itself"
        if gid not in layouts:
            if len(made[gid]) > 1:
                layouts[gid] = f"joins the outputs of {len(made[gid])} concats ({', '.join(c[0] for c in made[gid])})"
            else:
                parts = [layout(source, visiting | {gid}) for source in made[gid][0][2]]
                why = next((p for p in parts if isinstance(p, str)), None)
                layouts[gid] = why or tuple(s for p in parts for s in p)
        return layouts[gid]

    result = []
    for g in groups:
        found = layout(g.id, frozenset()) if g.id in made else g.segments
        if isinstance(found, str) or sum(s.channels for s in found) != g.channels:
            why = found if isinstance(found, str) else "its concat segments do not add up to its channels"
            result.append(_blocked(replace(g, segments=()), why))
        else:
            result.append(replace(g, segments=found))
    return result


def _blocked(group: ChannelGroup, reason: str) -> ChannelGroup:
    return group if group.blocked else replace(group, blocked_reason=reason)


def _propagate_concat_blocks(groups: list[ChannelGroup], concats: list[Concat]) -> list[ChannelGroup]:
    """A concat's inputs cannot change when its output cannot: block them too, down nested concats."""
    groups = list(groups)
    changed = True
    while changed:
        changed = False
        for label, out, ins in concats:
            if not groups[out].blocked:
                continue
            for source in ins:
                if not groups[source].blocked:
                    why = f"is concatenated by {label} into a blocked group ({groups[out].blocked_reason})"
                    groups[source] = _blocked(groups[source], why)
                    changed = True
    return groups

"""Finding inverted-bottleneck structure in exported graphs: conv units, expand patterns, IBN blocks.

A *conv unit* is what an exporter writes for one conv layer::

    Conv ─► [BatchNormalization | per-channel Mul/Add/Sub/Div by a constant | Identity]* ─► [activation]
         ─► [per-channel affine]*          (PP-LCNetV3's learnable affine block sits after its activation)

The two patterns, on conv units (the names are the reference work's):

    expand pattern  1×1 conv ─► act ─► K×K depthwise conv    (Fused-MBConv replaces it by one K×K conv)
    IBN block       expand pattern ─► act ─► [squeeze-excite] ─► linear 1×1 conv [─► residual Add]
                    where the expand conv widens the channels (C_exp > C_in)

A depthwise-separable chain (PP-LCNet: 1×1 ─► act ─► depthwise ─► act ─► 1×1 ─► act ...) has expand
patterns but no IBN block: no 1×1 in it is linear.

Activations are recognised in every form `hwnas.graph.activations` knows, and BN or affine nodes may be
folded or not, so the same network matches the same way before and after fold-bn.

Every place that looks like the start of a pattern is reported: every 1×1 conv that feeds something, and
every depthwise conv whose input does not come from one. Either it matches or its `Rejection` says why
not. Matches are numbered in topological order (block 0 is the earliest), which is `graph.nodes` order for
any graph hwnas hands a matcher: `to_graph` imports a valid, sorted model and the pass manager re-sorts
after each pass. Nothing here changes the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from hwnas.graph.activations import ActivationMatch, match_activation, self_contained
from hwnas.graph.gsgraph import const_value, is_graph_output, private_constant, producer

_AFFINE_EITHER_SIDE = ("Mul", "Add", "Sub")  # x·c, c·x, x+c, c+x, x−c, c−x
_AFFINE_LEFT = ("Div",)  # x/c only: c/x is not linear in x


@dataclass(frozen=True)
class ConvUnit:
    """A Conv with the linear nodes after it, its activation (None: linear) and any affine after that."""

    name: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    group: int
    linear: tuple[str, ...]  # BN / affine / Identity between the conv and the activation
    activation: ActivationMatch | None
    post_linear: tuple[str, ...]  # affine after the activation
    input: str
    output: str  # the tensor at the end of the unit
    graph_nodes: tuple[gs.Node, ...] = field(compare=False, repr=False)  # the conv first, in order

    @property
    def conv(self) -> gs.Node:
        return self.graph_nodes[0]

    @property
    def output_tensor(self) -> gs.Tensor:
        return self.graph_nodes[-1].outputs[0]

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.graph_nodes)

    @property
    def is_depthwise(self) -> bool:
        return self.group > 1 and self.group == self.in_channels

    @property
    def is_pointwise(self) -> bool:
        return self.group == 1 and set(self.kernel) == {1}

    @property
    def activation_kind(self) -> str | None:
        return self.activation.kind if self.activation else None


@dataclass(frozen=True)
class SqueezeExcite:
    """x · gate(x) where the gate sees x only through a global pooling; Identity/affine after it included."""

    nodes: tuple[str, ...]
    input: str
    output: str
    squeeze_channels: int | None  # output channels of the first conv after the pooling
    graph_nodes: tuple[gs.Node, ...] = field(compare=False, repr=False)

    @property
    def output_tensor(self) -> gs.Tensor:
        return self.graph_nodes[-1].outputs[0]


@dataclass(frozen=True)
class PatternMatch:
    """An expand pattern (`project` None) or an IBN block; `index` is its place among the matches."""

    index: int
    expand: ConvUnit
    depthwise: ConvUnit
    project: ConvUnit | None = None
    squeeze_excite: SqueezeExcite | None = None
    residual: str | None = None  # the Add node that joins the block input

    @property
    def is_ibn(self) -> bool:
        return self.project is not None

    @property
    def has_residual(self) -> bool:
        return self.residual is not None

    @property
    def c_in(self) -> int:
        return self.expand.in_channels

    @property
    def c_exp(self) -> int:
        return self.expand.out_channels

    @property
    def c_out(self) -> int:
        return (self.project or self.depthwise).out_channels

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.depthwise.kernel

    @property
    def stride(self) -> tuple[int, ...]:
        return self.depthwise.stride

    @property
    def activations(self) -> tuple[str | None, str | None]:
        """Kinds of the expand and the depthwise activation."""
        return self.expand.activation_kind, self.depthwise.activation_kind

    @property
    def nodes(self) -> tuple[str, ...]:
        parts = [self.expand.nodes, self.depthwise.nodes]
        parts += [self.squeeze_excite.nodes] if self.squeeze_excite else []
        parts += [self.project.nodes] if self.project else []
        parts += [(self.residual,)] if self.residual else []
        return tuple(name for part in parts for name in part)


@dataclass(frozen=True)
class Rejection:
    """A place that looked like the start of a pattern (`start`: a conv's name) and why it is not one."""

    start: str
    reason: str


@dataclass(frozen=True)
class PatternScan:
    """What a scan found, both lists in the order their start convs run."""

    matches: tuple[PatternMatch, ...]
    rejections: tuple[Rejection, ...]


class _Rejected(Exception):
    """Raised by the checks below; the scan turns it into a Rejection."""


def conv_unit(graph: gs.Graph, conv: gs.Node) -> ConvUnit | None:
    """The unit that starts at `conv`, or None when it is not a Conv with a constant weight (shape unknown)."""
    weight = const_value(conv.inputs[1]) if conv.op == "Conv" and len(conv.inputs) > 1 else None
    if weight is None or weight.ndim < 3:
        return None
    group = int(conv.attrs.get("group", 1))
    out_channels, rank = weight.shape[0], weight.ndim
    linear, end = _linear_chain(graph, conv.outputs[0], out_channels, rank)
    # A graph output ends the unit even when an activation follows: its value must stay as it is.
    activation = None if is_graph_output(graph, end) else match_activation(graph, end)
    post: list[gs.Node] = []
    if activation is not None and _feeds_only(end, activation):
        post, end = _linear_chain(graph, activation.output_tensor, out_channels, rank)
    else:
        activation = None
    return ConvUnit(
        name=conv.name,
        in_channels=weight.shape[1] * group,
        out_channels=out_channels,
        kernel=tuple(int(k) for k in weight.shape[2:]),
        stride=tuple(conv.attrs.get("strides", [1] * (rank - 2))),
        group=group,
        linear=tuple(n.name for n in linear),
        activation=activation,
        post_linear=tuple(n.name for n in post),
        input=conv.inputs[0].name,
        output=end.name,
        graph_nodes=(conv, *linear, *(activation.graph_nodes if activation else ()), *post),
    )


def match_squeeze_excite(graph: gs.Graph, x: gs.Tensor, channels: int, rank: int = 4) -> SqueezeExcite | None:
    """The squeeze-excite block reading `x` (`channels` channels, rank `rank`), or None.

    It is x · gate where every path from x to the gate passes a global pooling, x feeds nothing else, and
    no tensor inside is seen outside it. Identity or per-channel affine nodes right after the Mul (Paddle
    writes Identity) are part of it, so its output is what the next conv reads.
    """
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    for mul in x.outputs:
        if mul.op != "Mul" or len(mul.inputs) != 2 or mul.inputs[0] is mul.inputs[1]:
            continue
        branch = _gate_branch(x, mul.inputs[1] if mul.inputs[0] is x else mul.inputs[0])
        if branch is None:
            continue
        inside = {id(n) for n in branch} | {id(mul)}
        if not self_contained(graph, [*branch, mul]) or any(id(user) not in inside for user in x.outputs):
            continue
        after, end = _linear_chain(graph, mul.outputs[0], channels, rank)
        nodes = (*sorted(branch, key=lambda n: position.get(id(n), -1)), mul, *after)
        return SqueezeExcite(tuple(n.name for n in nodes), x.name, end.name, _squeeze_channels(branch), nodes)
    return None


def find_expand_candidates(graph: gs.Graph) -> PatternScan:
    """Every expand pattern, and why each other would-be start is not one."""
    return _scan(graph, ibn=False)


def find_ibn_candidates(graph: gs.Graph) -> PatternScan:
    """Every IBN block, and why each other would-be start (expand patterns included) is not one."""
    return _scan(graph, ibn=True)


def find_expand_patterns(graph: gs.Graph) -> list[PatternMatch]:
    return list(find_expand_candidates(graph).matches)


def find_ibn_blocks(graph: gs.Graph) -> list[PatternMatch]:
    return list(find_ibn_candidates(graph).matches)


# -- the scan ---------------------------------------------------------------------------------------


def _scan(graph: gs.Graph, ibn: bool) -> PatternScan:
    _check_sorted(graph)
    convs = [n for n in graph.nodes if n.op == "Conv"]
    units = {id(conv): conv_unit(graph, conv) for conv in convs}
    by_output = {id(u.output_tensor): u for u in units.values() if u is not None}
    matches: list[PatternMatch] = []
    rejections: list[Rejection] = []
    for conv in convs:
        unit = units[id(conv)]
        try:
            if unit is None:
                raise _Rejected(f"conv {conv.name}: weight {conv.inputs[1].name} is not a constant")
            if _starts_expand(unit) and unit.output_tensor.outputs:
                matches.append(_match_at(graph, unit, units, ibn, len(matches)))
            elif unit.is_depthwise:
                source = by_output.get(id(conv.inputs[0]))
                if source is None or not _starts_expand(source):  # else the 1×1's own entry explains it
                    raise _Rejected(_origin_reason(unit, source))
        except _Rejected as rejected:
            rejections.append(Rejection(conv.name, str(rejected)))
    return PatternScan(tuple(matches), tuple(rejections))


def _match_at(graph: gs.Graph, expand: ConvUnit, units: dict, ibn: bool, index: int) -> PatternMatch:
    depthwise = _expand_pattern(graph, expand, units)
    if not ibn:
        return PatternMatch(index, expand, depthwise)
    squeeze_excite, project = _ibn_tail(graph, depthwise, units)
    if expand.out_channels <= expand.in_channels:
        raise _Rejected(f"1×1 does not widen: {expand.in_channels} → {expand.out_channels}")
    return PatternMatch(index, expand, depthwise, project, squeeze_excite, _residual(expand, project))


def _expand_pattern(graph: gs.Graph, expand: ConvUnit, units: dict) -> ConvUnit:
    """The depthwise unit of the expand pattern starting at `expand`; raises _Rejected with the reason."""
    if expand.group > 1:
        raise _Rejected(_grouped_reason(expand))
    _check_weights(graph, expand, "expand")
    out = expand.output_tensor
    # Name the roles only where a depthwise conv does follow; elsewhere "expand" would mislead.
    feeds_depthwise = any(units.get(id(user)) is not None and units[id(user)].is_depthwise for user in out.outputs)
    if is_graph_output(graph, out):
        where = "between expand and depthwise" if feeds_depthwise else f"after 1×1 conv {expand.name}"
        raise _Rejected(f"tensor {out.name} {where} is a graph output")
    if len(out.outputs) != 1:
        what = "expand output" if feeds_depthwise else f"1×1 conv {expand.name} output"
        raise _Rejected(f"{what} {out.name} has {len(out.outputs)} consumers")
    follower = out.outputs[0]
    depthwise = units.get(id(follower)) if follower.op == "Conv" and follower.inputs[0] is out else None
    if expand.activation is None:
        if depthwise is not None and depthwise.is_depthwise:
            raise _Rejected(f"no activation between expand {expand.name} and depthwise {depthwise.name}")
        raise _Rejected(f"1×1 conv {expand.name} output goes to {follower.op} {follower.name}, not an activation")
    if depthwise is None:
        what = f"{follower.op} {follower.name}"
        raise _Rejected(f"activation after 1×1 conv {expand.name} feeds {what}, not a depthwise conv")
    if not depthwise.is_depthwise:
        if depthwise.group > 1:
            raise _Rejected(_grouped_reason(depthwise))
        what = f"dense {_kernel(depthwise)} conv {depthwise.name}"
        raise _Rejected(f"activation after 1×1 conv {expand.name} feeds {what}, not a depthwise conv")
    _check_weights(graph, depthwise, "depthwise")
    if depthwise.out_channels != depthwise.in_channels:
        counts = f"{depthwise.in_channels} → {depthwise.out_channels}"
        raise _Rejected(f"depthwise channel count differs: {depthwise.name} maps {counts} channels")
    return depthwise


def _ibn_tail(graph: gs.Graph, depthwise: ConvUnit, units: dict) -> tuple[SqueezeExcite | None, ConvUnit]:
    """The squeeze-excite (if any) and the linear 1×1 project conv after `depthwise`, or _Rejected."""
    out = depthwise.output_tensor
    if is_graph_output(graph, out):
        raise _Rejected(f"tensor {out.name} between depthwise and project is a graph output")
    if depthwise.activation is None:
        raise _Rejected(f"no activation after depthwise {depthwise.name}")
    squeeze_excite = None
    if len(out.outputs) > 1:
        squeeze_excite = match_squeeze_excite(graph, out, depthwise.out_channels, len(depthwise.kernel) + 2)
        if squeeze_excite is None:
            raise _Rejected(f"depthwise output {out.name} has {len(out.outputs)} consumers")
        out = squeeze_excite.output_tensor
        if is_graph_output(graph, out):
            raise _Rejected(f"squeeze-excite output {out.name} is a graph output")
        if len(out.outputs) > 1:
            raise _Rejected(f"squeeze-excite output {out.name} has {len(out.outputs)} consumers")
    follower = out.outputs[0] if out.outputs else None
    project = None
    if follower is not None and follower.op == "Conv" and follower.inputs[0] is out:
        project = units.get(id(follower))
    if project is None or not project.is_pointwise:
        what = f"{follower.op} {follower.name}" if follower is not None else "nothing"
        raise _Rejected(f"depthwise {depthwise.name} is followed by {what}, not a 1×1 project conv")
    _check_weights(graph, project, "project")
    activation = project.activation or match_activation(graph, project.output_tensor)
    if activation is not None:
        raise _Rejected(f"project conv {project.name} is followed by an activation ({activation.kind}), not linear")
    return squeeze_excite, project


def _residual(expand: ConvUnit, project: ConvUnit) -> str | None:
    """The Add that joins the block input (the expand conv's input) to the project output, if any."""
    block_input, out = expand.conv.inputs[0], project.output_tensor
    for add in out.outputs:
        if add.op == "Add" and len(add.inputs) == 2 and {id(t) for t in add.inputs} == {id(block_input), id(out)}:
            return add.name
    return None


def _check_weights(graph: gs.Graph, unit: ConvUnit, role: str) -> None:
    for weight in unit.conv.inputs[1:]:
        reason = private_constant(graph, weight, unit.conv)
        if reason:
            raise _Rejected(f"{role} conv {unit.name}: {reason}")


def _origin_reason(depthwise: ConvUnit, source: ConvUnit | None) -> str:
    prefix = f"depthwise conv {depthwise.name}: its input"
    if source is not None:
        kind = "depthwise" if source.is_depthwise else _kernel(source)
        return f"{prefix} comes from {kind} conv {source.name}, not a 1×1 expand conv"
    node = producer(depthwise.conv.inputs[0])
    if node is None:
        return f"{prefix} is graph input {depthwise.input}, not a 1×1 expand conv"
    return f"{prefix} comes from {node.op} {node.name}, not a 1×1 expand conv"


def _grouped_reason(unit: ConvUnit) -> str:
    return f"grouped (non-depthwise) conv {unit.name}: group {unit.group} over {unit.in_channels} input channels"


def _kernel(unit: ConvUnit) -> str:
    return "×".join(map(str, unit.kernel))


def _starts_expand(unit: ConvUnit) -> bool:
    """A 1×1 conv that is not depthwise: where an expand pattern would begin."""
    return set(unit.kernel) == {1} and not unit.is_depthwise


def _check_sorted(graph: gs.Graph) -> None:
    """Match indices are only meaningful on a topologically sorted graph; refuse any other."""
    seen: set[int] = set()
    inside = {id(n) for n in graph.nodes}
    for node in graph.nodes:
        for tensor in node.inputs:
            source = producer(tensor)
            if source is not None and id(source) in inside and id(source) not in seen:
                raise ValueError(f"graph nodes are not in topological order (at {node.name}); run stable_toposort")
        seen.add(id(node))


# -- walking a unit ---------------------------------------------------------------------------------


def _linear_chain(graph: gs.Graph, tensor: gs.Tensor, channels: int, rank: int) -> tuple[list[gs.Node], gs.Tensor]:
    """The per-channel linear nodes that follow `tensor` one after another, and the tensor they end at.

    It stops at a tensor that is a graph output or has several consumers: its value is needed as it is.
    """
    nodes = []
    while not is_graph_output(graph, tensor) and len(tensor.outputs) == 1:
        node = tensor.outputs[0]
        if not _is_linear(node, tensor, channels, rank):
            break
        nodes.append(node)
        tensor = node.outputs[0]
    return nodes, tensor


def _is_linear(node: gs.Node, x: gs.Tensor, channels: int, rank: int) -> bool:
    if node.op == "Identity":
        return True
    if node.op == "BatchNormalization":
        inference = not node.attrs.get("training_mode", 0) and len([o for o in node.outputs if o.name]) == 1
        return inference and node.inputs[0] is x and all(const_value(t) is not None for t in node.inputs[1:5])
    if len(node.inputs) != 2 or node.op not in _AFFINE_EITHER_SIDE + _AFFINE_LEFT:
        return False
    if node.inputs[0] is x:
        other = node.inputs[1]
    elif node.op in _AFFINE_EITHER_SIDE and node.inputs[1] is x:
        other = node.inputs[0]
    else:
        return False
    value = const_value(other)
    return value is not None and _per_channel(value.shape, channels, rank)


def _per_channel(shape: tuple[int, ...], channels: int, rank: int) -> bool:
    """Whether a constant of `shape` broadcasts onto an N×C×... tensor along C only (or as a scalar)."""
    if len(shape) > rank:
        return False
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    return padded[1] in (1, channels) and all(d == 1 for i, d in enumerate(padded) if i != 1)


def _feeds_only(tensor: gs.Tensor, activation: ActivationMatch) -> bool:
    inside = {id(n) for n in activation.graph_nodes}
    return all(id(user) in inside for user in tensor.outputs)


def _gate_branch(x: gs.Tensor, gate: gs.Tensor) -> list[gs.Node] | None:
    """The nodes computing `gate` from `x`, when x reaches them only through a global pooling."""
    nodes: list[gs.Node] = []
    seen: set[int] = set()
    stack = [gate]
    pooled = False
    while stack:
        node = producer(stack.pop())
        if node is None:
            return None  # a graph input: the gate is not a function of x alone
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        for tensor in node.inputs:
            if tensor is x:
                if not _is_global_pool(node):
                    return None
                pooled = True
            elif isinstance(tensor, gs.Variable) and tensor.name:  # constants and omitted inputs end a path
                stack.append(tensor)
    return nodes if pooled else None


def _is_global_pool(node: gs.Node) -> bool:
    if node.op == "GlobalAveragePool":
        return True
    if node.op != "ReduceMean":
        return False
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:  # opset 18 moved axes to an input
        value = const_value(node.inputs[1])
        axes = None if value is None else value.tolist()
    return axes is not None and {a % 4 for a in axes} == {2, 3}


def _squeeze_channels(branch: list[gs.Node]) -> int | None:
    pools = {id(n.outputs[0]) for n in branch if _is_global_pool(n)}
    for node in branch:
        if node.op == "Conv" and id(node.inputs[0]) in pools and const_value(node.inputs[1]) is not None:
            return int(node.inputs[1].values.shape[0])
    return None

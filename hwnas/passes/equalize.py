"""equalize: cross-layer equalization of two convs joined by a positive-homogeneous activation (exact).

Before → After (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", section 4.1)::

    x ─► Conv(W1, b1) ─► f ─► Conv(W2, b2) ─► y
    x ─► Conv(W1/s, b1/s) ─► f' ─► Conv(W2·s, b2) ─► y          (s > 0, one factor per channel)

The math: for s_i > 0, output channel i of the first conv scaled by 1/s_i and input channel i of the
second by s_i give the same y whenever f(x/s) = f(x)/s per channel: f is positive-homogeneous. That
holds for no activation, Relu, LeakyRelu and PRelu (any slope). A Clip(x, lo, hi) (ReLU6) does not
commute with the scaling, so it becomes Max(x, lo/s) and Min(x, hi/s) with per-channel bounds
([C, 1, 1] constants; lo = 0 is a Relu), f'(x/s) = f(x)/s exactly. Every other activation (HardSwish,
Sigmoid, SiLU, ...) is not positive-homogeneous and the pair is skipped with that reason.

s_i is chosen so that both weight ranges of channel i meet at their geometric mean:
r1_i = max|W1[i, ...]| (the first conv's output channel i), r2_i = max|W2[..., i, ...]| over what
input channel i reaches in the second conv, s_i = √(r1_i / r2_i), after which both are √(r1_i·r2_i).
Per-tensor weight quantization then wastes less of its range on small channels. A conv in two pairs
(the depthwise conv of an inverted bottleneck is the second of one and the first of the next) moves
again when its other pair is equalized, so the pairs are equalized in turn until no factor moves by
more than 0.1 % (at most 50 rounds), as Nagel et al. do.

`balance=activations` (what `auto`, the default, does when calibration inputs are given): the tensor
between the convs is quantized per tensor too and moves with the first conv's outputs (÷ s), so the
first side's range of channel i is the larger of r1_i / max r1 and a_i / max a, a_i its calibrated
range. Weight ranges alone raised per-tensor int8 drift on MobileNetV2; this lowers it there (docs/quantization.md
has the numbers, and the models where neither is more than calibration noise).

Skipped, with the reason: weights or bias not constant or shared with another node, a tensor between
the convs that another node reads or that is a graph output (it must keep its value), an activation
that is not positive-homogeneous, and a channel count the second conv does not read as input
channels (it is not a Conv on that tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from hwnas.graph.activations import ActivationMatch, clip_bounds, match_activation
from hwnas.graph.gsgraph import const_value, is_graph_output, private_constant, to_model, unique_name
from hwnas.graph.session import probe_session
from hwnas.passes.base import Pass, PassContext, PassResult, Site, option
from hwnas.passes.registry import register_pass

HOMOGENEOUS = ("relu", "leaky_relu", "prelu")  # f(x/s) = f(x)/s for s > 0, as they are
CLIPS = ("relu6", "clip")  # made homogeneous by per-channel bounds
MAX_ROUNDS = 50
TOLERANCE = 1e-3  # a round that moves no factor by more than this ends the iteration


@dataclass
class _Pair:
    first: gs.Node
    second: gs.Node
    activation: ActivationMatch | None
    scale: np.ndarray  # the product of the factors applied so far, one per channel
    activation_range: np.ndarray | None = None  # per channel, on the calibration inputs, before any scaling


@dataclass(frozen=True)
class EqualizeOptions:
    balance: str = option("auto", "weights: the weight ranges meet (Nagel, data-free); activations: the range "
                          "between the convs (on --calib) counts on the first side too; auto: activations when "
                          "calibration inputs are given, else weights", ("auto", "weights", "activations"))


def _input_channel_view(weight: np.ndarray, group: int) -> np.ndarray:
    """`weight` [O, C/g, ...] as [C, O/g · k...]: row i is every weight that reads input channel i."""
    out, per_group = weight.shape[:2]
    blocks = weight.reshape(group, out // group, per_group, -1)  # [g, O/g, C/g, k]
    return blocks.transpose(0, 2, 1, 3).reshape(group * per_group, -1)


def _scale_input_channels(weight: np.ndarray, group: int, factor: np.ndarray) -> np.ndarray:
    out, per_group = weight.shape[:2]
    per_input = factor.reshape(group, 1, per_group)  # channel g·(C/g) + j at [g, :, j]
    shaped = weight.reshape(group, out // group, per_group, -1) * per_input[..., None]
    return shaped.reshape(weight.shape).astype(weight.dtype)


@register_pass
class Equalize(Pass):
    name = "equalize"
    summary = "cross-layer equalization: conv pairs through Relu/LeakyRelu/PRelu/Clip get balanced per-channel weight ranges"
    Options = EqualizeOptions

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        sites = []
        for node in graph.nodes:
            if node.op != "Conv":
                continue
            site = self._pair(graph, node)
            if site is not None:
                sites.append(site)
        return sites

    def _pair(self, graph: gs.Graph, first: gs.Node) -> Site | None:
        out = first.outputs[0]
        readers = list(out.outputs)
        if len(readers) != 1 or is_graph_output(graph, out):
            return None  # not a chain: nothing to pair with (a branch or an output is no site at all)
        activation = match_activation(graph, out)
        between = activation.output_tensor if activation is not None else out
        nodes = [first.name] + (list(activation.nodes) if activation else [])
        second = between.outputs[0] if len(between.outputs) == 1 else None
        if second is None or second.op != "Conv" or second.inputs[0] is not between:
            if activation is None:
                return None  # a conv followed by something else: not a pair
            return Site(tuple(nodes), f"Conv {first.name} → {activation.kind}", "no Conv reads the activation alone")
        nodes.append(second.name)
        how = f" → {activation.kind} → " if activation else " → "
        description = f"Conv {first.name}{how}Conv {second.name}"
        return Site(tuple(nodes), description, self._why_not(graph, first, activation, between, second),
                    (first, second, activation))

    def _why_not(self, graph: gs.Graph, first: gs.Node, activation: ActivationMatch | None, between: gs.Tensor,
                 second: gs.Node) -> str | None:
        if activation is not None:
            if activation.kind not in HOMOGENEOUS + CLIPS:
                return f"{activation.kind} is not positive-homogeneous (f(x/s) ≠ f(x)/s): scaling cannot pass it"
            if activation.kind in CLIPS and clip_bounds(activation.graph_nodes[0]) is None:
                return "Clip bounds are computed at run time"
            if is_graph_output(graph, between):
                return f"{between.name} is a graph output"
        for node, inputs in ((first, first.inputs[1:]), (second, second.inputs[1:2])):
            for tensor in inputs:
                if tensor.name and (why := private_constant(graph, tensor, node)):
                    return why
        w1, w2 = const_value(first.inputs[1]), const_value(second.inputs[1])
        if w1.shape[0] != w2.shape[1] * second.attrs.get("group", 1):
            return f"{second.name} reads {w2.shape[1] * second.attrs.get('group', 1)} channels, {first.name} writes {w1.shape[0]}"
        if activation is not None and activation.kind == "prelu":
            slope = const_value(activation.graph_nodes[0].inputs[1])
            if slope is None:
                return "PRelu slope is not a constant"
        return None

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        weights: dict[str, np.ndarray] = {}
        biases: dict[str, np.ndarray] = {}
        pairs = []
        for site in sites:
            first, second, activation = site.data
            for node in (first, second):
                weights.setdefault(node.name, const_value(node.inputs[1]).astype(np.float64))
                if len(node.inputs) > 2 and node.inputs[2].name:
                    biases.setdefault(node.name, const_value(node.inputs[2]).astype(np.float64))
            pairs.append(_Pair(first, second, activation, np.ones(weights[first.name].shape[0])))
        if self.options.balance != "weights":
            if ctx.calibration is None:
                if self.options.balance == "activations":
                    ctx.warnings.append("equalize{balance=activations}: no --calib, so the weight ranges alone were "
                                        "balanced")
            else:
                for pair, (low, high) in zip(pairs, _activation_ranges(graph, ctx, pairs)):
                    pair.activation_range = np.maximum(np.abs(low), np.abs(high))
        rounds = 0
        for rounds in range(1, MAX_ROUNDS + 1):
            moved = 0.0
            for pair in pairs:
                w1, w2 = weights[pair.first.name], weights[pair.second.name]
                group = pair.second.attrs.get("group", 1)
                r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
                r2 = np.abs(_input_channel_view(w2, group)).max(axis=1)
                if pair.activation_range is not None:
                    # the tensor between the convs is scaled with the first conv's outputs: its channels'
                    # share of the per-tensor range counts as much as the weights' (the larger of the two)
                    act = pair.activation_range / pair.scale
                    r1 = np.maximum(r1 / max(r1.max(), 1e-30), act / max(act.max(), 1e-30))
                factor = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1)), 1.0)
                weights[pair.first.name] = w1 / factor.reshape(-1, *([1] * (w1.ndim - 1)))
                if pair.first.name in biases:
                    biases[pair.first.name] = biases[pair.first.name] / factor
                weights[pair.second.name] = _scale_input_channels(w2, group, factor)
                pair.scale = pair.scale * factor
                moved = max(moved, float(np.abs(np.log(factor)).max(initial=0.0)))
            if moved < TOLERANCE:
                break
        touched = {p.first.name: p.first for p in pairs} | {p.second.name: p.second for p in pairs}
        for name, node in touched.items():
            dtype = const_value(node.inputs[1]).dtype
            node.inputs[1] = gs.Constant(unique_name(graph, node.inputs[1].name + "_eq"), weights[name].astype(dtype))
            if name in biases:
                node.inputs[2] = gs.Constant(unique_name(graph, node.inputs[2].name + "_eq"), biases[name].astype(dtype))
        for pair in pairs:
            if pair.activation is not None and pair.activation.kind in CLIPS:
                _per_channel_clip(graph, pair)
        with_activations = any(p.activation_range is not None for p in pairs)
        return PassResult(graph, bool(pairs), {"pairs": len(pairs), "rounds": rounds, "activations": with_activations,
                                               "max_factor": float(max((np.abs(np.log(p.scale)).max() for p in pairs), default=0.0))})


def _per_channel_clip(graph: gs.Graph, pair: _Pair) -> None:
    """Clip(x, lo, hi) on channels scaled by 1/s → Max(x, lo/s) (Relu for lo = 0) and Min(x, hi/s)."""
    clip = pair.activation.graph_nodes[0]
    lo, hi = clip_bounds(clip)
    x, y = clip.inputs[0], clip.outputs[0]
    dtype = const_value(pair.first.inputs[1]).dtype
    shape = (-1,) + (1,) * (const_value(pair.first.inputs[1]).ndim - 2)  # [C, 1, 1] against [N, C, H, W]
    nodes = []
    current = x
    for op, bound in (("Max", lo), ("Min", hi)):
        if bound is None:
            continue
        out = gs.Variable(unique_name(graph, f"{clip.name}_{op.lower()}"), dtype=y.dtype)
        if op == "Max" and bound == 0:
            nodes.append(gs.Node("Relu", unique_name(graph, f"{clip.name}_relu"), inputs=[current], outputs=[out]))
        else:
            per_channel = (bound / pair.scale).astype(dtype).reshape(shape)
            constant = gs.Constant(unique_name(graph, f"{clip.name}_{op.lower()}_bound"), per_channel)
            nodes.append(gs.Node(op, unique_name(graph, f"{clip.name}_{op.lower()}"), inputs=[current, constant],
                                 outputs=[out]))
        current = out
    clip.outputs = []
    if not nodes:  # Clip with neither bound: the identity, which the scaling passes
        nodes.append(gs.Node("Identity", unique_name(graph, f"{clip.name}_identity"), inputs=[x], outputs=[y]))
    else:
        nodes[-1].outputs = [y]
    clip.inputs = []
    graph.nodes.extend(nodes)


def _activation_ranges(graph: gs.Graph, ctx: PassContext, pairs: list[_Pair]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel (min, max) of the tensor between each pair's convs (after the activation: what a
    quantizer rounds), over the calibration inputs.

    Every equalization is exact where a pair ends, so these tensors change only by their own pair's
    factors (÷ scale), and one run of the unscaled model gives them all.
    """
    names = [(p.activation.output_tensor if p.activation else p.first.outputs[0]).name for p in pairs]
    session = probe_session(to_model(graph.copy(), ctx.template), names)
    count = len(next(iter(ctx.calibration.values())))
    low = [None] * len(names)
    high = [None] * len(names)
    for i in range(count):
        outputs = session.run(names, {k: v[i : i + 1] for k, v in ctx.calibration.items()})
        for j, value in enumerate(outputs):
            axes = (0, *range(2, value.ndim))
            lo, hi = value.min(axis=axes), value.max(axis=axes)
            low[j] = lo if low[j] is None else np.minimum(low[j], lo)
            high[j] = hi if high[j] is None else np.maximum(high[j], hi)
    return list(zip(low, high))

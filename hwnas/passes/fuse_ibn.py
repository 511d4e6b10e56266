"""fuse-ibn: merge two convs with nothing non-linear between them into one conv (mode=linear, exact), or
an expand 1×1 conv, its activation and a depthwise conv into one fitted K×K conv (mode=mbconv, reconstructed).

Before → After::

    (a)  x ─► Conv 1×1 (W₁, b₁) ─► Conv 1×1 (P, b₂) ─► y      a block's linear project and the next
         x ─► Conv 1×1 (P·W₁, P·b₁ + b₂) ──────────► y      block's expand, when no residual joins them
    (b)  x ─► Conv K×K depthwise (D, b₁) ─► Conv 1×1 (P, b₂) ─► y
         x ─► Conv K×K (W, P·b₁ + b₂) ─────────────────────► y   W[o, c] = P[o, c]·D[c]

The math: the second conv is a matrix P (N × M) applied at every pixel, so
y = P·(W₁∗x + b₁) + b₂ = (P·W₁)∗x + (P·b₁ + b₂), where P·W₁ contracts P with the first conv's weight
written densely (`regroup_weight` to one group: a depthwise D becomes a diagonal, so (P·W₁)[o, c] =
P[o, c]·D[c]). The fused conv keeps the first conv's kernel, pads, strides and dilations: its padding
zeros pass through the linear map unchanged, and a 1×1 stride only subsamples.

Skipped, with the reason: something between the convs (an activation is not linear; a
BatchNormalization or Mul/Add affine is, but must be folded first: run fold-bn / fold-affine before),
the first conv's output with another consumer (a residual Add) or being a graph output, a weight not
constant or shared with another node, a second conv that is not 1×1 with group 1, stride 1 and no
pads, and a first conv that is neither 1×1 with group 1 nor depthwise.

A 1×1 conv is looked at when its input comes from a conv directly or through one node with a single
non-constant input (an activation, a BN, an affine); other 1×1 convs (after an Add, a Concat, a graph
input) are not listed. Sites may chain (1×1 → 1×1 → 1×1): each fusion reads the first conv of its pair
from the graph as it is when it applies, so any subset of sites fuses correctly.

mode=mbconv (Fused-MBConv, reconstructed): the reference work's fused-IBN::

    x ─► Conv 1×1 (E) [─► BN/affine] ─► act₁ [─► affine] ─► Conv K×K depthwise (D) [─► BN/affine] ─► t ─► act₂
    x ─► Conv K×K (W, b), group 1, the depthwise's strides/pads/dilations ─────────────────────────► t ─► act₂

Sites are the expand patterns of `hwnas.graph.patterns` (a 1×1 expand conv, an activation, a K×K
depthwise conv), in graph order, with the pattern finder's rejections and their reasons; act₂ and what
follows it stay as they are. Plain weight composition, exact only when act₁ is the identity on the data
(and the border is unpadded or the expand bias zero), is W₀[o, c] = a₃[o]·D[o]·a₂a₁[o]·E[o, c] and
b₀ = a₃·(ΣD[o]·(a₂(a₁b_E + c₁) + c₂) + b_D) + c₃, where (aᵢ, cᵢ) are the per-channel affine maps of the
expand BN/affine, the affine after act₁ and the depthwise BN/affine. With act₁ a ReLU6 or a hard-swish
it is not the function, so `fit=ls` (default) fits W, b by ridge least squares towards W₀
(`hwnas.passes._reconstruct`): rows are patches of x at sampled output positions, targets the
original's t there; λ (`lambda`, default 1e-3) is relative to the mean diagonal of AᵀA. Sites are fitted
one after another in graph order, each reading x from the graph with the earlier sites already fused
and matching t of the graph as it was when the pass started, so earlier errors are compensated rather
than compounded. `refit_project=true` then refits the group-1 conv that reads the block (through a
squeeze-excite if there is one) the same way, towards its own weights (not when that conv is the
expand conv of another fused site, as in PP-LCNet's chains: that site replaces it). `fit=compose` writes W₀, b₀
unfitted (lossy; the naive alternative, for comparison).

Calibration: the pipeline's calibration samples (at most the first 32), or else 8 seeded standard-normal
samples at the analysis shapes, with a warning. Cost: one pass over the samples, not one per fit. The
original runs once per sample with every fit's target requested (t of each site, the output of each
conv refit_project refits), keeping only the rows each fit samples (`_reconstruct.reference_rows`);
the graph being rewritten runs segment by segment (`_reconstruct.SequentialRun`) up to the next fit in
graph order, after everything upstream of it was fused or refitted, so each fit reads what it read
when every site ran the network prefix afresh (same fits, bitwise on the zoo models) at O(layers)
forward work instead of O(layers²). Memory: the tensors the not-yet-run part still reads, per sample,
and each fit's sampled target rows until it is solved: each sample contributes its share of 4·F rows
(F = C_in·K² + 1, clamped to 8192..32768; every position when there are fewer) drawn uniformly from
its output positions (`positions=N`: N per image instead), accumulated into AᵀA (F × F) and
AᵀY (F × C_exp) at once; one Cholesky factorisation then serves all output channels. In a search
the context carries a fit cache (`_reconstruct.FitCache`): a fit whose upstream graph (as the pass
found it, with which of its nodes are fitted and as which fit), options, seed and calibration samples
were seen before reuses that fit, and neither the reference nor the sequential run goes further than
the last fit not cached; candidates that share a pipeline prefix so share its fits.
Statistics: `fit_residual_max` and `compose_residual_max`, ‖A·θ − t‖²/‖t‖² on the fitted rows at the
worst site, fitted and composed.

Skipped, beyond the finder's reasons: an expand conv with strides or pads, a conv that is not 2-D, and
a fused conv with C_in·K² + 1 > 8192 weights per output channel (the normal matrix would pass 512 MiB).

A mode is a matcher, a rewrite and an exactness class in `_MODES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from hwnas.errors import BadInputError
from hwnas.graph.gsgraph import (
    const_value,
    is_graph_output,
    private_constant,
    producer,
    stable_toposort,
    to_model,
    unique_name,
)
from hwnas.graph.patterns import PatternMatch, find_expand_candidates, match_squeeze_excite
from hwnas.passes import _reconstruct as ls
from hwnas.passes._pruning import set_weights
from hwnas.passes.base import Exactness, Pass, PassContext, PassResult, Site, option
from hwnas.passes.fold_bn import absorb_output, batchnorm_affine, check_linear_producer
from hwnas.passes.registry import register_pass
from hwnas.passes.replace_conv import is_depthwise, regroup_weight
from hwnas.verify.calibration import random_calibration

_FOLD_FIRST = {"BatchNormalization": "fold-bn", "Mul": "fold-affine", "Add": "fold-affine"}


def _kernel(node: gs.Node) -> tuple[int, ...] | None:
    """The conv's kernel size from its attribute or its constant weight; None when neither says."""
    if "kernel_shape" in node.attrs:
        return tuple(node.attrs["kernel_shape"])
    weight = const_value(node.inputs[1])
    return tuple(weight.shape[2:]) if weight is not None else None


def _is_1x1(node: gs.Node) -> bool:
    kernel = _kernel(node)
    return kernel is not None and all(k == 1 for k in kernel)


def _is_plain_pointwise(node: gs.Node) -> bool:
    """A 1×1 conv that is one matrix applied at every pixel: group 1, stride 1, no pads."""
    return (
        node.attrs.get("group", 1) == 1
        and _is_1x1(node)
        and all(s == 1 for s in node.attrs.get("strides", []))
        and not any(node.attrs.get("pads", []))
    )


def _single_variable_input(node: gs.Node) -> gs.Tensor | None:
    variables = [t for t in node.inputs if t.name and const_value(t) is None]
    return variables[0] if len(variables) == 1 else None


def _between(second: gs.Node) -> tuple[gs.Node | None, gs.Node | None]:
    """(the conv before `second`, the one node between them or None), or (None, None) when no conv is near."""
    before = producer(second.inputs[0])
    if before is None or before.op == "Conv":
        return before, None
    tensor = _single_variable_input(before)
    first = producer(tensor) if tensor is not None else None
    return (first, before) if first is not None and first.op == "Conv" else (None, None)


def _check_second(graph: gs.Graph, second: gs.Node) -> str | None:
    for weight in second.inputs[1:]:
        reason = private_constant(graph, weight, second)
        if reason:
            return reason
    if not _is_plain_pointwise(second):
        return f"{second.name} is not a 1×1 conv with group 1, stride 1 and no pads"
    return None


def _check_first(first: gs.Node) -> str | None:
    weight = const_value(first.inputs[1])
    if is_depthwise(first, weight) or (first.attrs.get("group", 1) == 1 and _is_1x1(first)):
        return None
    kernel, group = "×".join(map(str, _kernel(first))), first.attrs.get("group", 1)
    return f"{first.name} is a {kernel} conv with group {group}: only a 1×1 conv with group 1 or a depthwise conv fuses"


def _reason_linear(graph: gs.Graph, first: gs.Node, middle: gs.Node | None, second: gs.Node) -> str | None:
    if middle is not None:
        if middle.op in _FOLD_FIRST:
            return f"{middle.op} {middle.name} between the convs: run {_FOLD_FIRST[middle.op]} first"
        return f"{middle.op} {middle.name} between the convs (only a conv feeding a conv directly fuses)"
    return _check_second(graph, second) or check_linear_producer(graph, first, second) or _check_first(first)


def _describe(first: gs.Node, second: gs.Node) -> str:
    weight = const_value(first.inputs[1])
    kind = "depthwise " if weight is not None and is_depthwise(first, weight) else ""
    kernel = "×".join(map(str, _kernel(first) or ("?",)))
    return f"{kind}{kernel} Conv {first.name} → 1×1 Conv {second.name}"


def match_linear(graph: gs.Graph, ctx: PassContext) -> list[Site]:
    sites = []
    for second in graph.nodes:
        if second.op != "Conv" or not _is_1x1(second):
            continue
        first, middle = _between(second)
        if first is None:
            continue
        reason = _reason_linear(graph, first, middle, second)
        sites.append(Site((first.name, second.name), _describe(first, second), reason, second))
    return sites


def _bias(node: gs.Node, channels: int) -> np.ndarray:
    return const_value(node.inputs[2]).astype(np.float64) if len(node.inputs) > 2 else np.zeros(channels)


def fuse_linear(graph: gs.Graph, first: gs.Node, second: gs.Node) -> None:
    """`first` becomes the fused conv and takes over `second`'s output."""
    w1 = const_value(first.inputs[1])
    dense = regroup_weight(w1, first.attrs.get("group", 1), 1).astype(np.float64)
    p = const_value(second.inputs[1]).astype(np.float64)
    p = p.reshape(p.shape[:2])
    weight = np.tensordot(p, dense, axes=(1, 0)).astype(w1.dtype)
    bias = (p @ _bias(first, p.shape[1]) + _bias(second, p.shape[0])).astype(w1.dtype)
    fused_inputs = [
        first.inputs[0],
        gs.Constant(unique_name(graph, f"{first.name}_{second.name}_fused_weight"), weight),
    ]
    if len(first.inputs) > 2 or len(second.inputs) > 2:
        fused_inputs.append(gs.Constant(unique_name(graph, f"{first.name}_{second.name}_fused_bias"), bias))
    first.inputs.clear()
    first.inputs.extend(fused_inputs)
    first.attrs["group"] = 1
    absorb_output(first, second)


def apply_linear(graph: gs.Graph, sites: list[Site], ctx: PassContext) -> dict[str, float]:
    for site in sites:
        second = site.data
        # read the first conv now: an earlier site of a chain may have fused it already
        fuse_linear(graph, producer(second.inputs[0]), second)
    return {"fused": len(sites)}


# -- mode=mbconv ------------------------------------------------------------------------------------

DEFAULT_RIDGE = 1e-3
FIT_SAMPLES = 32  # calibration samples a fit uses at most
RANDOM_SAMPLES = 8  # seeded random samples when the pipeline has no calibration data


def _unit_parts(unit) -> tuple[list[gs.Node], list[gs.Node]]:
    """(the conv and its BN/affine nodes up to the activation, the affine nodes after the activation)."""
    nodes = list(unit.graph_nodes)
    pre = nodes[: 1 + len(unit.linear)]
    post = nodes[len(nodes) - len(unit.post_linear) :] if unit.post_linear else []
    return pre, post


def _per_channel(value: np.ndarray, channels: int) -> np.ndarray:
    flat = value.astype(np.float64).reshape(-1)
    return np.broadcast_to(flat if flat.size == channels else flat[:1], (channels,))


def chain_affine(nodes: list[gs.Node], x: gs.Tensor, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, c) with chain(x) = a·x + c per channel, for the BN/affine/Identity chain `nodes` reading `x`."""
    scale, shift = np.ones(channels), np.zeros(channels)
    for node in nodes:
        if node.op == "BatchNormalization":
            s, t = batchnorm_affine(node, channels)
            scale, shift = scale * s, shift * s + t
        elif node.op != "Identity":
            x_first = node.inputs[0] is x
            k = _per_channel(const_value(node.inputs[1] if x_first else node.inputs[0]), channels)
            if node.op == "Mul":
                scale, shift = scale * k, shift * k
            elif node.op == "Add":
                shift = shift + k
            elif node.op == "Sub":
                scale, shift = (scale, shift - k) if x_first else (-scale, k - shift)
            else:  # Div, x / k (the pattern finder accepts no other form)
                scale, shift = scale / k, shift / k
        x = node.outputs[0]
    return scale, shift


def _conv_bias(node: gs.Node, channels: int) -> np.ndarray:
    return const_value(node.inputs[2]).astype(np.float64).reshape(-1) if len(node.inputs) > 2 else np.zeros(channels)


def compose_mbconv(match: PatternMatch) -> tuple[np.ndarray, np.ndarray]:
    """Plain weight composition (act₁ taken as the identity): the K×K weight and bias, float64."""
    expand, depthwise = match.expand, match.depthwise
    c_exp = match.c_exp
    e = const_value(expand.conv.inputs[1]).astype(np.float64).reshape(c_exp, -1)
    pre, post = _unit_parts(expand)
    a1, c1 = chain_affine(pre[1:], expand.conv.outputs[0], c_exp)
    a2, c2 = chain_affine(post, expand.activation.output_tensor, c_exp) if post else (np.ones(c_exp), np.zeros(c_exp))
    d = const_value(depthwise.conv.inputs[1]).astype(np.float64)  # (C_exp, 1, kh, kw)
    dw_pre, _ = _unit_parts(depthwise)
    a3, c3 = chain_affine(dw_pre[1:], depthwise.conv.outputs[0], c_exp)
    e_tilde = (a2 * a1)[:, None] * e
    b_tilde = a2 * (a1 * _conv_bias(expand.conv, c_exp) + c1) + c2
    weight = (a3[:, None, None, None] * d) * e_tilde[:, :, None, None]
    bias = a3 * (b_tilde * d.reshape(c_exp, -1).sum(axis=1) + _conv_bias(depthwise.conv, c_exp)) + c3
    return weight, bias


def _target(match: PatternMatch) -> gs.Tensor:
    """t: the depthwise unit's output before its activation, which the fused conv must produce."""
    return _unit_parts(match.depthwise)[0][-1].outputs[0]


def _geometry(conv: gs.Node, weight_shape: tuple[int, ...]) -> ls.ConvGeometry:
    return ls.ConvGeometry.from_attrs(conv.attrs, tuple(weight_shape[2:]))


def _reason_mbconv(match: PatternMatch) -> str | None:
    expand = match.expand.conv
    if len(match.kernel) != 2:
        return f"depthwise conv {match.depthwise.name} is not 2-D (kernel {match.kernel})"
    if any(s != 1 for s in expand.attrs.get("strides", [])) or any(expand.attrs.get("pads", [])):
        return f"expand conv {expand.name} has strides or pads (only a stride-1, unpadded 1×1 expand fuses)"
    features = match.c_in * int(np.prod(match.kernel)) + 1
    if features > ls.MAX_FEATURES:
        return (
            f"fused conv would have C_in·K² + 1 = {features} weights per output channel; "
            f"the least-squares fit is limited to {ls.MAX_FEATURES}"
        )
    return None


def _describe_mbconv(match: PatternMatch) -> str:
    kernel = "×".join(map(str, match.kernel))
    stride = "×".join(map(str, match.stride))
    act1, act2 = match.activations
    return (
        f"1×1 Conv {match.expand.name} ({act1}) → {kernel} depthwise Conv {match.depthwise.name} stride {stride} "
        f"⇒ {kernel} Conv {match.c_in}→{match.c_exp} (then {act2 or 'no activation'})"
    )


def match_mbconv(graph: gs.Graph, ctx: PassContext) -> list[Site]:
    scan = find_expand_candidates(graph)
    position = {n.name: i for i, n in reversed(list(enumerate(graph.nodes)))}
    entries = [
        (position.get(m.expand.name, -1), Site(m.nodes, _describe_mbconv(m), _reason_mbconv(m), m))
        for m in scan.matches
    ]
    entries += [(position.get(r.start, -1), Site((r.start,), f"Conv {r.start}", r.reason)) for r in scan.rejections]
    return [site for _, site in sorted(entries, key=lambda e: e[0])]


def _fit_feeds(ctx: PassContext) -> list[dict[str, np.ndarray]]:
    if ctx.calibration:
        return ls.split_samples(ctx.calibration, FIT_SAMPLES)
    ctx.warnings.append(
        f"fuse-ibn{{mode=mbconv}}: no calibration data; the fused convs were fitted on {RANDOM_SAMPLES} seeded "
        "random (standard normal) inputs, which real inputs may not resemble: give calibration data (--calib)"
    )
    return ls.split_samples(random_calibration(ctx.template, ctx.input_shapes, RANDOM_SAMPLES, ctx.seed))


def _write_fused(graph: gs.Graph, match: PatternMatch, weight: np.ndarray, bias: np.ndarray) -> gs.Node:
    """A new K×K conv from the expand input to t; the old expand and depthwise nodes become dead."""
    expand, depthwise = match.expand.conv, match.depthwise.conv
    dtype = const_value(depthwise.inputs[1]).dtype
    target = _target(match)
    attrs = dict(depthwise.attrs)
    attrs["group"] = 1
    inputs = [
        expand.inputs[0],
        gs.Constant(unique_name(graph, f"{depthwise.name}_fused_weight"), weight.astype(dtype)),
        gs.Constant(unique_name(graph, f"{depthwise.name}_fused_bias"), bias.astype(dtype)),
    ]
    fused = gs.Node("Conv", name=unique_name(graph, f"{depthwise.name}_fused"), attrs=attrs, inputs=inputs)
    producer(target).outputs.clear()
    fused.outputs.append(target)
    graph.nodes.insert(next(i for i, n in enumerate(graph.nodes) if n is expand), fused)
    return fused


def _follower(graph: gs.Graph, match: PatternMatch) -> tuple[gs.Node | None, str | None]:
    """The group-1 conv that reads the block (through a squeeze-excite, if any), or why there is none."""
    out = match.depthwise.output_tensor
    if not is_graph_output(graph, out) and len(out.outputs) > 1:
        se = match_squeeze_excite(graph, out, match.c_exp, len(match.kernel) + 2)
        out = se.output_tensor if se is not None else out
    users = out.outputs
    if is_graph_output(graph, out) or len(users) != 1 or users[0].op != "Conv" or users[0].inputs[0] is not out:
        return None, f"block output {out.name} does not feed exactly one conv"
    conv = users[0]
    weight = const_value(conv.inputs[1])
    if weight is None or conv.attrs.get("group", 1) != 1 or weight.ndim != 4:
        return None, f"conv {conv.name} after the block is not a 2-D group-1 conv with a constant weight"
    for tensor in conv.inputs[1:]:
        reason = private_constant(graph, tensor, conv)
        if reason:
            return None, f"conv {conv.name} after the block: {reason}"
    if int(np.prod(weight.shape[1:])) + 1 > ls.MAX_FEATURES:
        return None, f"conv {conv.name} after the block has too many weights per output channel to fit"
    return conv, None


def apply_mbconv(graph: gs.Graph, sites: list[Site], ctx: PassContext, options: FuseIbnOptions) -> dict[str, float]:
    if options.fit == "ls":
        stable_toposort(graph)  # the sequential run reads nodes in list order
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    ordered = [site.data for site in sorted(sites, key=lambda s: position[id(s.data.expand.conv)])]
    composed = [compose_mbconv(match) for match in ordered]
    stats = {"fused": float(len(ordered)), "refitted": 0.0}
    if options.fit != "ls":
        for match, (weight, bias) in zip(ordered, composed):
            _write_fused(graph, match, weight, bias)
        return stats
    feeds = _fit_feeds(ctx)
    followers = _followers(graph, ordered, ctx) if options.refit_project else {}
    # what each fit matches, drawn from one run of the reference: site i's t, then its follower's output
    n = options.positions
    targets = {(i, 0): ls.TargetRows(_target(m).name, int(np.prod(w.shape[1:])) + 1, (ctx.seed, i), positions=n)
               for i, (m, (w, _)) in enumerate(zip(ordered, composed))}  # fmt: skip
    targets.update({(i, 1): ls.TargetRows(c.outputs[0].name, int(np.prod(const_value(c.inputs[1]).shape[1:])) + 1,
                                          (ctx.seed, i, 1), positions=n) for i, c in followers.items()})  # fmt: skip
    keys = _cache_keys(graph, ordered, followers, targets, feeds, ctx, options)  # {} without a fit cache
    cached = {key: fit for key in keys if (fit := ctx.fit_cache.get(keys[key])) is not None}
    missing = [rows for key, rows in targets.items() if key not in cached]
    if missing:  # the function to keep, run once for the fits not made before (each target's rows seeded apart)
        ls.reference_rows(to_model(graph.copy(), ctx.template), missing, feeds)
    # one sequential run in graph order: each fit reads the graph with everything upstream of it already
    # fused or refitted, as fitting site by site (each site, then its follower) on a fresh run would; it
    # advances only to the fits not cached (the cached ones are written in as it goes)
    at = lambda key: position[id(ordered[key[0]].expand.conv if key[1] == 0 else followers[key[0]])]  # noqa: E731
    run = ls.SequentialRun(graph, ctx.template, feeds)
    residuals, prior_residuals, rows = [], [], 0
    for key in sorted(targets, key=at):
        index, follower = key
        node = followers[index] if follower else ordered[index].expand.conv
        fit = cached.get(key)
        if fit is None:
            source = node.inputs[0].name
            inputs = [values[source] for values in run.advance(node)]
            if follower:
                weight = const_value(node.inputs[1])
                fit = ls.fit_conv_rows(inputs, targets[key], source, _geometry(node, weight.shape),
                                       weight.astype(np.float64), _conv_bias(node, weight.shape[0]), options.lambda_)
            else:
                weight, bias = composed[index]
                fit = ls.fit_conv_rows(inputs, targets[key], source, _geometry(ordered[index].depthwise.conv, weight.shape),
                                       weight, bias, options.lambda_)  # fmt: skip
            if keys:
                ctx.fit_cache.put(keys[key], fit)
        if follower:
            set_weights(graph, node, fit.weight, fit.bias)
            stats["refitted"] += 1
            continue
        _write_fused(graph, ordered[index], fit.weight, fit.bias)
        run.rewritten()
        residuals.append(fit.residual)
        prior_residuals.append(fit.prior_residual)
        rows = max(rows, fit.rows)
    if ordered:
        stats.update(
            calibration_samples=float(len(feeds)),
            fit_rows=float(rows),
            fit_residual_max=max(residuals),  # ‖fit − t‖² / ‖t‖² on the rows fitted, worst site
            compose_residual_max=max(prior_residuals),  # the same for plain weight composition
        )
    return stats


def _cache_keys(graph: gs.Graph, ordered: list[PatternMatch], followers: dict[int, gs.Node],
                targets: dict[tuple[int, int], ls.TargetRows], feeds: list[dict[str, np.ndarray]], ctx: PassContext,
                options: FuseIbnOptions) -> dict[tuple[int, int], str | None]:
    """Each fit's key in the context's fit cache (none without one): the graph upstream of its target as
    the pass found it, which nodes there are fitted and as which fit (site i / follower i: the row seeds
    follow i), the options that shape a fit, the seed and the calibration samples."""
    if ctx.fit_cache is None:
        return {}
    marks = {id(m.expand.conv): f"|site {i}" for i, m in enumerate(ordered)}
    marks.update({id(c): f"|follower {i}" for i, c in followers.items()})
    extra = (f"fuse-ibn mbconv|lambda={options.lambda_!r}|positions={options.positions}|seed={ctx.seed}|"
             f"data={ctx.fit_cache.data_key(ctx.calibration, feeds)}")
    return ls.upstream_keys(graph, {key: rows.tensor for key, rows in targets.items()}, marks, extra)


def _followers(graph: gs.Graph, ordered: list[PatternMatch], ctx: PassContext) -> dict[int, gs.Node]:
    """Site index → the conv refit_project refits after it; a warning for each site without one."""
    expands = {id(match.expand.conv) for match in ordered}
    followers = {}
    for index, match in enumerate(ordered):
        conv, reason = _follower(graph, match)
        if conv is not None and id(conv) in expands:
            continue  # the next block's expand conv (PP-LCNet): its own site replaces it
        if conv is None:
            ctx.warnings.append(f"fuse-ibn{{mode=mbconv}}: refit_project skipped at {match.depthwise.name}: {reason}")
            continue
        followers[index] = conv
    return followers


# -- the pass -----------------------------------------------------------------------------------------


class _Mode(NamedTuple):
    """What a mode is; the context carries the calibration data a reconstructed mode fits on."""

    match: Callable[[gs.Graph, PassContext], list[Site]]
    apply: Callable[[gs.Graph, list[Site], PassContext, "FuseIbnOptions"], dict[str, float]]  # returns statistics
    exactness: Exactness


_MODES = {
    "linear": _Mode(match_linear, lambda graph, sites, ctx, options: apply_linear(graph, sites, ctx), Exactness.EXACT),
    "mbconv": _Mode(match_mbconv, apply_mbconv, Exactness.RECONSTRUCTED),
}
_OPTION_NAMES = {"lambda": "lambda_"}  # `lambda` is a Python keyword: the field is lambda_


@dataclass(frozen=True)
class FuseIbnOptions:
    mode: str = option(
        "linear",
        "linear: exact fusion of convs with nothing non-linear between them; "
        "mbconv: expand 1×1 + act + depthwise K×K → one K×K conv fitted on calibration data",
        tuple(_MODES),
    )
    fit: str = option(
        "ls",
        "mode=mbconv: ls = ridge least squares on calibration data; compose = plain weight composition "
        "ignoring the activation (lossy, for comparison)",
        ("ls", "compose"),
    )
    refit_project: bool = option(
        False, "mode=mbconv: also refit the conv that reads each fused block (its 1×1 project)"
    )
    lambda_: float = option(
        DEFAULT_RIDGE, "mode=mbconv: ridge strength λ towards the composed weights, relative to mean diag(AᵀA)"
    )
    positions: int = option(0, f"mode=mbconv: {ls.POSITIONS_DOC}")

    def __post_init__(self):
        fitting_options = self.fit != "ls" or self.refit_project or self.lambda_ != DEFAULT_RIDGE or self.positions
        if self.mode != "mbconv" and fitting_options:
            raise BadInputError(
                "pass 'fuse-ibn': options fit, refit_project, lambda and positions apply to mode=mbconv only"
            )
        ls.check_positions("fuse-ibn", self.positions)
        if self.lambda_ < 0:
            raise BadInputError(f"pass 'fuse-ibn': lambda={self.lambda_} must be >= 0")
        if self.refit_project and self.fit != "ls":
            raise BadInputError("pass 'fuse-ibn': refit_project needs fit=ls")


@register_pass
class FuseIbn(Pass):
    name = "fuse-ibn"
    summary = (
        "fuse two convs with nothing non-linear between them (1×1 → 1×1, depthwise → 1×1) into one conv; "
        "mode=mbconv: expand + act + depthwise into one fitted K×K conv"
    )
    Options = FuseIbnOptions

    def __init__(self, **options):
        super().__init__(**{_OPTION_NAMES.get(k, k): v for k, v in options.items()})

    @property
    def exactness(self) -> Exactness:
        if self.options.mode == "mbconv" and self.options.fit == "compose":
            return Exactness.LOSSY
        return _MODES[self.options.mode].exactness

    @classmethod
    def exactness_doc(cls) -> str:
        return "exact (mode=linear) / reconstructed (mode=mbconv)"

    @classmethod
    def option_docs(cls) -> list[dict]:
        spelled = {v: k for k, v in _OPTION_NAMES.items()}
        return [{**doc, "name": spelled.get(doc["name"], doc["name"])} for doc in super().option_docs()]

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        return _MODES[self.options.mode].match(graph, ctx)

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        stats = _MODES[self.options.mode].apply(graph, sites, ctx, self.options)
        return PassResult(graph, bool(sites), stats)

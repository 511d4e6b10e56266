"""Channel pruning shared by scale-depth and align-channels{mode=trim}: which channels matter, removing
the others from a whole channel group, and refitting the group's consumers by least squares.

Before → After (one group of C = 6 channels kept to 4; see hwnas/graph/channels.py for groups)::

    x ─► Conv_a(W_a[6,K]) ─► BN(6) ─► Relu ─► Conv_b(W_b[M,6]) ─► y
    x ─► Conv_a(W_a[S,K]) ─► BN(S) ─► Relu ─► Conv_b(W_b'[M,4]) ─► y      S = the 4 kept channels

Removing channels. A group is removed from as one piece: its producers lose the output rows of the
removed channels (weight and bias), its pass-through ops the entries of their per-channel constants
(BN, affine Mul/Add, a depthwise conv's weight and bias, whose `group` becomes the new count; a
Reshape target or Resize sizes that name the count name the new one), its consumers the input columns.
A group that is a segment of a concatenated group loses those channels in the middle of the concat
output too, so every param of the concatenated group loses the same positions. Coupled channels
(residual Adds, Concat segments, depthwise chains, SE gates) change together because they are one group.

Which channels stay (`importance=activation`, the default): the channels that let the consumers'
outputs be rebuilt best, chosen as He et al.'s channel selection would but greedily instead of by
LASSO. A consumer k reads x_k (the group's channels, on the calibration samples, every position a row)
through V_k, its weight with one row per input channel (a K×K conv's taps taken as separate outputs).
With Σ_k = Cov(x_k) (centred: the refitted bias absorbs the means) the part of k's output that the
channels S cannot rebuild linearly is

    u_k(S) = tr(V_kᵀ Σ_k V_k) − tr(V_kᵀ Σ_k[:, S] Σ_k[S, S]⁻¹ Σ_k[S, :] V_k)

and S is grown one channel at a time, each step adding the channel that most lowers Σ_k u_k(S)/u_k(∅)
(each consumer weighs the same, whatever the scale of its output; forward selection by Gram–Schmidt
in the Σ_k inner product: O(C² + C·F) per step and consumer). Unlike a per-channel score (‖W[:, c]‖²·
E[x_c²]) it keeps one of two redundant channels rather than both, which is what a refit can use.
A concat's consumers count with the segment's rows and columns only. `importance=weight` needs no
data: Σ_k is taken as diag(Σ_p ‖W_p[c]‖²·s_c² / Σ), the producers' shares, s_c = γ_c/√(σ_c² + ε) of a
BatchNormalization alone after producer p (1 without one): the norm of the producer row once the BN is
folded (fold-bn: W' = s·W), so the choice is the same before and after fold-bn; the selection then
ranks channels by Σ_k ‖V_k[c]‖²·Σ_k[c, c] / tr. The kept channels keep their original order.

Refit (He et al. 2017, "Channel Pruning for Accelerating Very Deep Neural Networks"): once every
chosen group is pruned, each consumer k of a pruned group is refitted, in graph order, by ridge least
squares (`hwnas.passes._reconstruct`) so that its output on the calibration inputs matches the original
model's output of k:

    W_k', b_k' = argmin ‖conv(x̂_k; W, b) − y_k[S_out]‖² + μ·‖(W, b) − (W_k[:, S_in], b_k)‖²

where x̂_k is what k reads in the pruned model (earlier consumers already refitted), y_k the original's
output of k restricted to k's kept output channels S_out (k may itself produce a pruned group), and
the prior is the plain truncation; μ = λ·mean diag(AᵀA) with λ = 0.1. That is strong on purpose:
consumers that read [N, C, 1, 1] tensors (an SE squeeze, a classifier head) get one row per sample
and would otherwise memorise the calibration set (on the real models, 0.1 kept more held-out cosine
than 1e-3 or 1e-2). Targets come from the original and inputs from the pruned model, so each refit
compensates the errors of everything before it instead of compounding them. What is fitted is the
linear part, what k computes before its activation. Conv consumers (2-D, group 1) fit sampled K×K
patches; Gemm and MatMul consumers fit their [N, K] input rows (Gemm's alpha and beta are folded into
B and C; MatMul has no bias, so none is fitted). ConvTranspose consumers cannot be refitted: such a
group is a site with that reason.

Cost: one pass over the calibration samples, not one per consumer. The original runs once per sample
with every consumer's output requested, keeping only the rows each fit samples (`_reconstruct.reference_rows`);
the pruned graph runs segment by segment (`_reconstruct.SequentialRun`), each segment up to the next
consumer after the consumers before it were refitted, keeping only the tensors later nodes read. The
fits are the same as refitting each consumer on a fresh run of the pruned prefix (same rows, same
numbers: bitwise on the zoo models), at O(layers) forward work instead of O(layers²).

Calibration: the pipeline's calibration samples (at most the first 32), or else 8 seeded
standard-normal samples at the analysis shapes, with a warning. A conv refit's rows are
`_reconstruct.fit_rows` output positions spread over the samples, or N per image with the passes'
`positions=N` option (`PruneSettings.positions`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from hwnas.graph.channels import ChannelGroup, ChannelParam, Segment, node_labels
from hwnas.graph.gsgraph import const_value, stable_toposort, to_model, unique_name
from hwnas.passes import _reconstruct as ls
from hwnas.passes.base import PassContext, Site
from hwnas.passes.fold_bn import batchnorm_affine, output_channel_axis
from hwnas.verify.calibration import random_calibration

DEFAULT_RIDGE = 0.1
FIT_SAMPLES = 32  # calibration samples the selection and the refits use at most
RANDOM_SAMPLES = 8  # seeded random samples when the pipeline has no calibration data
IMPORTANCE = ("activation", "weight")


@dataclass(frozen=True)
class Pruning:
    """What a site prunes: a plain group down to `target` channels, and the concatenated groups it is
    a segment of (they lose the same channels in the middle)."""

    group: ChannelGroup
    target: int
    within: tuple[ChannelGroup, ...]


@dataclass(frozen=True)
class PruneSettings:
    owner: str  # the pass spec, for warnings
    importance: str = "activation"
    refit: bool = True
    positions: int = 0  # a conv refit's positions per image (0: the default rows, `_reconstruct.fit_rows`)


# -- sites --------------------------------------------------------------------------------------------


def concatenations(groups: Sequence[ChannelGroup]) -> dict[int, tuple[ChannelGroup, ...]]:
    """Group id → the concatenated groups it is a segment of (absent: none). One index per match, so
    that looking up every group's concatenations stays linear in the number of groups."""
    within: dict[int, list[ChannelGroup]] = {}
    for g in groups:
        if g.concatenated:
            for segment_group in dict.fromkeys(s.group for s in g.segments):
                within.setdefault(segment_group, []).append(g)
    return {k: tuple(v) for k, v in within.items()}


def site_nodes(group: ChannelGroup) -> tuple[str, ...]:
    """A group's nodes, producers first (a site is anchored at its first node)."""
    return tuple(dict.fromkeys(group.producers + group.passthrough + group.consumers))


def describe(group: ChannelGroup, target: int, within: tuple[ChannelGroup, ...]) -> str:
    tensors = f"{len(group.members)} tensor{'s' if len(group.members) != 1 else ''}"
    text = f"group of {tensors}, {group.channels} channels → {target}"
    text += f" (producers {', '.join(group.producers) or 'none'}; consumers {', '.join(group.consumers) or 'none'})"
    if within:
        plural = "s" if len(within) > 1 else ""
        verb = "widens" if target > group.channels else "narrows"
        text += f"; {verb} the concat group{plural} of {', '.join(g.members[0] for g in within)}"
    return text


def refit_problem(node: gs.Node, label: str) -> str | None:
    """Why consumer `node` cannot be refitted by least squares, or None when it can."""
    weight = const_value(node.inputs[1])
    if node.op == "ConvTranspose":
        return f"its consumer ConvTranspose {label} cannot be refitted (only Conv, Gemm and MatMul are)"
    if node.op == "Conv" and weight.ndim != 4:
        return f"its consumer Conv {label} is not 2-D"
    features = int(np.prod(weight.shape)) // weight.shape[output_axis(node)] + 1
    if features > ls.MAX_FEATURES:
        return f"its consumer {node.op} {label} has {features} weights per output, over the fit's {ls.MAX_FEATURES}"
    return None


Targets = Callable[[ChannelGroup], "tuple[int, str | None] | None"]


def pruning_sites(graph: gs.Graph, groups: Sequence[ChannelGroup], targets: Targets, refit: bool) -> list[Site]:
    """One site per plain group that `targets` gives a (count, reason) for; blocked groups and groups
    whose consumers cannot be refitted carry their reason."""
    nodes = node_labels(graph)
    concats = concatenations(groups)
    sites = []
    for group in groups:
        if group.concatenated or not (group.producers or group.consumers):
            continue  # concats follow their segments; no weight indexes these channels (after a Transpose)
        found = targets(group)
        if found is None:
            continue
        target, reason = found
        within = concats.get(group.id, ())
        readers = [label for g in (group, *within) for label in g.consumers]
        problems = (refit_problem(nodes[label], label) for label in readers) if refit and not group.blocked else ()
        reason = group.blocked_reason or reason or next((p for p in problems if p), None)
        sites.append(Site(site_nodes(group), describe(group, target, within), reason, Pruning(group, target, within)))
    return sites


# -- rewriting a group's constants --------------------------------------------------------------------

NewValue = Callable[[np.ndarray, ChannelParam], np.ndarray]


def rewrite_group(
    graph: gs.Graph, nodes: Mapping[str, gs.Node], group: ChannelGroup, count: int, new_value: NewValue, suffix: str
) -> None:
    """Give every constant indexed by `group`'s channels its `new_value` (new constants; the old are
    not touched) and every pass-through depthwise conv `group = count`."""
    for param in group.params:
        node = nodes[param.node]
        old = node.inputs[param.input]
        value = const_value(old)
        if param.shape_vector:
            new = value.copy()
            new[param.axis] = count
        else:
            new = new_value(value, param)
        node.inputs[param.input] = gs.Constant(unique_name(graph, f"{old.name}_{suffix}"), new)
    for label in group.passthrough:
        if nodes[label].op == "Conv":  # a pass-through Conv is depthwise: one group per channel
            nodes[label].attrs["group"] = count


def segment_bounds(segments: tuple[Segment, ...]) -> np.ndarray:
    return np.cumsum([s.channels for s in segments])[:-1]


def kept(
    value: np.ndarray, param: ChannelParam, segments: tuple[Segment, ...], keep: Mapping[int, np.ndarray]
) -> np.ndarray:
    """`value` with only the entries `keep[g]` of each segment g that has one, along `param.axis`."""
    pieces = np.split(value, segment_bounds(segments), axis=param.axis)
    chosen = [np.take(p, keep[s.group], axis=param.axis) if s.group in keep else p for s, p in zip(segments, pieces)]
    return np.concatenate(chosen, axis=param.axis)


def kept_count(group: ChannelGroup, keep: Mapping[int, np.ndarray]) -> int:
    return sum(len(keep[s.group]) if s.group in keep else s.channels for s in group.segments)


# -- which channels stay ------------------------------------------------------------------------------


def output_axis(node: gs.Node) -> int:
    """Axis of a producer's weight indexed by its output channels (MatMul: B is [K, M])."""
    return 1 if node.op == "MatMul" else output_channel_axis(node)


def input_axis(node: gs.Node) -> int:
    """Axis of a consumer's weight indexed by its input channels."""
    if node.op == "Gemm":
        return 1 if node.attrs.get("transB", 0) else 0
    return 0 if node.op in ("ConvTranspose", "MatMul") else 1


def columns(node: gs.Node) -> np.ndarray:
    """V: the consumer's weight as one row per input channel, (C, everything else), float64."""
    weight = const_value(node.inputs[1]).astype(np.float64)
    moved = np.moveaxis(weight, input_axis(node), 0)
    return moved.reshape(len(moved), -1)


def covariances(
    model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Σ = E[x xᵀ] − μμᵀ over the channels (axis 1) of each tensor, every sample and position a row."""
    moments = {n: (0.0, 0.0, 0) for n in names}  # Σx xᵀ, Σx, rows
    for values in ls.iter_activations(model, names, feeds):
        for n in names:
            x = np.moveaxis(values[n], 1, 0)
            rows = x.reshape(len(x), -1).astype(np.float64)
            second, first, count = moments[n]
            moments[n] = (second + rows @ rows.T, first + rows.sum(axis=1), count + rows.shape[1])
    covariance = {}
    for n, (second, first, count) in moments.items():
        mean = first / count
        covariance[n] = second / count - np.outer(mean, mean)
    return covariance


def bn_scale(node: gs.Node, channels: int) -> np.ndarray:
    """γ/√(σ² + ε) of a BatchNormalization that alone reads `node`'s output; ones without one."""
    users = node.outputs[0].outputs
    if len(users) != 1 or users[0].op != "BatchNormalization":
        return np.ones(channels)
    return batchnorm_affine(users[0])[0]


def producer_energies(group: ChannelGroup, nodes: Mapping[str, gs.Node]) -> np.ndarray:
    """Σ_p ‖W_p[c]‖²·s_c² / Σ_c(…): the producers' shares, folded BN scale included (docstring)."""
    energy = np.zeros(group.channels)
    for label in group.producers:
        node = nodes[label]
        weight = const_value(node.inputs[1]).astype(np.float64)
        other_axes = tuple(a for a in range(weight.ndim) if a != output_axis(node))
        rows = np.sum(weight * weight, axis=other_axes)
        scaled = rows * bn_scale(node, group.channels) ** 2
        energy += scaled / max(scaled.sum(), 1e-30)
    return energy


def segment_slice(group: ChannelGroup, segment_group: int) -> slice:
    start = 0
    for s in group.segments:
        if s.group == segment_group:
            return slice(start, start + s.channels)
        start += s.channels
    raise ValueError(f"group {segment_group} is not a segment of group {group.id}")


Term = tuple[np.ndarray, np.ndarray]  # (Σ over the pruned group's channels, V restricted to them)


def selection_terms(
    pruning: Pruning, nodes: Mapping[str, gs.Node], covariance: Mapping[str, np.ndarray] | None
) -> list[Term]:
    """One (Σ, V) per consumer reading the pruned group, directly or through a concat (its segment's
    rows and columns only); Σ = diag(producer energies) without data."""
    group = pruning.group
    fallback = np.diag(producer_energies(group, nodes)) if covariance is None else None
    terms = []
    for owner in (group, *pruning.within):
        part = slice(None) if owner is group else segment_slice(owner, group.id)
        for label in owner.consumers:
            node = nodes[label]
            sigma = fallback if covariance is None else covariance[node.inputs[0].name][part, part]
            terms.append((sigma, columns(node)[part]))
    return terms


def select_channels(terms: Sequence[Term], channels: int, count: int) -> np.ndarray:
    """Greedy forward selection of `count` channels minimising Σ_k u_k(S)/u_k(∅) (docstring); ascending.

    Per consumer, R = Σ and H = Σ·V with the chosen channels' directions projected out: adding j
    lowers u_k by ‖H[j]‖² / R[j, j]; after the pick, R ← R − R[:, j]R[j]/R[j, j], likewise H."""
    gram, cross, totals, floors = [], [], [], []
    for sigma, v in terms:
        floor = 1e-9 * max(float(np.trace(sigma)) / len(sigma), 1e-30)  # Σ is singular for duplicated channels
        gram.append(sigma + floor * np.eye(len(sigma)))
        cross.append(gram[-1] @ v)
        totals.append(max(float(np.sum(v * cross[-1])), 1e-30))
        floors.append(4 * floor)  # a residual variance this small: nothing left to explain
    chosen, free = [], np.ones(channels, bool)
    for _ in range(count):
        gain = np.zeros(channels)
        for r, h, total, floor in zip(gram, cross, totals, floors):
            d = np.diag(r)
            gain += np.where(d > floor, np.sum(h * h, axis=1) / np.maximum(d, floor), 0.0) / total
        j = int(np.argmax(np.where(free, gain, -np.inf)))  # ties: the lower index
        chosen.append(j)
        free[j] = False
        for k, (r, floor) in enumerate(zip(gram, floors)):
            if r[j, j] > floor:  # else j adds nothing here: projecting it out would divide by ~0
                step = r[:, j] / r[j, j]
                gram[k], cross[k] = r - np.outer(step, r[j]), cross[k] - np.outer(step, cross[k][j])
    return np.sort(np.asarray(chosen, dtype=np.int64))


# -- refitting consumers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refit:
    node: str
    residual: float  # ‖fit − y‖² / ‖y‖² on the rows fitted
    truncation_residual: float  # the same for the truncated weights (the prior)


def set_weights(graph: gs.Graph, node: gs.Node, weight: np.ndarray, bias: np.ndarray) -> None:
    dtype = const_value(node.inputs[1]).dtype
    node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name}_refit_weight"), weight.astype(dtype))
    constant = gs.Constant(unique_name(graph, f"{node.name}_refit_bias"), bias.astype(dtype))
    if len(node.inputs) > 2:
        node.inputs[2] = constant
    else:
        node.inputs.append(constant)


Feeds = Sequence[Mapping[str, np.ndarray]]


def _features(conv: gs.Node) -> int:
    return int(np.prod(const_value(conv.inputs[1]).shape[1:]))


def fit_targets(
    consumers: Sequence[gs.Node], out_keep: Mapping[str, np.ndarray], seed: int, positions: int
) -> list[ls.TargetRows]:
    """Each consumer's fit target: its output, its kept channels, its rows seeded by its index in graph order."""
    return [
        ls.TargetRows(n.outputs[0].name, _features(n) + 1 if n.op == "Conv" else None, (seed, i),
                      out_keep.get(n.outputs[0].name), positions)
        for i, n in enumerate(consumers)
    ]  # fmt: skip


def refit_conv(graph: gs.Graph, conv: gs.Node, inputs: list[np.ndarray], target: ls.TargetRows) -> Refit:
    weight = const_value(conv.inputs[1])
    has_bias = len(conv.inputs) > 2 and conv.inputs[2].name
    bias = const_value(conv.inputs[2]) if has_bias else np.zeros(weight.shape[0])
    geometry = ls.ConvGeometry.from_attrs(conv.attrs, tuple(weight.shape[2:]))
    fit = ls.fit_conv_rows(inputs, target, conv.inputs[0].name, geometry, weight.astype(np.float64),
                           bias.astype(np.float64), DEFAULT_RIDGE)  # fmt: skip
    set_weights(graph, conv, fit.weight, fit.bias)
    return Refit(conv.name, fit.residual, fit.prior_residual)


def matrix_prior(node: gs.Node) -> tuple[np.ndarray, bool]:
    """θ₀ (K + 1, M) of a Gemm (alpha and beta folded in) or MatMul, and whether it has a bias to fit."""
    b = const_value(node.inputs[1]).astype(np.float64)
    if node.op == "MatMul":
        return np.vstack([b, np.zeros((1, b.shape[1]))]), False
    b = (b.T if node.attrs.get("transB", 0) else b) * node.attrs.get("alpha", 1.0)
    c = const_value(node.inputs[2]).astype(np.float64) if len(node.inputs) > 2 and node.inputs[2].name else 0.0
    bias = np.broadcast_to(np.ravel(c) * node.attrs.get("beta", 1.0), (b.shape[1],))  # C: scalar, [M] or [1, M]
    return np.vstack([b, bias[None]]), True


def refit_matrix(graph: gs.Graph, node: gs.Node, inputs: list[np.ndarray], target: ls.TargetRows) -> Refit:
    """Gemm/MatMul reading [N, K]: every row of every sample is a row of the system."""
    prior, has_bias = matrix_prior(node)
    equations = ls.NormalEquations(prior.shape[0] - 1, prior.shape[1])
    for x, ((_, _, y),) in zip(inputs, target.per_sample):
        equations.add(x.astype(np.float64), y)
    target.per_sample.clear()
    theta, gram_theta = equations.solve(DEFAULT_RIDGE, prior, bias=has_bias)
    if node.op == "MatMul":
        dtype = const_value(node.inputs[1]).dtype
        node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name}_refit_weight"), theta[:-1].astype(dtype))
    else:
        node.attrs.update(alpha=1.0, beta=1.0)
        set_weights(graph, node, theta[:-1].T if node.attrs.get("transB", 0) else theta[:-1], theta[-1])
    return Refit(node.name, equations.residual(theta, gram_theta), equations.residual(prior))


def refit_consumers(
    graph: gs.Graph,
    consumers: Iterable[gs.Node],
    out_keep: Mapping[str, np.ndarray],
    reference: onnx.ModelProto,
    feeds: Feeds,
    ctx: PassContext,
    positions: int = 0,
) -> list[Refit]:
    """Refit each consumer in graph order, reading the pruned graph as it is then (module docstring), in
    one sequential pass: the original runs once per sample for every consumer's targets, and the pruned
    graph runs segment by segment up to each consumer after the ones before it were refitted.

    `out_keep`: output tensor → the kept channels, for consumers whose own output group was pruned.
    `positions`: a conv's output positions sampled per image (0: `_reconstruct.fit_rows` spread over the samples)."""
    stable_toposort(graph)
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    ordered = sorted(consumers, key=lambda n: position[id(n)])
    targets = fit_targets(ordered, out_keep, ctx.seed, positions)
    ls.reference_rows(reference, targets, feeds)
    pruned = ls.SequentialRun(graph, ctx.template, feeds)
    done = []
    for node, target in zip(ordered, targets):
        inputs = [values[node.inputs[0].name] for values in pruned.advance(node)]
        refit = refit_conv if node.op == "Conv" else refit_matrix
        done.append(refit(graph, node, inputs, target))  # frees the target's rows
    return done


# -- the whole rewrite ------------------------------------------------------------------------------


def calibration_feeds(ctx: PassContext, owner: str) -> list[dict[str, np.ndarray]]:
    if ctx.calibration:
        return ls.split_samples(ctx.calibration, FIT_SAMPLES)
    ctx.warnings.append(
        f"{owner}: no calibration data; channels were chosen and consumers refitted on {RANDOM_SAMPLES} seeded "
        "random (standard normal) inputs, which real inputs may not resemble: give calibration data (--calib)"
    )
    return ls.split_samples(random_calibration(ctx.template, ctx.input_shapes, RANDOM_SAMPLES, ctx.seed))


def prune(graph: gs.Graph, prunings: Sequence[Pruning], ctx: PassContext, settings: PruneSettings) -> dict[str, float]:
    """Choose each pruning's channels, remove the others from its groups, refit the consumers (docstring)."""
    nodes = node_labels(graph)
    needs_data = settings.importance == "activation" or settings.refit
    feeds = calibration_feeds(ctx, settings.owner) if needs_data else []
    reference = to_model(graph.copy(), ctx.template) if needs_data else None  # the function to keep
    touched = {g.id: g for p in prunings for g in (p.group, *p.within)}
    readers = dict.fromkeys(label for g in touched.values() for label in g.consumers)
    covariance = None
    if settings.importance == "activation":
        covariance = covariances(reference, list(dict.fromkeys(nodes[r].inputs[0].name for r in readers)), feeds)
    keep = {p.group.id: select_channels(selection_terms(p, nodes, covariance), p.group.channels, p.target)
            for p in prunings}  # fmt: skip
    for group in touched.values():
        select = partial(kept, segments=group.segments, keep=keep)
        rewrite_group(graph, nodes, group, kept_count(group, keep), select, "pruned")
    stats = {
        "groups_pruned": float(len(prunings)),
        "channels_removed": float(sum(p.group.channels - p.target for p in prunings)),
    }
    if settings.refit and readers:
        out_keep = {m: keep[p.group.id] for p in prunings for m in p.group.members}
        refits = refit_consumers(graph, [nodes[r] for r in readers], out_keep, reference, feeds, ctx,
                                 settings.positions)
        stats.update(
            consumers_refitted=float(len(refits)),
            calibration_samples=float(len(feeds)),
            # ‖fit − y‖²/‖y‖² on the rows fitted, at the worst consumer; the same for plain truncation
            fit_residual_max=max(r.residual for r in refits),
            truncation_residual_max=max(r.truncation_residual for r in refits),
        )
    return stats

"""The search space: for every site the model offers, the choices of every pass, built from (model, target).

The reference work's central lesson is curation: on an accelerator the cost landscape is rocky, so a
curated space offers only choices aligned to the target's parallelism factor (PF) — depthwise convs
kept, regrouped with PF or PF/2 channels per group, or made dense; channel groups padded to a
multiple of PF or left; each exact fusion taken or not; each transposed conv whose kernel equals its
stride rewritten as a 1×1 conv and a DepthToSpace or not; Fused-MBConv per expand pattern when drift is
allowed; cross-layer equalization (one global choice) when the candidates will be quantized. The
uncurated space offers every group size that divides the channel count and every power-of-two multiple
for padding, for comparison.

Given the target's latency model (`latency`), the curated space leaves out the Fused-MBConv sites whose
fusion alone the model estimates no faster than the graph without it (a K×K dense conv holds about
K²·C_out/(C_out + K²) times the expand and depthwise convs' MACs: on wide blocks the fusion only costs),
each listed in `skipped` with both estimates. Such a site can only slow a candidate down and lose
accuracy, and its least-squares fit is the costliest part of a candidate (C_in·K² + 1 weights per
output channel: 4,801 on PP-OCRv4 det's 192-channel 5×5 blocks); the uncurated space keeps them.

Given `latency`, the space also records `fastest`: for every exact decision, its choice estimated fastest
when taken alone, where that beats the graph without it (a seed: on PP-OCRv4 det at 640², npu-32x32, those
choices together cut 40 % where the reference work's expert recipe, which pads and regroups every site
whether it pays on the target or not, cuts 19 %).

A candidate is one choice per decision (the first choice of each decision changes nothing). It
compiles to a pipeline string whose site selectors name the anchor node of each site (`sites=@name`),
so the pipeline stays valid whatever the earlier steps did to the site numbering.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from hwnas.errors import BadInputError
from hwnas.graph.gsgraph import to_model
from hwnas.graph.shapes import tensor_shapes
from hwnas.passes.base import PassContext
from hwnas.passes.manager import PassManager
from hwnas.passes.pipeline import parse_pipeline
from hwnas.passes.registry import get_pass
from hwnas.search.forked import map_forked

KEEP = "keep"
PREFIX = "fold-bn,fold-affine,fold-constants,flush-denormals"  # exact clean-ups every candidate starts from
# the reference work's "handful of multipliers"; channel counts round to the PF (uncurated: to 1)
CURATED_MULTIPLIERS = ("0.75", "0.6", "0.5", "0.4")
SAFE_NAME = re.compile(r"^[^,{}=;\s]+$")  # names the pipeline grammar can carry in a selector


@dataclass(frozen=True)
class Decision:
    """One site and what may be done there. `choices[0]` is always "keep" (leave the site as it is)."""

    key: str
    kind: str  # "depth" (global multiplier), "dw", "align", "fuse", "deconv", "mbconv", "equalize" (global)
    anchor: str
    choices: tuple[str, ...]
    channels: int = 0
    position: float = 0.0  # 0 = first site of its kind in the graph, 1 = last: what recipes transfer by
    resolution: int = 0  # output height of the site's conv (stage), 0 where unknown


@dataclass(frozen=True)
class SpaceOptions:
    parallelism_factor: int
    curated: bool = True
    allow_reconstructed: bool = False
    quantized: bool = False  # every candidate will be quantized: equalization becomes a choice


@dataclass
class SearchSpace:
    decisions: list[Decision]
    options: SpaceOptions
    skipped: list[str] = field(default_factory=list)  # sites left out, with the reason
    # a non-uniform depth choice → (multiplier, round_to, the channel groups' site anchors it scales so), one
    # triple per scale-depth step it compiles to (hwnas.search.sensitivity)
    depth_sites: dict[str, tuple[tuple[str, int, tuple[str, ...]], ...]] = field(default_factory=dict)
    fastest: dict[str, str] = field(default_factory=dict)  # exact decision → its choice estimated fastest alone
    # depthwise decision → the align decision of its channel group (a group size may divide only the padded count)
    pad_for: dict[str, str] = field(default_factory=dict)

    def size(self) -> float:
        return math.prod(len(d.choices) for d in self.decisions)

    def baseline(self) -> dict[str, str]:
        return {d.key: KEEP for d in self.decisions}

    def compile(self, candidate: Mapping[str, str]) -> str:
        """The pipeline (without the exact prefix) that applies `candidate`'s choices."""
        by_step: dict[str, list[str]] = {}
        for d in self.decisions:
            choice = candidate.get(d.key, KEEP)
            if choice == KEEP:
                continue
            if d.kind == "depth" and choice in self.depth_sites:  # one scale-depth step per multiplier and rounding
                for multiplier, round_to, anchors in self.depth_sites[choice]:
                    by_step[_step_for("depth", f"m{multiplier}r{round_to}")] = list(anchors)
                continue
            by_step.setdefault(_step_for(d.kind, choice), []).append(d.anchor)
        order = sorted(by_step, key=_step_order)
        return ",".join(_with_sites(step, by_step[step]) for step in order)


def _with_sites(step: str, anchors: list[str]) -> str:
    if anchors == [""]:  # a global decision: the pass runs everywhere
        return step
    sites = f"sites={';'.join('@' + a for a in anchors)}"
    return step.replace("}", f",{sites}}}") if step.endswith("}") else f"{step}{{{sites}}}"


def _step_for(kind: str, choice: str) -> str:
    if kind == "depth":  # "m0.75r32": multiplier 0.75, channel counts rounded to 32
        multiplier, round_to = choice.removeprefix("m").split("r")
        return f"scale-depth{{multiplier={multiplier},round_to={round_to}}}"
    if kind == "align":
        return f"align-channels{{multiple={choice.removeprefix('pad')},mode=pad}}"
    if kind == "fuse":
        return "fuse-ibn{mode=linear}"
    if kind == "mbconv":
        return "fuse-ibn{mode=mbconv}"
    if kind == "deconv":
        return "deconv-to-conv"
    if kind == "equalize":
        return "equalize"
    if choice == "dense":
        return "replace-conv{mode=dense}"
    return f"replace-conv{{mode=grouped,group_size={choice.removeprefix('g')}}}"


def _step_order(step: str) -> tuple:
    """Pad first (regrouping needs the padded counts; grouped convs block channel groups), then fuse, then
    regroup and rewrite transposed convs; equalize last, on the convs as they will be quantized."""
    rank = {"scale-depth": -1, "align-channels": 0, "fuse-ibn{mode=linear": 1, "fuse-ibn{mode=mbconv": 2,
            "replace-conv": 3, "deconv-to-conv": 3, "equalize": 4}
    return next(v for k, v in rank.items() if step.startswith(k)), step


def build_space(graph: gs.Graph, ctx: PassContext, options: SpaceOptions,
                latency: Callable[[gs.Graph], float] | None = None) -> SearchSpace:
    """Every decision the passes offer on `graph` (already through the exact prefix); `latency` (a graph's
    estimated latency on the target) lets the curated space leave out fusions that do not pay alone."""
    pf = options.parallelism_factor
    space = SearchSpace([], options)
    shapes = tensor_shapes(to_model(graph.copy(), ctx.template), ctx.input_shapes)
    nodes = {n.name: n for n in graph.nodes}
    align_sites = _applicable(graph, ctx, "align-channels", multiple=pf, mode="pad")
    padded = {}  # conv name -> its group's channel count once padded to PF
    for site in align_sites:
        for name in site.nodes:
            padded[name] = math.ceil(site.data.group.channels / pf) * pf
    multiples = [pf] if options.curated else [m for m in (2, 4, 8, 16, 32, 64) if m <= 2 * pf]
    _add(space, "align", align_sites, lambda s: tuple(f"pad{m}" for m in multiples), lambda s: s.data.group.channels, nodes, shapes)

    dw_sites = _applicable(graph, ctx, "replace-conv", mode="dense")
    group_of = {name: f"align:{site.nodes[0]}" for site in align_sites for name in site.nodes}
    space.pad_for = {f"dw:{s.nodes[0]}": group_of[s.nodes[0]] for s in dw_sites if s.nodes[0] in group_of}

    def dw_choices(site) -> tuple[str, ...]:
        c = _conv_channels(nodes[site.nodes[0]])
        reachable = {c, padded.get(site.nodes[0], c)}
        if options.curated:
            sizes = [g for g in (pf, pf // 2) if g > 1 and any(n % g == 0 and n > g for n in reachable)]
        else:
            sizes = [g for g in range(2, max(reachable)) if any(n % g == 0 for n in reachable)]
        return tuple(f"g{g}" for g in sizes) + ("dense",)

    _add(space, "dw", dw_sites, dw_choices, lambda s: _conv_channels(nodes[s.nodes[0]]), nodes, shapes)
    fuse_sites = _applicable(graph, ctx, "fuse-ibn", mode="linear")
    _add(space, "fuse", fuse_sites, lambda s: ("fuse",), lambda s: 0, nodes, shapes)
    if options.allow_reconstructed and _offers(graph, ctx, "scale-depth"):
        if options.curated:
            choices = tuple(f"m{m}r{pf}" for m in CURATED_MULTIPLIERS)
        else:
            choices = tuple(f"m{m / 20:g}r1" for m in range(8, 20))
        space.decisions.insert(0, Decision("depth:model", "depth", "", (KEEP, *choices)))
    if options.allow_reconstructed and _offers(graph, ctx, "fuse-ibn", mode="mbconv"):
        mb_sites = _applicable(graph, ctx, "fuse-ibn", mode="mbconv")
        if options.curated and latency is not None:
            mb_sites = _paying_alone(graph, ctx, space, mb_sites, latency)
        _add(space, "mbconv", mb_sites, lambda s: ("fuse",), lambda s: 0, nodes, shapes)
    _add(space, "deconv", _applicable(graph, ctx, "deconv-to-conv"), lambda s: ("conv",), lambda s: 0, nodes, shapes)
    if options.quantized and _applicable(graph, ctx, "equalize"):
        space.decisions.append(Decision("equalize:model", "equalize", "", (KEEP, "equalize")))
    if latency is not None:
        space.fastest = _fastest_alone(graph, ctx, space, latency)
    return space


EXACT_KINDS = ("align", "dw", "fuse", "deconv")


def _fastest_alone(graph: gs.Graph, ctx: PassContext, space: SearchSpace,
                   latency: Callable[[gs.Graph], float]) -> dict[str, str]:
    """For each exact decision, the choice whose pipeline alone `latency` estimates fastest, where faster
    than `graph` (module docstring)."""
    before = latency(graph)
    alone = [(d.key, choice) for d in space.decisions if d.kind in EXACT_KINDS for choice in d.choices[1:]]
    timed: dict[str, list[tuple[float, str]]] = {}
    for (key, choice), estimate in zip(alone, latencies_alone(graph, ctx, latency, [space.compile({k: c}) for k, c in alone])):
        timed.setdefault(key, []).append((estimate, choice))
    fastest = {}
    for key, estimates in timed.items():
        best, choice = min(estimates)
        if best < before:
            fastest[key] = choice
    return fastest


def latencies_alone(graph: gs.Graph, ctx: PassContext, latency: Callable[[gs.Graph], float],
                    pipelines: list[str]) -> list[float]:
    """`latency` of `graph` through each of `pipelines`; each independent of the others, so spread over the
    cores (during setup no worker has a job yet)."""
    return map_forked(lambda p: latency(PassManager(parse_pipeline(p), in_place=True).run(graph.copy(), ctx).graph),
                      pipelines)


def _paying_alone(graph: gs.Graph, ctx: PassContext, space: SearchSpace, sites: list,
                  latency: Callable[[gs.Graph], float]) -> list:
    """The Fused-MBConv sites whose fusion alone (weights composed: the latency does not depend on them)
    the estimate says is faster than `graph`; the others go to `space.skipped` with both estimates."""
    before = latency(graph)
    kept = []
    fused_alone = [f"fuse-ibn{{mode=mbconv,fit=compose,sites=@{site.nodes[0]}}}" for site in sites]
    for site, after in zip(sites, latencies_alone(graph, ctx, latency, fused_alone)):
        if after < before:
            kept.append(site)
        else:
            space.skipped.append(f"mbconv site at {site.nodes[0]!r}: fused alone it is estimated no faster "
                                 f"({before:.4g} ms → {after:.4g} ms)")
    return kept


def _offers(graph: gs.Graph, ctx: PassContext, pass_name: str, **options) -> bool:
    """Whether the pass exists with these options (reconstructed modes arrive in later versions)."""
    try:
        get_pass(pass_name)(**options)
    except BadInputError:
        return False
    return True


def _applicable(graph: gs.Graph, ctx: PassContext, pass_name: str, **options):
    the_pass = get_pass(pass_name)(**options)
    return [s for s in the_pass.match(graph, ctx) if s.applicable and s.nodes]


def _add(space: SearchSpace, kind: str, sites, choices, channels, nodes: Mapping[str, gs.Node], shapes: Mapping) -> None:
    usable = [s for s in sites if SAFE_NAME.match(s.nodes[0])]
    space.skipped += [f"{kind} site at {s.nodes[0]!r}: its name cannot be written in a pipeline selector"
                      for s in sites if not SAFE_NAME.match(s.nodes[0])]
    for i, site in enumerate(usable):
        options = choices(site)
        if not options:
            continue
        space.decisions.append(Decision(
            key=f"{kind}:{site.nodes[0]}", kind=kind, anchor=site.nodes[0], choices=(KEEP, *options),
            channels=channels(site) or 0, position=i / max(len(usable) - 1, 1),
            resolution=_resolution(site.nodes[0], nodes, shapes),
        ))


def _conv_channels(conv: gs.Node) -> int:
    return int(conv.inputs[1].shape[0])


def _resolution(anchor: str, nodes: Mapping[str, gs.Node], shapes: Mapping) -> int:
    """Output height at the site's anchor node (its stage), 0 where unknown."""
    node = nodes.get(anchor)
    shape = shapes.get(node.outputs[0].name) if node is not None else None
    return int(shape[2]) if shape and len(shape) > 2 else 0

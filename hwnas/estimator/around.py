"""Profiling around a model: its own kernels timed in context, and samples shaped like the kernels it gets wrong.

`hwnas profile --target T --around MODEL.onnx` estimates MODEL with T's estimator. On a measured target (`context`
mode) it also times MODEL itself as a profiling network is timed (each kernel in context) and adds those kernels as
samples. The kernels to sample around are those the estimate flags `in_distribution: false` and, where MODEL was
timed, those whose estimate is more than `MISPREDICTED` off their time in it. Each becomes a profiling unit of the
same shape (in `kernel` mode a one-kernel model, in `context` mode a block at the head of a random network,
`networks.py`); `budget` perturbations of them are measured (channel counts ±1…±PF, sizes ±25 %, as adaptive
sampling does), and the estimator is refitted on its own measurements plus the new ones. A kernel that no profiling
unit can express yet (a MatMul with batch rows in `kernel` mode, a Split into three) is listed with the reason, not
sampled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from hwnas.estimator.estimator import LatencyEstimator, Sample
from hwnas.estimator.networks import MAX_TOKENS, UPSAMPLES, BlockConfig, KernelConfig
from hwnas.estimator.profile import Quantizer, default_mode, make_sampler
from hwnas.graph.shapes import Shape
from hwnas.targets.base import Target
from hwnas.targets.kernels import Kernel, decompose, interpolation_of

_ELEMENTWISE = ("Add", "Mul", "Relu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid")
_POOLS = ("GlobalAveragePool", "MaxPool", "AveragePool")


# An in-distribution kernel whose estimate is this far from its time in the model (either way) is sampled around
# too: inside the profiled ranges the trees can still miss a family the random networks rarely draw (ShuffleNet's
# unaligned 1x1 convs between Split and Concat, +30 % on a Xeon without AMX). A kernel off by less than MODEL_SHARE
# of the model's time is left alone: tiny kernels' ratios are mostly noise, and move no total.
MISPREDICTED = 0.25
MODEL_SHARE = 0.005
# The model's own kernels are the samples that count most for it, and one timing of them moves with a shared
# machine: each kernel's time is the median of this many (estimator-history.md, stop 45).
MODEL_LOOKS = 3


@dataclass
class AroundReport:
    outside: list[str] = field(default_factory=list)  # the model's kernels outside the distribution
    # in-distribution kernels estimated more than MISPREDICTED off their time in the model: name -> (measured, estimated) ms
    mispredicted: dict[str, tuple[float, float]] = field(default_factory=dict)
    sampled: list[str] = field(default_factory=list)  # those profiling units were made for
    skipped: dict[str, str] = field(default_factory=dict)  # kernel -> why no unit expresses it
    model_kernels: int = 0  # the model's own kernels timed in context and added (context mode)
    measurements: int = 0  # every sample added: the model's kernels and the perturbations around them
    mode: str = "kernel"


def _image_input(kernel: Kernel) -> tuple[int, int] | None:
    """(channels, height) of a kernel's NCHW square-ish input, or None."""
    if not kernel.input_shapes or len(kernel.input_shapes[0]) != 4:
        return None
    _, c, h, _ = kernel.input_shapes[0]
    return int(c), int(h)


def kernel_unit(kernel: Kernel) -> KernelConfig | str:
    """A one-kernel profiling model shaped like `kernel`, or why there is none."""
    if kernel.kind == "gemm":
        if kernel.gemm is None or kernel.gemm.p != 1:
            return "a GEMM with several rows (batched MatMul): no profiling unit has one yet"
        return KernelConfig("gemm", kernel.c_in, kernel.c_out, 1)
    image = _image_input(kernel)
    if image is None:
        return f"a {kernel.op} on a {len(kernel.input_shapes[0]) if kernel.input_shapes else 0}-d input: profiling units take NCHW images"
    c, h = image
    if kernel.kind in ("conv", "dwconv"):
        if kernel.kernel_h != kernel.kernel_w:
            return "a non-square conv kernel"
        if kernel.kind == "dwconv":
            return KernelConfig("dwconv", c, c, h, kernel.kernel_h, kernel.stride_h)
        if kernel.groups > 1:
            return KernelConfig("grouped", c, kernel.c_out, h, kernel.kernel_h, kernel.stride_h, c // kernel.groups)
        return KernelConfig("conv", c, kernel.c_out, h, kernel.kernel_h, kernel.stride_h)
    if kernel.kind == "deconv":
        return KernelConfig("deconv", c, kernel.c_out, h, kernel.kernel_h, 2)
    if kernel.kind == "elementwise" and kernel.op in _ELEMENTWISE:
        return KernelConfig("elementwise", c, c, h, op=kernel.op)
    if kernel.kind == "pool" and kernel.op in _POOLS:
        return KernelConfig("pool", c, c, h, op=kernel.op)
    if kernel.kind == "resize":
        return KernelConfig("resize", c, c, h, op="nearest")
    if kernel.op in ("Transpose", "Softmax"):
        return KernelConfig("other", c, c, h, op="Softmax:last" if kernel.op == "Softmax" and kernel.inner == 1 else kernel.op)
    return f"a {kernel.op} ({kernel.kind}): no profiling unit builds this op yet"


def _attention_unit(kernel: Kernel) -> tuple[BlockConfig, int, int] | str | None:
    """An attention block (`networks._attention`) whose tokens, width and heads match a kernel of one: a
    MatMul with rows (a projection, or per head Q·Kᵀ / scores·V), a Softmax over scores, a LayerNorm over
    tokens. None for other kernels; the reason where the tokens do not make the square map the block needs."""
    shape = kernel.input_shapes[0] if kernel.input_shapes else ()
    g = kernel.gemm
    if kernel.op == "MatMul" and g is not None and g.p > 1:
        d = g.n if g.k == g.p and g.groups > 1 else g.k  # scores·V reduces over the tokens, Q·Kᵀ over d
        tokens, heads, c = g.p, g.groups, g.groups * d
    elif kernel.op == "Softmax" and len(shape) == 4 and shape[2] == shape[3]:
        tokens, heads, c = shape[2], shape[1], max(8, 32 * shape[1])  # the scores do not say the width
    elif kernel.op == "LayerNormalization" and len(shape) == 3:
        tokens, heads, c = shape[1], 1, shape[2]
    else:
        return None
    h = math.isqrt(tokens)
    if h * h != tokens or tokens > MAX_TOKENS:
        return f"a {kernel.op} over {tokens} tokens: attention blocks take square maps of at most {MAX_TOKENS} tokens"
    # a LayerNorm kernel of several ops is the decomposed chain (`patterns`): the block writes it so too
    layer_norm = "decomposed_ln" if kernel.op == "LayerNormalization" and len(kernel.ops) > 1 else "layernorm"
    return BlockConfig("attention", c, groups=heads, hidden=2 * c, act="gelu", op=layer_norm), c, h


def _channel_unit(kernel: Kernel) -> tuple[BlockConfig, int, int] | str | None:
    """The split or shuffle block of a channel Split into two, a channel Concat of two, or a channel shuffle's
    5-d Transpose ((N, g, C/g, H, W) -> (N, C/g, g, H, W)) on a square map; None for other kernels."""
    shapes = [*kernel.input_shapes, *kernel.output_shapes]
    if kernel.op == "Transpose" and len(shapes) == 2 and len(shapes[0]) == 5:
        (n, g, per, h, w), out = shapes
        if tuple(out) != (n, per, g, h, w):
            return "a 5-d Transpose other than a channel shuffle's: no profiling unit builds it"
        return (BlockConfig("shuffle", g * per, groups=g), g * per, h) if h == w else "a channel shuffle on a non-square map"
    if kernel.op not in ("Split", "Concat"):
        return None
    parts = kernel.output_shapes if kernel.op == "Split" else kernel.input_shapes
    whole = kernel.input_shapes[0] if kernel.op == "Split" else kernel.output_shapes[0]
    if len(parts) != 2 or any(len(x) != 4 or x[2:] != whole[2:] for x in parts) or whole[2] != whole[3]:
        return f"a {kernel.op} other than of two parts along the channels of a square map: no profiling unit builds it"
    # the split block: the first part bypasses, the rest goes through a 1x1 conv, then both are concatenated
    return BlockConfig("split", whole[1], 1, hidden=parts[0][1], act="relu", op="dense"), whole[1], whole[2]


def block_unit(kernel: Kernel) -> tuple[BlockConfig, int, int] | str:
    """A random-network block (and its input channels, size) shaped like `kernel`, or why there is none."""
    for unit in (_attention_unit(kernel), _channel_unit(kernel)):
        if unit is not None:
            return unit
    image = _image_input(kernel)
    if kernel.op == "Gelu" and image is not None:  # the exporters' chain after a 1x1 conv (no anchor absorbs it)
        return BlockConfig("conv", image[0], 1, act="gelu", bn=False), *image
    unit = kernel_unit(kernel)
    if isinstance(unit, str):
        return unit
    c, h, k, s = unit.c_in, unit.size, unit.kernel, unit.stride
    blocks = {
        "conv": lambda: BlockConfig("conv", unit.c_out, k, s, act="none", bn=False),
        "dwconv": lambda: BlockConfig("dwsep", c, k, s, act="relu"),
        "grouped": lambda: BlockConfig("grouped", unit.c_out, k, s, group_size=unit.group_size, act="none"),
        "deconv": lambda: BlockConfig("deconv", unit.c_out, k, 2, act="none") if k in (2, 3, 4) else None,
        "gemm": lambda: BlockConfig("head", unit.c_out, op="classifier", act="none"),
        "pool": lambda: BlockConfig("pool", c, op=unit.op) if unit.op != "GlobalAveragePool" else None,
        "resize": lambda: _upsample(kernel, c),
    }
    block = blocks.get(unit.kind, lambda: None)()
    if block is None:
        return f"a {kernel.op} ({kernel.kind}) in context: no random-network block builds it alone"
    return block, c, h


def _upsample(kernel: Kernel, c: int) -> BlockConfig | None:
    """An upsample block of the Resize's interpolation and integer factor, if the vocabulary has them."""
    forms = {interpolation_of(onnx.helper.make_node("Resize", ["x"], ["y"], **attrs)): form for form, attrs in UPSAMPLES.items()}
    form = forms.get(kernel.interpolation)
    (_, _, h_in, *_), (_, _, h_out, *_) = kernel.input_shapes[0], kernel.output_shapes[0]
    if kernel.op != "Resize" or form is None or h_out % h_in or h_out // h_in < 2:
        return None
    return BlockConfig("upsample", c, op=form, scale=h_out // h_in, act="none")


def _median_sample(sampler, model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> list[Sample]:
    """`model`'s kernels timed in context `MODEL_LOOKS` times: each kernel's median time, and the plain runs' median."""
    looks = [sampler.measure_model(model, shapes) for _ in range(MODEL_LOOKS)]
    times: dict[str, list[float]] = {}
    for sample in (s for look in looks for s in look):
        times.setdefault(sample.kernel.name, []).append(sample.latency_ms)
    first = looks[0]
    network_ms = float(np.median([look[0].network_ms for look in looks if look])) if first else None
    return [Sample(s.kernel, float(np.median(times[s.kernel.name])), network_ms=network_ms) for s in first]


def profile_around(target: Target, estimator: LatencyEstimator, model: onnx.ModelProto, shapes: Mapping[str, Shape],
                   budget: int, seed: int = 0, progress: Callable[[int], None] | None = None,
                   mode: str | None = None, quiet_gate: bool = False,
                   quantize: Quantizer | None = None) -> tuple[LatencyEstimator, AroundReport]:
    """`estimator` refitted with `model`'s own kernels timed in context (`context` mode) and `budget` measurements
    around its kernels outside the distribution or, where it was timed, estimated more than `MISPREDICTED` off (and
    by more than `MODEL_SHARE` of the model's time). `quiet_gate`: each measurement waits out a neighbour's burst
    (`QuietGate`, measured targets). In `context` mode an int8 kernel (of a QDQ model) is sampled around in networks
    quantized by `quantize`, and not at all without one."""
    mode = mode or default_mode(target)
    report = AroundReport(mode=mode)
    kernels = decompose(model, shapes, estimator.rules)
    sampler = make_sampler(target, estimator.rules, seed, mode, quiet_gate=quiet_gate)
    own = _median_sample(sampler, model, shapes) if mode == "context" else []
    measured = {s.kernel.name: s.latency_ms for s in own}
    model_ms = sum(measured.values())
    report.model_kernels = len(own)
    origins = []
    for kernel, e in zip(kernels, estimator.predict_kernels(kernels)):
        if e.kind == "free":
            continue
        time_in_model = measured.get(e.name, 0.0)
        if not e.in_distribution:
            report.outside.append(e.name)
        elif time_in_model > 0 and abs(e.latency_ms - time_in_model) > max(MISPREDICTED * time_in_model,
                                                                           MODEL_SHARE * model_ms):
            report.mispredicted[e.name] = (time_in_model, e.latency_ms)
        else:
            continue
        in_int8 = mode == "context" and kernel.int8  # its unit runs quantized, like the profile's int8 networks
        if in_int8 and quantize is None:
            unit = "an int8 kernel: no quantizer was given for its profiling networks"
        else:
            unit = block_unit(kernel) if mode == "context" else kernel_unit(kernel)
        if isinstance(unit, str):
            report.skipped[e.name] = unit
        else:
            report.sampled.append(e.name)
            origins.append((unit, in_int8))
    samplers = {False: sampler}
    if any(in_int8 for _, in_int8 in origins):
        samplers[True] = make_sampler(target, estimator.rules, seed, mode, quantize=quantize, int8_every=1,
                                      quiet_gate=quiet_gate)
    new: list[Sample] = []
    i = 0
    while origins and len(new) < budget and i < 20 * budget:
        unit, in_int8 = origins[i % len(origins)]
        got = [s for _, s in samplers[in_int8].around(unit)][: budget - len(new)]
        # a network index of this run would collide with the stored ones' (`per_kernel_offset`)
        new += [Sample(s.kernel, s.latency_ms, network_ms=s.network_ms) for s in got]
        if progress and got:
            progress(len(got))
        i += 1
    report.measurements = len(own) + len(new)
    if not report.measurements:
        return estimator, report
    refit = estimator.refitted(estimator.samples_ + own + new)
    refit.target_config["profiled_around"] = refit.target_config.get("profiled_around", []) + [
        {"kernels": report.sampled, "model_kernels": report.model_kernels, "measurements": report.measurements,
         "mode": mode, "seed": seed}]
    return refit, report

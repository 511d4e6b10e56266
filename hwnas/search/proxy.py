"""Zero-shot trainability proxy: NASWOT (Mellor et al., 2021, "Neural Architecture Search without Training").

The reference work's zero-shot search never trains a candidate: it ranks architectures by a score computed
from their topology and non-linearities at initialisation. NASWOT is that score. For a minibatch of N
inputs, every rectifier-like unit of the network is on (1) or off (0) for each input, which gives each
input a binary code c_i over all N_A units. With H the Hamming distance,

    K_H[i, j] = N_A − H(c_i, c_j)        (the number of units on which inputs i and j agree)
    score     = log |det K_H|            (numpy's slogdet)

A network whose units carve the inputs into distinct linear regions gives codes far apart, K_H close to
diagonal and a high score; one that maps inputs to the same region gives near-equal rows and a low one.
Accumulated per activation as C·Cᵀ + (1 − C)·(1 − C)ᵀ (agreements on and off), one activation at a time.

The code of a unit is "its output > 0". For every activation kind in `SIGN_PRESERVING` that is exactly
"its pre-activation > 0" (ReLU, ReLU6, hard-swish in any exported form, SiLU, GELU, leaky ReLU, ...),
which is the paper's ReLU code. Gates whose output is always positive (sigmoid, hard-sigmoid, softplus)
and clips with unknown bounds carry no such code and are left out.

The score judges a candidate's *architecture*, for users who will train it: so the weights are drawn
afresh (seeded) before scoring. The trained weights would bias it — a rewrite that keeps the function
(regrouping a depthwise conv, zero-padding channels) would score the same as the original although it
offers more capacity to train, and fitted weights would reward the fit rather than the structure. Conv,
Gemm and MatMul weights get He-normal values (std √(2 / fan-in)) and zero biases; BatchNormalization
becomes the identity (scale 1, bias 0, mean 0, variance 1). Other constants (activation bounds, shapes,
per-channel affine factors) are kept: they cannot be told apart from fixed parts of the architecture.

A sample is one forward pass at the analysis shapes (batch 1 for the usual model): N seeded
standard-normal inputs, or the first N samples of user data (one array per input name, samples first).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from hwnas.errors import BadInputError
from hwnas.graph.activations import match_activation
from hwnas.graph.gsgraph import to_graph, to_model
from hwnas.graph.session import make_session, random_feeds, run
from hwnas.graph.shapes import Shape
from hwnas.passes.pipeline import PassSpec, Pipeline, parse_pipeline

# Activation kinds (hwnas.graph.activations) whose output is positive exactly where their input is.
SIGN_PRESERVING = frozenset({
    "relu", "relu6", "hardswish", "hardswish_decomposed", "hardsigmoid_mul", "silu", "gelu", "mish",
    "leaky_relu", "prelu", "elu", "selu", "celu", "tanh",
})  # fmt: skip
_WEIGHTED = {"Conv": 1, "Gemm": 1, "MatMul": 1}  # op -> index of the weight input
_BN_IDENTITY = {1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0}  # BatchNormalization input index -> value


@dataclass(frozen=True)
class NaswotProxy:
    """`proxy(model)` is `naswot_score(model, shapes, ...)`: the form a search's scorer holds.

    One seed for every candidate of a search: all are scored on the same inputs, so their scores differ by
    their architectures, not by the draw of inputs.
    """

    shapes: Mapping[str, Shape]
    batch: int = 16
    seed: int = 0

    def __call__(self, model: onnx.ModelProto) -> float:
        return naswot_score(model, self.shapes, self.batch, self.seed)


def architecture_only(pipeline: str) -> str:
    """The same architecture without fitting weights to data: seconds less per Fused-MBConv block or pruned model.

    For whatever ignores weight values: the proxy, which draws its own, and the latency estimator.
    Fused-MBConv composes its weights (`fit=compose`); scale-depth keeps the channels with the largest
    weights and does not refit (the same channel counts either way).
    """
    return str(Pipeline(tuple(_unfitted(step) for step in parse_pipeline(pipeline).steps)))


def _unfitted(step: PassSpec) -> PassSpec:
    options = dict(step.options)
    if step.name == "fuse-ibn" and options.get("mode") == "mbconv":
        for fitting_only in ("refit_project", "lambda"):
            options.pop(fitting_only, None)
        options["fit"] = "compose"
    elif step.name == "scale-depth":
        options.update(importance="weight", refit="false")
    return PassSpec(step.name, tuple(options.items()))


def naswot_score(
    model: onnx.ModelProto,
    shapes: Mapping[str, Shape],
    batch: int = 16,
    seed: int = 0,
    inputs: Mapping[str, np.ndarray] | None = None,
) -> float:
    """log |det K_H| of the re-initialised model over `batch` inputs (−inf when two inputs share a code)."""
    if batch < 2:
        raise BadInputError(f"the NASWOT score needs a batch of at least 2 inputs, got {batch}")
    probe, units = _probe_model(model, seed)
    if not units:
        raise BadInputError("the NASWOT score needs rectifier-like activations (ReLU, ReLU6, hard-swish, ...); the model has none")
    session = make_session(probe)
    names = [o.name for o in session.get_outputs()]
    wanted = [names.index(u) for u in units]
    runs = [run(session, sample) for sample in _samples(model, shapes, batch, seed, inputs)]
    return _log_det_kernel([[outputs[i] for i in wanted] for outputs in runs])


def _probe_model(model: onnx.ModelProto, seed: int) -> tuple[onnx.ModelProto, list[str]]:
    """A copy with fresh weights whose outputs include every sign-preserving activation's output."""
    graph = to_graph(model)
    reinitialise(graph, seed)
    units = _activation_outputs(graph)
    known = {t.name for t in graph.outputs}
    tensors = graph.tensors()
    dtype = next((t.dtype for t in graph.inputs if t.dtype is not None), np.float32)
    for name in units:
        tensor = tensors[name]
        if name not in known:
            tensor.dtype = tensor.dtype or dtype
            graph.outputs.append(tensor)
    return to_model(graph, model), units


def reinitialise(graph: gs.Graph, seed: int) -> None:
    """He-normal weights and zero biases for Conv/Gemm/MatMul, identity BatchNormalization (seeded, in place)."""
    rng = np.random.default_rng(seed)
    done: set[int] = set()
    for node in graph.nodes:
        if node.op in _WEIGHTED:
            weight = node.inputs[_WEIGHTED[node.op]]
            if isinstance(weight, gs.Constant) and id(weight) not in done and weight.values.ndim >= 2:
                shape = weight.values.shape
                std = np.sqrt(2.0 / _fan_in(node, shape))
                weight.values = (rng.standard_normal(shape) * std).astype(weight.values.dtype)
                done.add(id(weight))
            if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
                node.inputs[2].values = np.zeros_like(node.inputs[2].values)
        elif node.op == "BatchNormalization":
            for index, value in _BN_IDENTITY.items():
                if index < len(node.inputs) and isinstance(node.inputs[index], gs.Constant):
                    node.inputs[index].values = np.full_like(node.inputs[index].values, value)


def _fan_in(node: gs.Node, shape: tuple[int, ...]) -> int:
    if node.op == "Conv":
        return int(np.prod(shape[1:]))  # (C_out, C_in / group, kernel...)
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return shape[1]  # B is (N, K)
    return shape[-2]  # Gemm B (K, N), MatMul (..., K, N)


def _activation_outputs(graph: gs.Graph) -> list[str]:
    """Outputs of the sign-preserving activations, in graph order."""
    found: dict[str, None] = {}
    for tensor in [*graph.inputs, *(t for node in graph.nodes for t in node.outputs)]:
        match = match_activation(graph, tensor)
        if match is not None and match.kind in SIGN_PRESERVING:
            found[match.output] = None
    return list(found)


def _samples(model: onnx.ModelProto, shapes: Mapping[str, Shape], batch: int, seed: int,
             inputs: Mapping[str, np.ndarray] | None) -> list[Mapping[str, np.ndarray]]:
    if inputs is None:
        return [random_feeds(model, shapes, seed + i) for i in range(batch)]
    count = min(len(v) for v in inputs.values()) if inputs else 0
    if count < 2:
        raise BadInputError(f"the NASWOT score needs at least 2 input samples, got {count}")
    return [{name: values[i : i + 1] for name, values in inputs.items()} for i in range(min(batch, count))]


def _log_det_kernel(activations_per_sample: list[list[np.ndarray]]) -> float:
    """log |det K_H| from each sample's activation outputs (same list of tensors for every sample)."""
    n = len(activations_per_sample)
    kernel = np.zeros((n, n))
    for layer in zip(*activations_per_sample):
        codes = np.stack([a.reshape(-1) > 0 for a in layer]).astype(np.float32)  # exact below 2²⁴ units per activation
        on = codes.sum(axis=1, dtype=np.float64)
        # agreements = both on + both off = C·Cᵀ + (units − on_i − on_j + C·Cᵀ), one product instead of two
        kernel += 2.0 * (codes @ codes.T) + codes.shape[1] - on[:, None] - on[None, :]
    sign, logdet = np.linalg.slogdet(kernel)
    return float(logdet) if sign != 0 else float("-inf")

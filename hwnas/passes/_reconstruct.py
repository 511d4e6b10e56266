"""Least-squares helpers shared by the reconstructed passes: activations from ORT, im2col, ridge solves.

A reconstructed pass replaces part of a graph by a conv whose weights it fits so that, on calibration
inputs, the conv's output matches a tensor of a reference model. The pieces:

- `activation_model` / `iter_activations`: run a model in ONNX Runtime on calibration samples, one
  sample at a time, and hand back chosen intermediate tensors. The model is copied, its outputs are
  replaced by the requested tensors and the nodes they do not need are dropped, so collecting an early
  tensor costs only the early part of the network.
- `im2col_rows`: the K×K input patches of a conv at a set of output positions, one row per position,
  laid out like the conv weight (`W[o].reshape(-1)` is one row's dot partner).
- `NormalEquations`: accumulates AᵀA, AᵀY and ΣY² over batches of rows (A gets a trailing ones
  column for the bias), so memory is F² + F·M floats (F = C·kh·kw + 1 inputs per output channel,
  M output channels) whatever the number of rows.
- `reference_rows` / `fit_conv_rows`: the targets of many fits drawn in one run of the reference model
  (only the sampled rows kept), then each fit from its inputs as a sequential run computes them.
- `fit_conv`: the whole fit of one group-1 conv from a tensor of one model to a tensor of another.
- `FitCache` / `upstream_keys`: fits already made in this process, by what determines them (the part of
  the graph upstream of the fit's target, which fits are made in it, the options and the calibration
  data), so that search candidates sharing a pipeline prefix share its fits (see `FitCache`).
- `SequentialRun`: runs a graph that is being refitted segment by segment, one sample at a time, keeping
  only the tensors later nodes read: fitting L layers one after the other (each reading what the layers
  before it compute *after* their refits) costs one forward pass in all, not one per layer.

The solve is ridge regression towards a prior (the weights we would use without data):

    W = argmin ‖A·W − Y‖² + μ·‖W − W₀‖²  ⇔  (AᵀA + μI)·W = AᵀY + μ·W₀,   μ = λ · tr(AᵀA) / F

λ is relative to the mean diagonal of AᵀA, so one value suits layers of any scale: λ → 0 is plain least
squares, λ → ∞ keeps W₀. The design matrix is the same for every output channel, so one factorisation
serves all of them: every output channel is solved in one call (one Cholesky factorisation: AᵀA + μI is
symmetric positive definite), and the fit's residual needs no further F²·M product.

Rows are a random subset of output positions (seeded), spread evenly over the calibration samples:
`fit_rows(F)` of them, i.e. 4·F clamped to [8192, 32768], or every position when there are fewer. A
pass's `positions=N` option samples N positions per image instead (He et al. 2017 sample a few per
image): fewer rows cost less im2col and AᵀA work; the forward runs are the same.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import scipy.linalg
from onnx import helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from hwnas.errors import BadInputError
from hwnas.graph.gsgraph import const_value
from hwnas.graph.session import make_session
from hwnas.graph.shapes import auto_pads
from hwnas.shared_folder import SharedFolder

MIN_ROWS, MAX_ROWS, ROWS_PER_WEIGHT = 8192, 32768, 4
MAX_FEATURES = 8192  # F above this: the normal matrix alone would exceed 512 MiB (float64)
_CHUNK_ROWS = 2048  # rows turned into float64 and multiplied at once


POSITIONS_DOC = (
    "output positions per calibration image each conv fit samples (0: 4·F rows per fit, F = weights per "
    "output channel, clamped to 8192..32768, spread over the samples)"
)


def check_positions(owner: str, positions: int) -> None:
    if positions < 0:
        raise BadInputError(f"pass '{owner}': option positions={positions} must be >= 0")


def fit_rows(features: int) -> int:
    """How many rows (output positions) a fit with `features` inputs per output channel samples."""
    return int(min(max(ROWS_PER_WEIGHT * features, MIN_ROWS), MAX_ROWS))


# -- activations ------------------------------------------------------------------------------------


def activation_model(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose outputs are the tensors `names` (float), pruned to the nodes they need."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    declared = list(graph.input) + list(graph.output) + list(graph.value_info)
    elem = {v.name: v.type.tensor_type.elem_type for v in declared}
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(n, elem.get(n, onnx.TensorProto.FLOAT), None) for n in names)
    subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if not any(a.type in subgraphs for n in graph.node for a in n.attribute):  # If/Loop bodies: keep all
        needed, kept = set(names), []
        for node in reversed(graph.node):
            if needed.intersection(node.output):
                kept.append(node)
                needed.update(i for i in node.input if i)
        del graph.node[:]
        graph.node.extend(reversed(kept))
        used = {i for n in graph.node for i in n.input} | set(names)
        initializers = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(initializers)
    return out


def split_samples(calibration: Mapping[str, np.ndarray], limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """Calibration arrays (samples on axis 0) as a list of one-sample feeds, at most `limit` of them."""
    count = len(next(iter(calibration.values())))
    if limit is not None:
        count = min(count, limit)
    return [{k: np.ascontiguousarray(v[i : i + 1]) for k, v in calibration.items()} for i in range(count)]


def iter_activations(
    model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]
) -> Iterator[dict[str, np.ndarray]]:
    """For each feed, the tensors `names` of `model` as ONNX Runtime (optimizations off) computes them."""
    session = make_session(activation_model(model, names))
    inputs = {i.name for i in session.get_inputs()}
    for feed in feeds:
        values = session.run(list(names), {k: v for k, v in feed.items() if k in inputs})
        yield dict(zip(names, values))


def collect_activations(
    model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """`iter_activations` concatenated along axis 0 (for small tensors; fits stream instead)."""
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for values in iter_activations(model, names, feeds):
        for n in names:
            parts[n].append(values[n])
    return {n: np.concatenate(v) for n, v in parts.items()}


# -- conv geometry and patches ----------------------------------------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """The spatial attributes of a 2-D conv; `auto_pad` other than NOTSET overrides `pads`."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    auto_pad: str = "NOTSET"

    @classmethod
    def from_attrs(cls, attrs: Mapping, kernel: tuple[int, int]) -> ConvGeometry:
        auto_pad = attrs.get("auto_pad", "NOTSET")
        return cls(
            kernel=tuple(kernel),
            strides=tuple(attrs.get("strides", (1, 1))),
            dilations=tuple(attrs.get("dilations", (1, 1))),
            pads=tuple(attrs.get("pads", (0, 0, 0, 0))),
            auto_pad=auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad,
        )

    def resolved_pads(self, height: int, width: int) -> tuple[int, int, int, int]:
        axes = [auto_pads(self.auto_pad, size, k, s, d)
                for size, k, s, d in zip((height, width), self.kernel, self.strides, self.dilations)]
        if axes[0] is None:
            return self.pads
        return (axes[0][0], axes[1][0], axes[0][1], axes[1][1])

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        top, left, bottom, right = self.resolved_pads(height, width)
        sizes = []
        for axis, size in enumerate((height, width)):
            k, s, d = self.kernel[axis], self.strides[axis], self.dilations[axis]
            padded = size + (top, left)[axis] + (bottom, right)[axis]
            sizes.append((padded - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]


def im2col_rows(x: np.ndarray, geometry: ConvGeometry, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Patches of `x` (C, H, W) under the conv at output positions (rows[i], cols[i]): (R, C·kh·kw)."""
    channels, height, width = x.shape
    top, left, bottom, right = geometry.resolved_pads(height, width)
    padded = np.pad(x, ((0, 0), (top, bottom), (left, right)))
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.strides, geometry.dilations
    r = rows[:, None] * sh + np.arange(kh)[None, :] * dh  # (R, kh)
    c = cols[:, None] * sw + np.arange(kw)[None, :] * dw  # (R, kw)
    patches = padded[:, r[:, :, None], c[:, None, :]]  # (C, R, kh, kw)
    return patches.transpose(1, 0, 2, 3).reshape(len(rows), channels * kh * kw)


def sample_positions(height: int, width: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct output positions (all of them when there are fewer), uniformly at random."""
    total = height * width
    flat = np.arange(total) if count >= total else np.sort(rng.choice(total, size=count, replace=False))
    return flat // width, flat % width


# -- normal equations and the ridge solve -----------------------------------------------------------


class NormalEquations:
    """Running AᵀA, AᵀY and ΣY² (A with a ones column appended for the bias)."""

    def __init__(self, features: int, outputs: int):
        self.gram = np.zeros((features + 1, features + 1))
        self.cross = np.zeros((features + 1, outputs))
        self.target_energy = 0.0
        self.rows = 0

    def add(self, a: np.ndarray, y: np.ndarray) -> None:
        """Rows `a` (R, F) with targets `y` (R, M)."""
        for start in range(0, len(a), _CHUNK_ROWS):
            chunk = np.empty((min(_CHUNK_ROWS, len(a) - start), a.shape[1] + 1))
            chunk[:, :-1] = a[start : start + len(chunk)]
            chunk[:, -1] = 1.0
            target = y[start : start + len(chunk)].astype(np.float64)
            self.gram += chunk.T @ chunk
            self.cross += chunk.T @ target
            self.target_energy += float(np.sum(target * target))
        self.rows += len(a)

    def residual(self, theta: np.ndarray, gram_theta: np.ndarray | None = None) -> float:
        """‖A·θ − Y‖² / ‖Y‖² for stacked weights-and-bias θ (F + 1, M), from the accumulated sums
        (`gram_theta`: AᵀA·θ when the caller has it, which saves an F²·M product)."""
        gram_theta = self.gram @ theta if gram_theta is None else gram_theta
        error = np.sum(theta * gram_theta) - 2 * np.sum(theta * self.cross) + self.target_energy
        return float(max(error, 0.0) / max(self.target_energy, 1e-30))

    def solve(self, ridge: float, prior: np.ndarray, bias: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(AᵀA + μI)·θ = AᵀY + μ·θ₀ with μ = ridge · mean(diag AᵀA); θ is (F + 1, M). Returns θ and AᵀA·θ.

        `bias=False` fits the weights alone (an op with nowhere to put a bias: MatMul); θ's last row is 0."""
        scale = float(np.trace(self.gram)) / len(self.gram)
        mu = ridge * max(scale, 1e-30)
        kept = slice(None) if bias else slice(0, -1)
        system = self.gram[kept, kept] + mu * np.eye(len(self.gram[kept]))
        theta = np.zeros_like(self.cross)
        rhs = self.cross[kept] + mu * prior[kept]
        try:  # every output channel in one call; the system is symmetric positive definite: one Cholesky
            theta[kept] = scipy.linalg.solve(system, rhs, assume_a="pos", check_finite=False)
        except np.linalg.LinAlgError:  # singular even with the ridge (ridge=0, too few rows)
            theta[kept] = np.linalg.lstsq(system, rhs, rcond=None)[0]
            return theta, self.gram @ theta
        gram_theta = np.zeros_like(theta)  # AᵀA·θ = AᵀY + μ·(θ₀ − θ) on the solved rows, with no product
        gram_theta[kept] = rhs - mu * theta[kept]
        if not bias:  # the bias row of AᵀA·θ was not in the system
            gram_theta[-1] = self.gram[-1, :-1] @ theta[:-1]
        return theta, gram_theta


def stack(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Conv weight (M, C, kh, kw) and bias (M,) as θ (C·kh·kw + 1, M)."""
    return np.concatenate([weight.reshape(len(weight), -1), bias.reshape(-1, 1)], axis=1).T.astype(np.float64)


def unstack(theta: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return theta[:-1].T.reshape(shape), theta[-1].copy()


# -- one conv fit -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvFit:
    weight: np.ndarray  # (M, C, kh, kw) float32
    bias: np.ndarray  # (M,) float32
    rows: int  # rows the system was built from
    residual: float  # ‖A·θ − Y‖² / ‖Y‖² of the fit, on the rows it was fitted on
    prior_residual: float  # the same for the prior (the weights before fitting)


def conv_fit_checks(source: str, target: str, geometry: ConvGeometry, xi: np.ndarray, yi_shape: tuple[int, ...],
                    out_channels: int, features: int) -> None:
    """Raise ValueError unless a conv of `geometry` reading one image `xi` (C, H, W) gives `yi_shape`."""
    expected = geometry.output_size(*xi.shape[1:])
    conv_like = expected == tuple(yi_shape[1:]) and yi_shape[0] == out_channels
    if not conv_like or xi.shape[0] * np.prod(geometry.kernel) != features:
        raise ValueError(
            f"fit {source} → {target}: shapes do not match a conv "
            f"({xi.shape} → {tuple(yi_shape)}, weight ({out_channels}, {features}))"
        )


def solved_conv(equations: NormalEquations, ridge: float, prior_weight: np.ndarray, prior_bias: np.ndarray) -> ConvFit:
    prior = stack(prior_weight, prior_bias)
    theta, gram_theta = equations.solve(ridge, prior)
    weight, bias = unstack(theta, prior_weight.shape)
    return ConvFit(
        weight.astype(np.float32), bias.astype(np.float32), equations.rows, equations.residual(theta, gram_theta),
        equations.residual(prior),
    )


# -- many fits from one run of the reference -----------------------------------------------------------


@dataclass
class TargetRows:
    """What the reference computes at one fit's target tensor, on the rows the fit uses: per sample, for a
    conv one (rows, cols, Y (R, M)) per image at positions drawn as `fit_conv` draws them (`features` =
    C·kh·kw + 1, rng seeded by `seed`), for a matrix op (`features` None) the whole [N, M] as (∅, ∅, Y)."""

    tensor: str
    features: int | None
    seed: int | Sequence[int]
    keep: np.ndarray | None = None  # match only these channels (the fitted op's outputs were pruned)
    positions: int = 0  # a conv's positions sampled per image; 0: `fit_rows(features)` spread over the samples
    per_sample: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = field(default_factory=list)


def reference_rows(reference: onnx.ModelProto, targets: Sequence[TargetRows], feeds: Sequence[Mapping]) -> None:
    """Fill every target's rows in one run of the reference per sample (not one run per fit)."""
    rngs = [np.random.default_rng(t.seed) for t in targets]
    names = list(dict.fromkeys(t.tensor for t in targets))
    for values in iter_activations(reference, names, feeds):
        for target, rng in zip(targets, rngs):
            y = values[target.tensor]
            y = y if target.keep is None else y[:, target.keep]
            if target.features is None:
                target.per_sample.append([(np.empty(0), np.empty(0), y)])
                continue
            per_sample = target.positions or math.ceil(fit_rows(target.features) / max(len(feeds), 1))
            images = []
            for yi in y:  # one image of the batch at a time
                rows, cols = sample_positions(*yi.shape[1:], per_sample, rng)
                images.append((rows, cols, yi[:, rows, cols].T))
            target.per_sample.append(images)


def fit_conv_rows(
    inputs: Iterable[np.ndarray], target: TargetRows, source: str, geometry: ConvGeometry, prior_weight: np.ndarray,
    prior_bias: np.ndarray, ridge: float,
) -> ConvFit:  # fmt: skip
    """`fit_conv` on inputs already computed (one array per sample, tensor `source`) and the target's rows;
    frees the rows once they are in the normal equations."""
    out_channels = prior_weight.shape[0]
    features = int(np.prod(prior_weight.shape[1:]))
    equations = NormalEquations(features, out_channels)
    for x, images in zip(inputs, target.per_sample):
        for xi, (rows, cols, y) in zip(x, images):
            full = (y.shape[1], *geometry.output_size(*xi.shape[1:]))
            conv_fit_checks(source, target.tensor, geometry, xi, full, out_channels, features)
            equations.add(im2col_rows(xi, geometry, rows, cols), y)
    target.per_sample.clear()
    return solved_conv(equations, ridge, prior_weight, prior_bias)


def fit_conv(
    source: onnx.ModelProto,
    source_tensor: str,
    target: onnx.ModelProto,
    target_tensor: str,
    geometry: ConvGeometry,
    prior_weight: np.ndarray,
    prior_bias: np.ndarray,
    feeds: Sequence[Mapping[str, np.ndarray]],
    ridge: float,
    seed: int | Sequence[int] = 0,
    target_channels: np.ndarray | None = None,
) -> ConvFit:
    """Weights of a group-1 conv reading `source_tensor` of `source` whose output best matches
    `target_tensor` of `target` on the feeds (ridge towards the prior; see the module docstring), each
    model run on its own: the one-fit form of `reference_rows` + `SequentialRun` + `fit_conv_rows`.

    `target_channels`: match only these channels of the target (the conv's outputs were pruned)."""
    rows = TargetRows(target_tensor, int(np.prod(prior_weight.shape[1:])) + 1, seed, target_channels)
    reference_rows(target, [rows], feeds)
    inputs = (values[source_tensor] for values in iter_activations(source, [source_tensor], feeds))  # streamed
    return fit_conv_rows(inputs, rows, source_tensor, geometry, prior_weight, prior_bias, ridge)


# -- one forward pass for many fits -------------------------------------------------------------------


class SequentialRun:
    """The tensors of a graph on each calibration sample, computed segment by segment as the graph changes.

    `advance(node)` runs the nodes not run yet that stand before `node`, as they are now, and returns each
    sample's values of the tensors computed so far; `node` itself runs in a later segment, so its weights
    may change in between. Values no node at or after the position reads any more are dropped, and nodes
    whose outputs nothing at or after it reads are not run (dead ones a rewrite left behind). Every node
    runs at most once per sample in all. `graph.nodes` must be in topological order; a caller that
    changes the list (a rewrite of nodes not run yet) calls `rewritten()` before the next `advance`.
    """

    def __init__(self, graph: gs.Graph, template: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]):
        self.graph = graph
        self.template = template
        self.values = [dict(feed) for feed in feeds]
        self.ran: set[int] = set()  # ids of the nodes run or passed over
        self.rewritten()

    def rewritten(self) -> None:
        """Index the node list as it is now: positions, each tensor's last reader, the first node not run."""
        nodes = self.graph.nodes
        self.position = {id(n): i for i, n in enumerate(nodes)}
        self.last_use: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for t in self._reads(node):
                self.last_use[t] = i
        self.done = next((i for i, n in enumerate(nodes) if id(n) not in self.ran), len(nodes))

    @staticmethod
    def _reads(node: gs.Node) -> list[str]:
        names = [t.name for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
        for sub in node.attrs.values():  # an If/Loop body may read outer tensors
            if isinstance(sub, gs.Graph):
                names += [n for n, t in sub._foreign_tensors().items() if not isinstance(t, gs.Constant)]
        return names

    def _needed(self, pending: list[gs.Node], end: int) -> list[gs.Node]:
        """The pending nodes whose outputs a node from `end` on reads, directly or through other pending ones."""
        needed, kept = {t for t, last in self.last_use.items() if last >= end}, []
        for node in reversed(pending):
            if any(t.name in needed for t in node.outputs):
                kept.append(node)
                needed.update(self._reads(node))
        return kept[::-1]

    def advance(self, node: gs.Node) -> list[dict[str, np.ndarray]]:
        end = self.position[id(node)]
        pending = [n for n in self.graph.nodes[self.done : end] if id(n) not in self.ran]
        segment = self._needed(pending, end)
        model, inputs, outputs = self._segment_model(segment, end)
        if outputs:  # else nothing from `end` on reads what the segment computes
            session = make_session(model)
            for values in self.values:
                computed = session.run(outputs, {name: values[name] for name in inputs})
                values.update(zip(outputs, computed))
                for name in [n for n in values if self.last_use.get(n, -1) < end]:
                    del values[name]  # nothing from `end` on reads it
        self.ran.update(id(n) for n in pending)
        self.done = max(self.done, end)
        return self.values

    def _segment_model(self, segment: list[gs.Node], end: int) -> tuple[onnx.ModelProto, list[str], list[str]]:
        produced = {t.name for n in segment for t in n.outputs if t.name}
        inputs = list(dict.fromkeys(t for n in segment for t in self._reads(n) if t not in produced))
        outputs = [t for t in dict.fromkeys(t.name for n in segment for t in n.outputs if t.name)
                   if self.last_use.get(t, -1) >= end]
        constants = {t.name: t for n in segment for t in n.inputs if isinstance(t, gs.Constant)}
        sample = self.values[0]
        graph = helper.make_graph(
            [OnnxExporter.export_node(n) for n in segment], "segment",
            [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(sample[name].dtype), None)
             for name in inputs],
            [helper.make_empty_tensor_value_info(name) for name in outputs],
            [OnnxExporter.export_tensor_proto(t) for t in constants.values()],
        )
        model = helper.make_model(graph, opset_imports=list(self.template.opset_import))
        model.ir_version = self.template.ir_version
        return model, inputs, outputs


# -- reuse across candidates -------------------------------------------------------------------------


class FitCache:
    """Fits made in this process (a search's worker), by a key naming everything a fit depends on.

    A search scores many candidates whose pipelines share a prefix: the same refits on the same upstream
    graph come back again and again. A fit is a function of the graph upstream of its target tensor as the
    pass found it (`upstream_keys`: every node, attribute and weight there, with which of those nodes the
    pass fits), of the pass's options and seed, and of the calibration samples; the key hashes all of
    them, so a hit returns exactly the fit a fresh run would make (bitwise: the same rows, the same solve).
    Entries are the fitted weights (float32), bounded by `limit_bytes` in all; the least recently used go
    first. `lookups` and `hits` count use; the search reports them.

    `shared`: a folder the search's worker processes share (set before they start); every fit made
    here is also written there (up to `limit_bytes` per process), and a fit not held here is read from
    there when another worker made it (counted in `shared_hits`, not `hits`), so a fit is made once per
    search rather than once per worker.
    """

    def __init__(self, limit_bytes: int = 256 << 20):
        self.limit_bytes = limit_bytes
        self.entries: dict[str, ConvFit] = {}  # in order of last use
        self.bytes = 0
        self.lookups = 0
        self.hits = 0
        self.shared_hits = 0
        self.shared: SharedFolder | None = None
        self.shared_bytes = 0  # fitted weights this process wrote to `shared`
        self._data: tuple[object, str] | None = None  # (calibration mapping, its digest): hashed once

    def data_key(self, source: object, feeds: Sequence[Mapping[str, np.ndarray]]) -> str:
        """Digest of the feeds a fit uses; `source` (the context's calibration) is hashed once per object."""
        if source is not None and self._data is not None and self._data[0] is source:
            return self._data[1]
        digest = hashlib.sha256()
        for feed in feeds:
            for name in sorted(feed):
                array = np.ascontiguousarray(feed[name])
                digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
                digest.update(array.tobytes())
        key = digest.hexdigest()
        if source is not None:
            self._data = (source, key)
        return key

    def get(self, key: str | None) -> ConvFit | None:
        if key is None:
            return None
        self.lookups += 1
        fit = self.entries.pop(key, None)
        if fit is not None:
            self.hits += 1
            self.entries[key] = fit  # most recently used last
        elif (fit := self._read(key)) is not None:
            self.shared_hits += 1
            self._hold(key, fit)
        return fit

    def put(self, key: str | None, fit: ConvFit) -> None:
        if key is None or key in self.entries:
            return
        self._hold(key, fit)
        size = fit.weight.nbytes + fit.bias.nbytes
        # each process writes at most `limit_bytes` there: the folder's disk use stays bounded as memory's is
        if self.shared is not None and self.shared_bytes + size <= self.limit_bytes:
            self.shared_bytes += size
            packed = io.BytesIO()
            np.savez(packed, weight=fit.weight, bias=fit.bias, rows=np.int64(fit.rows),
                     residuals=np.array([fit.residual, fit.prior_residual]))
            self.shared.put(key, packed.getvalue())

    def _hold(self, key: str, fit: ConvFit) -> None:
        size = fit.weight.nbytes + fit.bias.nbytes
        if size > self.limit_bytes:
            return
        while self.entries and self.bytes + size > self.limit_bytes:
            old = self.entries.pop(next(iter(self.entries)))
            self.bytes -= old.weight.nbytes + old.bias.nbytes
        self.entries[key] = fit
        self.bytes += size

    def _read(self, key: str) -> ConvFit | None:
        packed = self.shared.get(key) if self.shared is not None else None
        if packed is None:
            return None
        with np.load(io.BytesIO(packed), allow_pickle=False) as data:  # arrays, never code
            residual, prior = data["residuals"]
            return ConvFit(data["weight"], data["bias"], int(data["rows"]), float(residual), float(prior))


def _node_digest(node: gs.Node) -> bytes | None:
    """What a node computes: op, name, attributes, tensor names, constants' bytes (None: it has a subgraph)."""
    digest = hashlib.sha256(repr((node.op, node.domain, node.name, [t.name for t in node.inputs],
                                  [t.name for t in node.outputs])).encode())
    values = [(f"input {t.name}", const_value(t)) for t in node.inputs]
    for name, value in sorted(node.attrs.items()):
        if isinstance(value, gs.Graph) or (isinstance(value, list) and any(isinstance(v, gs.Graph) for v in value)):
            return None  # an If/Loop body: not hashed, never cached
        if isinstance(value, (gs.Constant, np.ndarray)):  # repr would elide a large array's middle
            values.append((f"attr {name}", const_value(value) if isinstance(value, gs.Constant) else value))
        else:
            digest.update(f"attr {name}={value!r}|".encode())
    for label, value in values:
        if value is not None:
            digest.update(f"{label}|{value.dtype}|{value.shape}|".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
    return digest.digest()


def upstream_keys(graph: gs.Graph, tensors: Mapping[object, str], marks: Mapping[int, str],
                  extra: str) -> dict[object, str | None]:
    """For each entry of `tensors` (key → tensor name), a digest of every node upstream of that tensor
    (`graph.nodes` in topological order), each with its mark (`marks`: id(node) → what the pass does
    there, e.g. which fit), and `extra` (options, seed, calibration digest); None where a node upstream
    has a subgraph."""
    producer = {t.name: i for i, n in enumerate(graph.nodes) for t in n.outputs}
    digests: dict[int, bytes | None] = {}
    keys = {}
    for key, name in tensors.items():
        needed, chain, hashable = {name}, [], True
        for i in range(producer.get(name, -1), -1, -1):
            node = graph.nodes[i]
            if not needed.intersection(t.name for t in node.outputs):
                continue
            if i not in digests:
                digests[i] = _node_digest(node)
            if digests[i] is None:
                hashable = False
                break
            chain.append(digests[i] + marks.get(id(node), "").encode())
            needed.update(t.name for t in node.inputs if not isinstance(t, gs.Constant))
        digest = hashlib.sha256(extra.encode())
        for part in reversed(chain):
            digest.update(part)
        keys[key] = digest.hexdigest() if hashable else None
    return keys

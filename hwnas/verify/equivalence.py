"""Is the rewritten model the same function as the original? ONNX Runtime decides.

Both models run in ORT with graph optimizations off on the same inputs: seeded random inputs at the
analysis shapes (or the user's calibration samples) and, where the original declares dynamic spatial
dims, at two more sizes, because an exact rewrite must be exact at every size the original accepts.

An output passes when every element satisfies |cand − ref| ≤ atol + rtol·|ref| (numpy `allclose`,
default atol 1e-4, rtol 1e-3). Per output we also report max abs error, max relative error and cosine
similarity, the drift measures for reconstructed rewrites.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from hwnas.errors import CheckFailedError
from hwnas.graph.io import graph_inputs
from hwnas.graph.session import make_session, random_feeds, run
from hwnas.graph.shapes import Shape, declared_dims
from hwnas.verify.calibration import held_out_feeds


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-4
    rtol: float = 1e-3


@dataclass(frozen=True)
class OutputComparison:
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    within_tolerance: bool


@dataclass
class VerificationReport:
    equivalent: bool
    tolerance: Tolerance
    outputs: list[OutputComparison]
    input_shapes: list[dict[str, Shape]]
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def cosine(self) -> float:
        """The worst output's; NaN when any output's is (min() would skip a NaN after a number)."""
        return min((o.cosine for o in self.outputs), key=lambda c: -math.inf if math.isnan(c) else c, default=1.0)

    def to_dict(self) -> dict:
        return {
            "equivalent": self.equivalent,
            "max_abs": self.max_abs,
            "cosine": self.cosine,
            "tolerance": asdict(self.tolerance),
            "outputs": [asdict(o) for o in self.outputs],
            "input_shapes": [{k: list(v) for k, v in s.items()} for s in self.input_shapes],
            "notes": self.notes,
        }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a64, b64) / (na * nb))


def worst_sample_drift(reference: list[np.ndarray], outputs: list[np.ndarray], samples: int) -> float:
    """1 − the smallest cosine of any output on any single sample, outputs joined per output as
    `run_per_sample` returns them: the measure verification judges a drift budget by (a cosine pooled
    over the samples lets one badly-off sample hide among good ones)."""
    return 1.0 - min(cosine(r, c) for ref, out in zip(reference, outputs)
                     for r, c in zip(np.split(ref, samples), np.split(out, samples)))


def compare_outputs(name: str, ref: np.ndarray, cand: np.ndarray, tol: Tolerance) -> OutputComparison:
    if ref.shape != cand.shape:
        return OutputComparison(name, float("inf"), float("inf"), 0.0, False)
    if not np.issubdtype(ref.dtype, np.floating):
        same = bool(np.array_equal(ref, cand))
        return OutputComparison(name, 0.0 if same else float("inf"), 0.0 if same else float("inf"), 1.0 if same else 0.0, same)
    diff = np.abs(cand.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max(initial=0.0))
    max_rel = float((diff / np.maximum(np.abs(ref.astype(np.float64)), 1e-12)).max(initial=0.0))
    ok = bool(np.allclose(cand, ref, atol=tol.atol, rtol=tol.rtol)) and bool(np.isfinite(cand).all() == np.isfinite(ref).all())
    return OutputComparison(name, max_abs, max_rel, cosine(ref, cand), ok)


def extra_sizes(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> list[dict[str, Shape]]:
    """Two more input sizes where the original declares dynamic spatial (non-batch) dims."""
    variants = []
    for factor in (0.75, 1.25):
        variant, changed = {}, False
        for value in graph_inputs(model):
            dims, base = declared_dims(value), list(shapes[value.name])
            for i, d in enumerate(dims):
                if i >= 2 and not isinstance(d, int):
                    step = 32 if base[i] % 32 == 0 else 1
                    base[i] = max(step, int(round(base[i] * factor / step)) * step)
                    changed = True
            variant[value.name] = tuple(base)
        if changed:
            variants.append(variant)
    return variants


def verify_equivalence(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    shapes: Mapping[str, Shape],
    calibration: Mapping[str, np.ndarray] | None = None,
    tolerance: Tolerance = Tolerance(),
    seed: int = 0,
    check_other_sizes: bool = True,
) -> VerificationReport:
    """Run both models on the same inputs and compare every output."""
    ref_session, cand_session = make_session(reference), make_session(candidate)
    output_names = [o.name for o in reference.graph.output]
    if [o.name for o in candidate.graph.output] != output_names:
        raise CheckFailedError("candidate model's outputs differ in names or order from the original's")
    feeds_list: list[dict[str, np.ndarray]] = []
    if calibration:
        count = len(next(iter(calibration.values())))
        feeds_list += [{k: v[i : i + 1] for k, v in calibration.items()} for i in range(min(count, 8))]
    else:
        feeds_list.append(held_out_feeds(reference, shapes, seed))
    notes = []
    if check_other_sizes:
        for variant in extra_sizes(reference, shapes):
            feeds = random_feeds(reference, variant, seed + 1)
            try:
                run(ref_session, feeds)
            except CheckFailedError:
                notes.append(f"the original does not run at {variant}; size skipped")
                continue
            feeds_list.append(feeds)
    per_output: dict[str, list[OutputComparison]] = {name: [] for name in output_names}
    used_shapes = []
    for feeds in feeds_list:
        used_shapes.append({k: tuple(v.shape) for k, v in feeds.items()})
        for name, r, c in zip(output_names, run(ref_session, feeds), run(cand_session, feeds)):
            per_output[name].append(compare_outputs(name, r, c, tolerance))
    outputs = [
        OutputComparison(
            name,
            max(c.max_abs for c in cmps),
            max(c.max_rel for c in cmps),
            min(c.cosine for c in cmps),
            all(c.within_tolerance for c in cmps),
        )
        for name, cmps in per_output.items()
    ]
    return VerificationReport(all(o.within_tolerance for o in outputs), tolerance, outputs, used_shapes, notes)


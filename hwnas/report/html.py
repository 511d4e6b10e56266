"""The HTML report of `optimize` (and `run`): one self-contained file that opens offline.

Input is the JSON report dict (docs/report-schema.md): `target`, `baseline` and `optimized` (estimate
objects: `latency_ms`, `params_bytes`, `peak_activation_bytes`, `kernels`, ...; model summaries:
`nodes`, `params`, `macs`), `latency_reduction`, `pipeline`, `exact`, `verification`, `search`,
`pareto`, `recipe`, `passes`, `warnings`. Every section is drawn only from the fields present, so a
`run` report (no search, no latency) renders too.

Sections: before/after summary; per-kernel latency before vs after on the target (top kernels by
latency, grouped bars) and latency by kernel kind; the search's Pareto front (latency vs drift and/or
memory, chosen point highlighted), its settings and its convergence (`search.best_so_far`); the
pipeline, its passes and the recipe; the verification table; warnings.

Self-contained: CSS inline, no scripts, no external fonts or images. Plots are SVG made by matplotlib
(a `Figure` saved straight to SVG: no pyplot, no global backend state; text as paths so no font is
needed), embedded inline with their element ids prefixed per plot so that they cannot collide.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
from pathlib import Path

from hwnas.gate import format_size
from hwnas.report.json_report import write_text_atomic

TOP_KERNELS = 15
BEFORE_COLOR, AFTER_COLOR, POINT_COLOR, CHOSEN_COLOR = "#9aa5b1", "#1f6fb4", "#7f8c99", "#d62728"

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: #1d2630; background: #fff; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 32px 0 8px;
     border-bottom: 2px solid #e3e8ee; padding-bottom: 4px; } h3 { font-size: 15px; margin: 18px 0 6px; }
.meta { color: #5b6773; margin: 0 0 12px; }
.headline { display: flex; gap: 16px; flex-wrap: wrap; margin: 16px 0; }
.card { border: 1px solid #dde3ea; border-radius: 8px; padding: 10px 16px; min-width: 150px; background: #f7f9fb; }
.card .v { font-size: 22px; font-weight: 600; } .card .k { color: #5b6773; font-size: 12px; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #e3e8ee; padding: 4px 12px; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; } th { background: #f1f4f7; font-weight: 600; }
td { white-space: nowrap; } td:first-child, td.text { white-space: normal; } th.text, td.text { text-align: left; } tr.chosen td { background: #fdecea; font-weight: 600; }
.good { color: #17803d; } .bad { color: #b42318; } .pass { color: #17803d; font-weight: 600; }
.fail { color: #b42318; font-weight: 600; }
code { overflow-wrap: anywhere; }
code, pre { font: 12.5px/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
pre { background: #f7f9fb; border: 1px solid #e3e8ee; padding: 10px; overflow-x: auto; }
figure { margin: 8px 0 16px; } figure svg { max-width: 100%; height: auto; }
figcaption { color: #5b6773; font-size: 12.5px; }
ul.warnings li { margin: 2px 0; } footer { color: #8a96a3; font-size: 12px; margin-top: 40px; }
"""


# ----------------------------------------------------------------------------------------- helpers

def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    return None


def _fmt_ms(v) -> str:
    return "–" if _num(v) is None else f"{v:.4f}"


def _fmt_int(v) -> str:
    return "–" if _num(v) is None else f"{int(v):,}"


def _fmt_bytes(v) -> str:
    return "–" if _num(v) is None else format_size(int(v))


def _fmt_float(v, digits: int = 4) -> str:
    if isinstance(v, str):
        return _e(v)  # "inf"/"nan" as the JSON writer spells them
    return "–" if _num(v) is None else f"{v:.{digits}g}"


def _change(before, after) -> str:
    b, a = _num(before), _num(after)
    if b is None or a is None or b == 0:
        return ""
    pct = (a - b) / b * 100
    css = "good" if pct < 0 else "bad" if pct > 0 else ""
    return f'<span class="{css}">{pct:+.1f}%</span>'


def _side(report: dict, key: str) -> dict:
    """baseline/optimized (an estimate object and/or a model summary), with FLOPs = 2·MACs when absent."""
    side = report.get(key)
    if not isinstance(side, dict):
        return {}
    merged = {k: v for k, v in side.items() if v is not None}
    if merged.get("flops") is None and _num(merged.get("macs")) is not None:
        merged["flops"] = 2 * merged["macs"]
    return merged


def _target_name(report: dict) -> str:
    target = report.get("target")
    if isinstance(target, dict):
        return str(target.get("name", ""))
    if target:
        return str(target)
    for key in ("optimized", "baseline"):
        side = report.get(key)
        if isinstance(side, dict) and isinstance(side.get("target"), str):
            return side["target"]
    return ""


def _table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None,
           text_columns: tuple[int, ...] = ()) -> str:
    """A table of already-escaped cells; `text_columns` are left-aligned (numbers align right)."""
    head = "".join(f'<th class="text">{h}</th>' if j in text_columns else f"<th>{h}</th>" for j, h in enumerate(header))
    body = []
    for i, row in enumerate(rows):
        css = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{css}>" + "".join(
            f'<td class="text">{c}</td>' if j in text_columns else f"<td>{c}</td>" for j, c in enumerate(row)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# ----------------------------------------------------------------------------------------- plots

def _svg(fig, plot_id: str) -> str:
    """The figure as inline SVG: no XML prolog, DOCTYPE or metadata; element ids prefixed by plot_id."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": plot_id, "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    text = re.sub(r'\bid="([^"]+)"', rf'id="{plot_id}-\1"', text)
    text = re.sub(r'href="#([^"]+)"', rf'href="#{plot_id}-\1"', text)
    text = re.sub(r"url\(#([^)]+)\)", rf"url(#{plot_id}-\1)", text)
    return text.replace("<svg ", f'<svg role="img" aria-label="{plot_id}" class="plot" data-plot="{plot_id}" ', 1)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    fig.patch.set_facecolor("white")
    return fig


def _kernel_latencies(side: dict) -> dict[str, tuple[float, str]]:
    out: dict[str, tuple[float, str]] = {}
    for k in side.get("kernels") or []:
        ms = _num(k.get("latency_ms")) if isinstance(k, dict) else None
        if ms is not None:
            name = str(k.get("name", "?"))
            prev = out.get(name, (0.0, ""))[0]
            out[name] = (prev + ms, str(k.get("kind") or k.get("op") or "?"))
    return out


def _kernel_plot(before: dict, after: dict, target: str) -> str | None:
    b, a = _kernel_latencies(before), _kernel_latencies(after)
    if not b and not a:
        return None
    names = sorted(set(b) | set(a), key=lambda n: -max(b.get(n, (0.0,))[0], a.get(n, (0.0,))[0]))[:TOP_KERNELS]
    names.reverse()  # largest at the top of a horizontal bar chart
    fig = _figure(9.5, 0.9 + 0.36 * len(names))
    ax = fig.add_subplot()
    ys = range(len(names))
    height = 0.4 if b and a else 0.7
    labels = [n if len(n) <= 42 else n[:20] + "…" + n[-21:] for n in names]
    if b:
        ax.barh([y + (height / 2 if a else 0) for y in ys], [b.get(n, (0.0,))[0] for n in names], height,
                color=BEFORE_COLOR, label="before")
    if a:
        ax.barh([y - (height / 2 if b else 0) for y in ys], [a.get(n, (0.0,))[0] for n in names], height,
                color=AFTER_COLOR, label="after")
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.set_xlabel(f"estimated latency on {target} (ms)" if target else "estimated latency (ms)")
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="lower right", frameon=False)
    fig.tight_layout()
    return _svg(fig, "kernels")


def _kind_plot(before: dict, after: dict, target: str) -> str | None:
    sides = [(label, side) for label, side in (("before", before), ("after", after)) if _kernel_latencies(side)]
    if not sides:
        return None
    totals: list[dict[str, float]] = []
    for _, side in sides:
        kinds: dict[str, float] = {}
        for ms, kind in _kernel_latencies(side).values():
            kinds[kind] = kinds.get(kind, 0.0) + ms
        totals.append(kinds)
    kinds = sorted({k for t in totals for k in t}, key=lambda k: -max(t.get(k, 0.0) for t in totals))
    fig = _figure(9.5, 0.9 + 0.45 * len(sides))
    ax = fig.add_subplot()
    colors = ["#1f6fb4", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"]
    for j, kind in enumerate(kinds):
        lefts = [sum(t.get(k, 0.0) for k in kinds[:j]) for t in totals]
        ax.barh(range(len(sides)), [t.get(kind, 0.0) for t in totals], 0.6, left=lefts,
                color=colors[j % len(colors)], label=kind)
    ax.set_yticks(range(len(sides)), [label for label, _ in sides])
    ax.invert_yaxis()
    ax.set_xlabel(f"estimated latency on {target} by kernel kind (ms)" if target else "latency by kernel kind (ms)")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=8,
              ncol=1 if len(kinds) <= 3 * len(sides) else 2)
    fig.tight_layout()
    return _svg(fig, "kinds")


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated points (lower latency, lower y), by latency."""
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def _pareto_plot(points: list[dict], baseline_ms: float | None) -> tuple[str, list[str]] | None:
    """The SVG and the names of what it plots against latency (drift and/or memory)."""
    axes = []
    if any(_num(p.get("drift")) is not None for p in points):
        axes.append(("drift", "drift"))
    if any(_num(p.get("memory_bytes")) is not None for p in points):
        axes.append(("memory_bytes", "memory"))  # the label gets its unit below
    usable = [p for p in points if _num(p.get("latency_ms")) is not None]
    if not axes or not usable:
        return None
    if len(axes) == 2 and all(not _num(p.get("drift")) for p in usable):
        axes = axes[1:]  # an exact search: every drift is 0, the memory view says more
    fig = _figure(9.5 if len(axes) == 1 else 11, 4.2)
    for i, (key, label) in enumerate(axes):
        ax = fig.add_subplot(1, len(axes), i + 1)
        scale = 1.0
        if key == "memory_bytes":  # plotted in the binary unit that suits the largest value
            largest = max((_num(p.get(key)) or 0.0) for p in usable)
            scale, unit = next(((1024.0**k, u) for k, u in ((3, "GiB"), (2, "MiB"), (1, "KiB")) if largest >= 1024.0**k),
                               (1.0, "bytes"))
            label = f"memory ({unit})"
        pts = [(p["latency_ms"], _num(p.get(key)) / scale) for p in usable if _num(p.get(key)) is not None]
        ax.scatter([x for x, _ in pts], [y for _, y in pts], s=22, color=POINT_COLOR, alpha=0.7, label="candidates",
                   zorder=2)
        front = _front(pts)
        if len(front) > 1:
            ax.step([x for x, _ in front], [y for _, y in front], where="post", color=AFTER_COLOR, lw=1.5,
                    label="Pareto front", zorder=3)
        chosen = [(p["latency_ms"], _num(p.get(key)) / scale) for p in usable
                  if p.get("chosen") and _num(p.get(key)) is not None]
        if chosen:
            ax.scatter([x for x, _ in chosen], [y for _, y in chosen], s=160, marker="*", color=CHOSEN_COLOR,
                       edgecolor="black", linewidth=0.6, label="chosen", zorder=4)
        if baseline_ms is not None:
            ax.axvline(baseline_ms, color="black", ls="--", lw=1, label="baseline latency", zorder=1)
        positive = [y for _, y in pts if y > 0]
        if key == "drift" and positive and max(positive) / min(positive) > 100:
            ax.set_yscale("symlog", linthresh=min(positive))
        ax.set_xlabel("estimated latency (ms)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return _svg(fig, "pareto"), [label for _, label in axes]


def _convergence_plot(curve: list, baseline_ms: float | None) -> str | None:
    """Best feasible estimated latency after each evaluation (`search.best_so_far`)."""
    ys = [_num(v) for v in curve]
    xs = [i + 1 for i, y in enumerate(ys) if y is not None]
    ys = [y for y in ys if y is not None]
    if len(ys) < 2:
        return None
    fig = _figure(9.5, 3.0)
    ax = fig.add_subplot()
    ax.step(xs, ys, where="post", color=AFTER_COLOR, lw=1.8, label="best feasible so far")
    if baseline_ms is not None:
        ax.axhline(baseline_ms, color="black", ls="--", lw=1, label="baseline")
    ax.set_xlabel("candidates evaluated")
    ax.set_ylabel("estimated latency (ms)")
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return _svg(fig, "convergence")


# ----------------------------------------------------------------------------------------- sections

_SUMMARY_ROWS = (
    ("estimated latency (ms)", "latency_ms", _fmt_ms),
    ("cycles", "cycles", _fmt_int),
    ("measured latency (ms)", "measured_ms", _fmt_ms),
    ("parameter bytes", "params_bytes", _fmt_bytes),
    ("parameters", "params", _fmt_int),
    ("peak activation bytes", "peak_activation_bytes", _fmt_bytes),
    ("MACs", "macs", _fmt_int),
    ("FLOPs", "flops", _fmt_int),
    ("nodes", "nodes", _fmt_int),
)


def _headline(report: dict, before: dict, after: dict, target: str) -> str:
    cards = []
    reduction = _num(report.get("latency_reduction"))
    if reduction is None and _num(before.get("latency_ms")) and _num(after.get("latency_ms")) is not None:
        reduction = 1 - after["latency_ms"] / before["latency_ms"]
    if reduction is not None:
        cards.append((f"{reduction * 100:.1f}%", f"latency reduction (estimated{', ' + target if target else ''})"))
    if _num(before.get("latency_ms")) is not None and _num(after.get("latency_ms")) is not None:
        cards.append((f"{before['latency_ms']:.3f} → {after['latency_ms']:.3f} ms", "estimated latency"))
    if "exact" in report:
        cards.append(("exact" if report["exact"] else report.get("exactness", "reconstructed"), "pipeline class"))
    verification = report.get("verification")
    if isinstance(verification, dict):
        ok = verification.get("equivalent")
        cards.append(("equivalent" if ok else f"cosine {_fmt_float(verification.get('cosine'), 8)}",
                      "verification (ONNX Runtime)"))
    elif "verification" in report:
        cards.append(("not verified", "verification"))
    holdout = report.get("holdout")
    if isinstance(holdout, dict):
        top1 = holdout.get("top1_agreement")
        cards.append((f"cosine {_fmt_float(holdout.get('cosine'), 4)}" + ("" if top1 is None else f", top-1 {top1:.3f}"),
                      f"held-out drift ({holdout.get('samples')} inputs)"))
    if not cards:
        return ""
    return '<div class="headline">' + "".join(
        f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>' for v, k in cards) + "</div>"


def _summary_section(report: dict, before: dict, after: dict, target: str) -> str:
    rows = []
    for label, key, fmt in _SUMMARY_ROWS:
        if before.get(key) is None and after.get(key) is None:
            continue
        rows.append([_e(label), fmt(before.get(key)), fmt(after.get(key)), _change(before.get(key), after.get(key))])
    if not rows:
        return ""
    note = (f'<p class="meta">Latency is the target\'s subgraph estimate on <b>{_e(target)}</b> '
            "(not a measurement unless a “measured” row is shown).</p>" if before.get("latency_ms") is not None else "")
    return (f'<section id="summary"><h2>Before / after</h2>{note}'
            + _table(["", "before", "after", "change"], rows) + "</section>")


def _latency_section(before: dict, after: dict, target: str) -> str:
    kernels = _kernel_plot(before, after, target)
    if kernels is None:
        return ""
    kinds = _kind_plot(before, after, target)
    parts = [f'<section id="latency"><h2>Per-layer latency on {_e(target) or "the target"}</h2>',
             f"<figure>{kernels}<figcaption>The {TOP_KERNELS} slowest kernels (fused units the target runs, "
             "named after their first node), before and after, by estimated latency.</figcaption></figure>"]
    if kinds:
        parts.append(f"<figure>{kinds}<figcaption>Estimated latency by kernel kind.</figcaption></figure>")
    return "".join(parts) + "</section>"


def _search_section(report: dict, before: dict) -> str:
    search, points = report.get("search"), report.get("pareto")
    if not isinstance(search, dict) and not points:
        return ""
    parts = ['<section id="search"><h2>Search</h2>']
    curve = None
    if isinstance(search, dict):
        rows = []
        for key, value in search.items():
            if isinstance(value, list) and len(value) > 8:  # a per-evaluation series: plotted, not listed
                curve = value if key == "best_so_far" else curve
                cell = f"{len(value)} values" + (" (plotted below)" if key == "best_so_far" else "")
            elif isinstance(value, (dict, list)):
                cell = _e(json.dumps(value))
            elif isinstance(value, float):
                cell = _fmt_float(value, 6)
            elif isinstance(value, int) and not isinstance(value, bool):
                cell = _fmt_int(value)
            else:
                cell = _e(value)
            rows.append([_e(key), cell])
        parts.append(_table(["setting", "value"], rows, text_columns=(1,)))
        if isinstance(search.get("best_so_far"), list):
            curve = search["best_so_far"]
    if isinstance(points, list) and points:
        plot = _pareto_plot([p for p in points if isinstance(p, dict)], _num(before.get("latency_ms")))
        parts.append('<h3 id="pareto">Pareto front</h3>')
        if plot:
            svg, against = plot
            parts.append(f"<figure>{svg}<figcaption>Candidates by estimated latency and {' and by '.join(against)}; "
                         "the line is the Pareto front, the star the chosen model, the dashed line the baseline's "
                         "latency.</figcaption></figure>")
        ordered = sorted((p for p in points if isinstance(p, dict)), key=lambda p: _num(p.get("latency_ms")) or math.inf)
        rows, classes = [], []
        for p in ordered[:25]:
            rows.append([_fmt_ms(p.get("latency_ms")), _fmt_float(p.get("drift")), _fmt_bytes(p.get("memory_bytes")),
                         f'<code>{_e(p.get("pipeline", ""))}</code>', "★" if p.get("chosen") else ""])
            classes.append("chosen" if p.get("chosen") else "")
        parts.append(_table(["latency (ms)", "drift", "memory", "pipeline", "chosen"], rows, classes, (3,)))
        if len(ordered) > 25:
            parts.append(f'<p class="meta">… and {len(ordered) - 25} more points in the JSON report.</p>')
    convergence = _convergence_plot(curve, _num(before.get("latency_ms"))) if curve else None
    if convergence:
        parts.append(f'<h3 id="convergence">Convergence</h3><figure>{convergence}<figcaption>Best estimated '
                     "latency among the candidates that meet the limits, after each evaluation.</figcaption></figure>")
    return "".join(parts) + "</section>"


def _pipeline_section(report: dict) -> str:
    pipeline, passes, recipe = report.get("pipeline"), report.get("passes"), report.get("recipe")
    if not pipeline and not passes and not recipe:
        return ""
    parts = ['<section id="pipeline"><h2>Pipeline and recipe</h2>']
    if pipeline:
        parts.append(f"<p>Pipeline: <code>{_e(pipeline)}</code></p>")
    if isinstance(passes, list) and passes:
        rows = []
        for p in passes:
            rows.append([f'<code>{_e(p.get("pass", "?"))}</code>', _e(p.get("exactness", "")),
                         f'{_fmt_int(p.get("sites_applied"))} / {_fmt_int(p.get("sites_applicable"))}',
                         _fmt_int(len(p.get("skipped") or [])),
                         f'{_fmt_int(p.get("nodes_before"))} → {_fmt_int(p.get("nodes_after"))}',
                         _fmt_float(p.get("seconds"), 3)])
        parts.append(_table(["pass", "class", "sites rewritten", "skipped", "nodes", "seconds"], rows, text_columns=(1,)))
    if recipe:
        text = recipe if isinstance(recipe, str) else json.dumps(recipe, indent=2)
        lines = text.count("\n") + 1
        parts.append(f"<h3>Recipe</h3><details{' open' if lines <= 30 else ''}><summary>recipe JSON ({lines} lines; "
                     f"replay with <code>hwnas run IN -o OUT --recipe R.json</code>)</summary><pre>{_e(text)}</pre></details>")
    return "".join(parts) + "</section>"


def _verification_section(report: dict) -> str:
    if "verification" not in report:
        return ""
    v = report["verification"]
    head = '<section id="verification"><h2>Verification</h2>'
    if not isinstance(v, dict):
        return head + '<p class="fail">Not verified: the output was not checked with ONNX Runtime.</p></section>'
    verdict = '<span class="pass">equivalent</span>' if v.get("equivalent") else '<span class="fail">not equivalent</span>'
    tol = v.get("tolerance") or {}
    tol_text = f" at atol {_fmt_float(tol.get('atol'))} + rtol {_fmt_float(tol.get('rtol'))}·|ref|" if tol else ""
    parts = [head, f"<p>ONNX Runtime, original vs optimized: {verdict}{_e(tol_text)}; max abs "
             f"{_fmt_float(v.get('max_abs'))}, min cosine {_fmt_float(v.get('cosine'), 10)}.</p>"]
    outputs = v.get("outputs") or []
    if outputs:
        rows = [[f"<code>{_e(o.get('name', '?'))}</code>", _fmt_float(o.get("max_abs")), _fmt_float(o.get("max_rel")),
                 _fmt_float(o.get("cosine"), 10),
                 '<span class="pass">yes</span>' if o.get("within_tolerance") else '<span class="fail">no</span>']
                for o in outputs if isinstance(o, dict)]
        parts.append(_table(["output", "max abs", "max rel", "cosine", "within tolerance"], rows))
    extra = {k: val for k, val in v.items() if k not in {"equivalent", "max_abs", "cosine", "tolerance", "outputs"}}
    shapes = extra.pop("input_shapes", None)
    if shapes:
        sizes = "; ".join(", ".join(f"{k}: {'x'.join(map(str, s))}" for k, s in d.items()) for d in shapes)
        parts.append(f'<p class="meta">Input shapes checked: {_e(sizes)}</p>')
    for note in extra.pop("notes", None) or []:
        parts.append(f'<p class="meta">{_e(note)}</p>')
    if extra:
        parts.append(_table(["field", "value"], [[_e(k), _e(json.dumps(val))] for k, val in extra.items()],
                            text_columns=(1,)))
    return "".join(parts) + "</section>"


def _warnings_section(report: dict, before: dict, after: dict) -> str:
    """The report's own warnings, then the optimized model's estimate warnings, then the baseline's."""
    seen: set[str] = set()
    groups = []
    for title, source in (("", report.get("warnings")), ("Optimized model", after.get("warnings")),
                          ("Baseline model", before.get("warnings"))):
        fresh = [str(w) for w in source or [] if str(w) not in seen]
        seen.update(fresh)
        if fresh:
            heading = f"<h3>{_e(title)}</h3>" if title else ""
            groups.append(heading + '<ul class="warnings">' + "".join(f"<li>{_e(w)}</li>" for w in fresh) + "</ul>")
    if not groups:
        return ""
    return f'<section id="warnings"><h2>Warnings ({len(seen)})</h2>{"".join(groups)}</section>'


# ----------------------------------------------------------------------------------------- entry points

def render_html(report: dict) -> str:
    """The report as one self-contained HTML page (str)."""
    before, after = _side(report, "baseline"), _side(report, "optimized")
    target = _target_name(report)
    kind = "optimize" if report.get("search") or report.get("pareto") else "run" if report.get("passes") else "report"
    title = f"hwnas {kind} report" + (f" — {target}" if target else "")
    files = " → ".join(_e(report[k]) for k in ("input", "output") if report.get(k))
    meta = [x for x in (files, f"target <b>{_e(target)}</b>" if target else "",
                        f"schema {report['schema_version']}" if "schema_version" in report else "") if x]
    body = [
        f"<header><h1>{_e(title)}</h1><p class=\"meta\">{' · '.join(meta)}</p></header>",
        _headline(report, before, after, target),
        _summary_section(report, before, after, target),
        _latency_section(before, after, target),
        _search_section(report, before),
        _pipeline_section(report),
        _verification_section(report),
        _warnings_section(report, before, after),
        "<footer>Generated by hwnas. Self-contained: no scripts, no external resources.</footer>",
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body><main>\n"
            + "\n".join(part for part in body if part) + "\n</main></body></html>\n")


def write_html(path: str | os.PathLike, report: dict) -> Path:
    """Render and write atomically."""
    return write_text_atomic(path, render_html(report), ".html")

"""The search on the simulated accelerators: algorithms, curated vs uncurated convergence, and the reference
work's detector (Echo Show) and segmentation tables.

Latency is always the shipped npu-32x32 / npu-16x16 estimator's (simulated: for a seed the numbers
reproduce exactly on any machine); only wall times and candidates/s are measured.

1. **Algorithms**: `hwnas.api.optimize(model, target, exact=True, algorithm=A, trials=N, seed=0, workers=2)`
   for the zoo ibn-detector, mobilenetv2 and segmenter: latency reduction of the verified winner, search
   wall time, candidates evaluated, candidates/s.
2. **Curated vs uncurated convergence** (the reference work: curation "resulted in a faster convergence
   rate"): evolution over the exact decisions of each space, from the baseline alone (no expert seed, so
   that the space is what differs), seeds 0..S−1; best-so-far latency vs evaluations, a plot, and the
   evaluations each run needs to come within 1 % of the best latency *any* run of that model and target
   found (one shared reference), averaged over the seeds — a run that never gets there counts as its whole
   budget and the mean is printed as "≥". The same for `optimize`'s default (expert-seeded) search.
3. **Detector table** (the reference's Echo Show table: V1 = depth-multiplier search, V2 = fused-IBN search,
   V3 = both) and **segmentation candidates**. A depth multiplier is `scale-depth{multiplier=m,round_to=32}`
   over a curated handful of m (32: the PF of npu-32x32, a multiple of npu-16x16's). Fused-IBN search
   is hwnas's greedy descent (one decision at a time, from the best seed) over only the
   `fuse-ibn{mode=mbconv}` decisions — each is fuse-or-not, so one sweep tries every block; since a fused conv's estimated latency
   does not depend on its weights, candidates are scored with composed weights (`fit=compose`, cheap) and
   only the chosen ones are built for real (least-squares weights on 4 seeded random calibration inputs,
   `hwnas.api.run(..., allow_drift=...)`). V3 searches fusion on V1's model. Output drift = 1 − the smallest
   output cosine against the original on 8 held-out random inputs; the chosen candidate is the furthest
   step of the search's path (each improvement on the best so far) that stays within the drift budget,
   found by bisection. The zoo models have random weights, so "same mAP" cannot be asked:
   the budget is a stated drift instead.

4. **Long convergence** (`--sections convergence-long`, not in the default run: ~30 min): section 2 with
   enough evaluations to reach the reference (`--long-trials`, default 300, from the baseline;
   `--long-seeded-trials`, default 100, `optimize`'s expert-seeded default), seeds 0..S−1, every candidate
   scored in one process; evaluations to 1 % of the group's best and of one shared best (every run on the
   target).
5. **Greedy convergence** (`--sections convergence-greedy`, not in the default run: ~15 min): section 2
   with hwnas's greedy descent instead of evolution, from the baseline, the decisions in an order shuffled
   with the seed, up to `--greedy-trials` (800) candidates per run, seeds 0..S−1.
6. **Evolution vs random with reconstructed passes** (`--sections drift-search`, not in the default run:
   ~40 min): hwnas's search as `optimize(max_drift=X)` runs it (expert seeds, batch 8) over the curated space
   with scale-depth and Fused-MBConv allowed, drift limit `--drift-budget` (0.05) on 4 seeded random
   calibration inputs, `--drift-trials` (24) evaluations, seeds 0..S−1, evolution vs random, on ibn-detector
   and segmenter (npu-32x32), one process; best feasible latency reduction at equal evaluations.

    python benchmarks/search_npu.py [--quick] [--trials N] [--seeds S] [--plots DIR] [--sections ...]
        [--drift-trials N] [--drift-budget X] [--long-trials N] [--long-seeded-trials N] [--greedy-trials N]

Prints markdown; writes PNG plots into --plots (default benchmarks/plots).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import random
import re
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from _common import Numbers, command_line, fmt, mb, not_available, pct, table, versions_block
from hwnas import api
from hwnas.errors import HwnasError
from hwnas.estimator.defaults import estimator_for
from hwnas.graph.gsgraph import to_graph, to_model
from hwnas.graph.session import make_session, run_per_sample
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.graph.summary import summarize
from hwnas.models import build
from hwnas.passes.base import PassContext
from hwnas.passes.manager import PassManager
from hwnas.passes.pipeline import parse_pipeline
from hwnas.passes.registry import all_passes
from hwnas.search.algorithms import Limits, Trial, best_feasible_curve, population_size, search
from hwnas.search.evaluate import CandidateEvaluator, Score
from hwnas.search.optimize import expert_candidate, expert_seeds
from hwnas.search.space import CURATED_MULTIPLIERS, KEEP, PREFIX, SpaceOptions, build_space
from hwnas.targets import get_target
from hwnas.verify import random_calibration, verify_equivalence
from hwnas.verify.policy import Drift

TARGETS = ("npu-32x32", "npu-16x16")
MODELS = ("ibn-detector", "mobilenetv2", "segmenter")
ALGORITHMS = ("evolution", "random", "greedy")
EXACT_KINDS = ("align", "dw", "fuse")
CHECKPOINTS = (8, 16, 24, 32, 48, 64, 80, 100, 150, 200, 300, 400)  # best-so-far recorded at these evaluations
WORKERS = 2  # fixed, so that the wall times of the table compare across machines
WITHIN = 0.01
HELD_OUT = 8
CALIB = 4


@dataclass(frozen=True)
class Settings:
    targets: tuple[str, ...] = TARGETS
    models: tuple[str, ...] = MODELS
    algorithms: tuple[str, ...] = ALGORITHMS
    trials: int = 40  # algorithm table, the detector's "exact only" and the expert-seeded convergence runs
    convergence_model: str = "ibn-detector"
    convergence_targets: tuple[str, ...] = TARGETS
    seeds: int = 5
    convergence_trials: int = 64
    seeded_seeds: int = 2  # expert-seeded (optimize's default) runs per space, for comparison
    subspace_trials: int = 48  # fused-IBN searches (detector table, segmenter)
    max_drift: float = 0.10
    multipliers: tuple[float, ...] = (0.5, 0.75)
    depth_round_to: int = 32
    depth: bool = True
    segmenter_resolution: int | None = None
    pareto_points: int = 5
    plots: Path = Path(__file__).resolve().parent / "plots"
    # evolution vs random with reconstructed passes allowed (section drift-search), seeds 0..seeds-1, one process
    drift_models: tuple[str, ...] = ("ibn-detector", "segmenter")
    drift_targets: tuple[str, ...] = ("npu-32x32",)
    drift_trials: int = 24
    drift_budget: float = 0.05
    drift_resolution: int | None = None  # None: each model's own
    # long curated vs uncurated convergence (section convergence-long), seeds 0..seeds-1, one process
    long_trials: int = 300  # from the baseline
    long_seeded_trials: int = 100  # `optimize` default (expert-seeded)
    greedy_trials: int = 800  # section convergence-greedy: greedy descent from the baseline, per run


QUICK = Settings(targets=("npu-32x32",), models=("ibn-detector",), trials=16, convergence_targets=("npu-32x32",),
                 seeds=2, convergence_trials=16, seeded_seeds=1, subspace_trials=16, depth=False,
                 segmenter_resolution=256, pareto_points=3, drift_models=("ibn-detector",), drift_trials=10,
                 drift_resolution=160, long_trials=48, long_seeded_trials=24, greedy_trials=48)


# ---------------------------------------------------------------- api.optimize runs, cached


@dataclass
class Runs:
    """`api.optimize` reports by (target, model, algorithm, space, seed, trials): each search runs once."""

    reports: dict[tuple, dict] = field(default_factory=dict)
    models: dict[str, onnx.ModelProto] = field(default_factory=dict)
    subsearches: list[tuple[str, Subsearch]] = field(default_factory=list)

    def model(self, name: str) -> onnx.ModelProto:
        if name not in self.models:
            self.models[name] = build(name)
        return self.models[name]

    def get(self, target: str, model: str, algorithm: str = "evolution", space: str = "curated", seed: int = 0,
            trials: int = 60, workers: int = WORKERS) -> dict:
        # workers is not part of the key: the search's batch does not depend on it, so its trials and scores
        # are the same; only the wall time differs
        key = (target, model, algorithm, space, seed, trials)
        if key not in self.reports:
            result = api.optimize(self.model(model), target, exact=True, algorithm=algorithm, space=space,
                                  trials=trials, seed=seed, workers=workers)
            self.reports[key] = result.to_dict()
        return self.reports[key]


def record_curve(numbers: Numbers, prefix: str, curve: Sequence[float]) -> None:
    for n in CHECKPOINTS:
        if n <= len(curve):
            numbers.add(f"{prefix}/best_ms@{n}", float(curve[n - 1]), "deterministic")


# ---------------------------------------------------------------- 1. algorithms


def algorithms_markdown(runs: Runs, s: Settings, numbers: Numbers) -> str:
    rows = []
    for target in s.targets:
        for model in s.models:
            for algorithm in s.algorithms:
                r = runs.get(target, model, algorithm, "curated", 0, s.trials)
                sr = r["search"]
                key = f"search/{target}/{model}/{algorithm}/curated/seed0"
                record_curve(numbers, key, sr["best_so_far"])
                numbers.add(f"{key}/trials{s.trials}/reduction", r["latency_reduction"], "deterministic")
                rows.append([target, model, algorithm, pct(r["latency_reduction"]),
                             fmt(r["baseline"]["latency_ms"], ".3f"), fmt(r["optimized"]["latency_ms"], ".3f"),
                             fmt(sr["wall_s"], ".1f"), sr["candidates_evaluated"], sr["distinct_candidates"],
                             fmt(sr["candidates_evaluated"] / sr["wall_s"], ".1f"), sr["decisions"],
                             f"{sr['space_size']:.2g}"])
    return "\n".join([
        f"`hwnas.api.optimize(model, target, exact=True, algorithm=A, space='curated', trials={s.trials}, seed=0, "
        f"workers={WORKERS})` on the zoo models at their default widths and resolutions. Latency: the target's "
        "shipped estimator; reduction = 1 − optimized / baseline, of the verified winner. Search s: the search "
        "(scoring in worker processes), not the final ORT verification. Every search starts with the baseline "
        "and the expert recipe (regroup depthwise convs and pad channels to the PF).",
        "",
        table(["target", "model", "algorithm", "latency reduction", "baseline ms", "optimized ms", "search s",
               "candidates", "distinct", "candidates/s", "decisions", "space size"], rows),
    ])


# ---------------------------------------------------------------- searches outside api.optimize


_EVALUATOR: CandidateEvaluator | None = None


def _init(evaluator: CandidateEvaluator) -> None:
    global _EVALUATOR  # one per worker process, set by the pool initializer
    _EVALUATOR = evaluator


def _latency(pipeline: str) -> Score:
    return latency_score(_EVALUATOR, pipeline)


def composed(pipeline: str) -> str:
    """The pipeline with Fused-MBConv weights composed instead of fitted (the same estimated latency)."""
    return pipeline.replace("fuse-ibn{mode=mbconv,", "fuse-ibn{mode=mbconv,fit=compose,")


def latency_score(evaluator: CandidateEvaluator, pipeline: str) -> Score:
    try:
        model, _ = evaluator.build(composed(pipeline))
        latency = evaluator.estimator.estimate(model, evaluator.ctx.input_shapes).latency_ms
    except (HwnasError, ValueError, RuntimeError) as e:
        return Score(float("inf"), 0, 0, 1.0, False, f"{type(e).__name__}: {e}")
    return Score(latency, 0, 0, 0.0, True)


@dataclass
class Subsearch:
    kinds: tuple[str, ...]
    trials: list[Trial]  # in evaluation order
    space: object
    wall_s: float

    def fused(self, trial: Trial) -> int:
        return sum(1 for d in self.space.decisions if d.kind == "mbconv" and trial.candidate.get(d.key, KEEP) != KEEP)

    def curve(self) -> list[float]:
        return best_feasible_curve(self.trials, Limits())  # scores are latency only: feasible = no error

    def path(self) -> list[Trial]:
        """The trials that improved on the best so far, in order: ever faster (for greedy descent, each one
        the previous plus one more change)."""
        best, out = float("inf"), []
        for t in self.trials:
            if t.score.error is None and t.score.latency_ms < best:
                best = t.score.latency_ms
                out.append(t)
        return out

    def fastest(self) -> list[Trial]:
        """Distinct candidates, fastest first."""
        seen, out = set(), []
        for t in sorted((t for t in self.trials if t.score.error is None), key=lambda t: (t.score.latency_ms, t.number)):
            if t.pipeline not in seen:
                seen.add(t.pipeline)
                out.append(t)
        return out


def subspace_search(model: onnx.ModelProto, target: str, kinds: Iterable[str], trials: int, seed: int = 0,
                    curated: bool = True, expert: bool = True, algorithm: str = "evolution",
                    workers: int = WORKERS, order_seed: int | None = None) -> Subsearch | str:
    """hwnas's search over only the decisions of `kinds`, scored on estimated latency (composed weights).

    Decisions are ordered as `kinds` lists them (greedy descent visits them in that order), or shuffled
    with `order_seed`. `expert=False` starts from the baseline alone. A string says why there is nothing
    to search. `workers=1` scores in this process (the same search: the batch does not depend on workers).
    """
    kinds = tuple(kinds)
    the_target = get_target(target)
    shapes = resolve_input_shapes(model, None)
    ctx = PassContext(template=model, input_shapes=shapes, seed=seed)
    prepared = PassManager(parse_pipeline(PREFIX)).run(to_graph(model), ctx).graph
    space = build_space(prepared, ctx, SpaceOptions(the_target.parallelism_factor, curated, allow_reconstructed=True))
    space.decisions = sorted((d for d in space.decisions if d.kind in kinds), key=lambda d: kinds.index(d.kind))
    if order_seed is not None:
        random.Random(order_seed).shuffle(space.decisions)
    if not space.decisions:
        return f"the search space offers no {'/'.join(kinds)} decision on this model"
    evaluator = CandidateEvaluator(to_model(prepared.copy(), model), prepared, ctx, estimator_for(the_target),
                                   count_memory=False)
    scores: dict[str, Score] = {}
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(multiprocessing.get_context("fork").Pool(workers, _init, (evaluator,))) if workers > 1 else None

        def score_batch(pipelines: list[str]) -> list[Score]:
            todo = [p for p in dict.fromkeys(pipelines) if p not in scores]
            fresh = pool.map(_latency, todo) if pool else [latency_score(evaluator, p) for p in todo]
            for p, score in zip(todo, fresh):
                scores[p] = score
            return [scores[p] for p in pipelines]

        seeds = [space.baseline()] + ([expert_candidate(space)] if expert else [])
        history = search(space, score_batch, algorithm, trials, Limits(), seed, seeds)
    return Subsearch(kinds, history, space, time.monotonic() - start)


# ---------------------------------------------------------------- 2. convergence


def evaluations_to(curve: Sequence[float], threshold: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v <= threshold), None)


def reaching(curves: Sequence[Sequence[float]], reference: float) -> tuple[list[int | None], str, str]:
    """Per run, the evaluations to come within WITHIN of `reference`; the mean (a run that never gets there
    counts as its whole budget, and the mean is then a lower bound, "≥"); and "runs that got there"."""
    threshold = reference * (1 + WITHIN)
    needed = [evaluations_to(c, threshold) for c in curves]
    counted = [n if n is not None else len(c) for n, c in zip(needed, curves)]
    reached = sum(n is not None for n in needed)
    return needed, ("≥ " if reached < len(needed) else "") + f"{statistics.mean(counted):.1f}", f"{reached}/{len(needed)}"


def convergence_rows(label: str, target: str, curves: dict[str, list[list[float]]], base_ms: float,
                     decisions: dict[str, tuple[int, float]], shared: float | None = None) -> list[list]:
    """One row per space. Reference: the best of this group's runs; with `shared`, also a second
    reference (e.g. the best of every run on the target) in three more columns."""
    reference = min(min(c) for cs in curves.values() for c in cs)
    rows = []
    for space, cs in curves.items():
        needed, mean, reached = reaching(cs, reference)
        finals = [1 - min(c) / base_ms for c in cs]
        row = [target, label, space, decisions[space][0], f"{decisions[space][1]:.2g}", len(cs),
               pct(statistics.mean(finals)), pct(max(finals)), mean, reached,
               " ".join(str(n) if n is not None else "–" for n in needed)]
        if shared is not None:
            needed, mean, reached = reaching(cs, shared)
            row += [mean, reached, " ".join(str(n) if n is not None else "–" for n in needed)]
        rows.append(row)
    return rows


def unseeded_curves(runs: Runs, model_name: str, target: str, trials: int, seeds: int, numbers: Numbers,
                    workers: int, label: str, algorithm: str = "evolution") -> tuple[dict, dict, dict] | str:
    """Curated and uncurated searches from the baseline alone, seeds 0..seeds−1: best-so-far curves, space
    sizes and search wall times by space (or why the searches could not run). Greedy descent visits the
    decisions in an order shuffled with the seed (otherwise its seeds would all be the same run)."""
    model = runs.model(model_name)
    curves, sizes, walls = {}, {}, {}
    for space in ("curated", "uncurated"):
        curves[space], walls[space] = [], []
        for seed in range(seeds):
            sub = subspace_search(model, target, EXACT_KINDS, trials, seed, space == "curated", expert=False,
                                  algorithm=algorithm, workers=workers,
                                  order_seed=seed if algorithm == "greedy" else None)
            if isinstance(sub, str):
                return sub
            runs.subsearches.append((f"{target} {model_name} {algorithm} {space} seed {seed} (no expert seed{label})", sub))
            curve = sub.curve()
            kind = "unseeded" if algorithm == "evolution" else f"unseeded-{algorithm}"
            record_curve(numbers, f"convergence/{target}/{model_name}/{kind}/{space}/seed{seed}", curve)
            curves[space].append(curve)
            walls[space].append(sub.wall_s)
            sizes[space] = (len(sub.space.decisions), sub.space.size())
            log(f"{target} {model_name} {algorithm} from the baseline, {space}, seed {seed}: {len(curve)} evaluations in "
                f"{sub.wall_s:.0f} s")
    return curves, sizes, walls


def convergence_markdown(runs: Runs, s: Settings, numbers: Numbers) -> str:
    model_name = s.convergence_model
    model = runs.model(model_name)
    rows, plot_data = [], {}
    for target in s.convergence_targets:
        base_ms = api.estimate(model, target).latency_ms
        unseeded = unseeded_curves(runs, model_name, target, s.convergence_trials, s.seeds, numbers, WORKERS, "")
        if isinstance(unseeded, str):
            return not_available(unseeded)
        curves, sizes, _ = unseeded
        rows += convergence_rows("from the baseline (no expert seed)", target, curves, base_ms, sizes)
        plot_data[target] = {space: [[1 - v / base_ms for v in c] for c in cs] for space, cs in curves.items()}
        seeded, seeded_sizes = {}, {}
        for space in ("curated", "uncurated"):
            reports = [runs.get(target, model_name, "evolution", space, seed, s.trials)
                       for seed in range(s.seeded_seeds)]
            seeded[space] = [r["search"]["best_so_far"] for r in reports]
            seeded_sizes[space] = (reports[0]["search"]["decisions"], reports[0]["search"]["space_size"])
            for seed, r in enumerate(reports):
                record_curve(numbers, f"search/{target}/{model_name}/evolution/{space}/seed{seed}", r["search"]["best_so_far"])
        rows += convergence_rows("`optimize` default (baseline + expert seed)", target, seeded, base_ms, seeded_sizes)
    plot = plot_convergence(plot_data, model_name, s.plots)
    text = [
        f"Zoo {model_name}; evolution (NSGA-II) over the exact decisions (alignment, depthwise regrouping, linear "
        f"fusion). \"From the baseline\": hwnas's search (`hwnas.search.algorithms.search`) over "
        f"`build_space(..., curated=True/False)` with only the baseline as seed, {s.convergence_trials} candidates, "
        f"seeds 0–{s.seeds - 1}. \"`optimize` default\": `api.optimize(..., space=..., trials={s.trials})`, "
        f"which also seeds the expert recipe, seeds 0–{s.seeded_seeds - 1}. Reference = the lowest estimated latency any run of the row's "
        f"group found; evaluations to 1 % = the first evaluation whose best-so-far is within {WITHIN:.0%} of it.",
        "",
        table(["target", "search", "space", "decisions", "space size", "runs", "mean final reduction",
               "best final reduction", "mean evaluations to 1 %", "runs that got there", "per seed"], rows),
    ]
    if plot:
        text += ["", f"![best-so-far latency reduction vs evaluations, curated vs uncurated]({plot})"]
    return "\n".join(text)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_curves(panels: dict[str, dict[str, list[list[float]]]], series: Sequence[tuple[str, str]], ylabel: str,
                path: Path) -> str | None:
    """One panel per title: each series' runs thin, their mean thick (best-so-far reductions, 0..1)."""
    plt = _pyplot()
    if plt is None or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, by_series) in zip(axes[0], panels.items()):
        for key, color in series:
            curves = by_series.get(key, [])
            for c in curves:
                ax.plot(range(1, len(c) + 1), [100 * v for v in c], color=color, alpha=0.3, linewidth=0.8)
            if curves:
                n = min(len(c) for c in curves)
                ax.plot(range(1, n + 1), 100 * np.mean([c[:n] for c in curves], axis=0), color=color, linewidth=2,
                        label=f"{key} (mean of {len(curves)} seeds)")
        ax.set_title(title)
        ax.set_xlabel("candidates evaluated")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_convergence(data: dict[str, dict[str, list[list[float]]]], model: str, folder: Path,
                     name: str = "convergence.png", subtitle: str = "from the baseline") -> str | None:
    panels = {f"{model} on {target}, {subtitle}": spaces for target, spaces in data.items()}
    return plot_curves(panels, (("curated", "tab:blue"), ("uncurated", "tab:orange")),
                       "best-so-far latency reduction (%)", folder / name)


# ---------------------------------------------------------------- building candidates for real


@dataclass
class Realized:
    """A candidate built with fitted weights, and how far it drifted from the original."""

    model: onnx.ModelProto
    pipeline: str
    macs: int | None
    drift: float  # 1 − min output cosine against the original, held-out random inputs
    calib_drift: float  # the same on the calibration inputs the weights were fitted on
    seconds: float


class Builder:
    """Builds candidates once (fits cost seconds to minutes) and estimates them on any target."""

    def __init__(self) -> None:
        self.cache: dict[tuple, Realized] = {}

    def realize(self, original: onnx.ModelProto, start: onnx.ModelProto, start_label: str, pipeline: str) -> Realized:
        key = (id(original), start_label, pipeline)
        if key in self.cache:
            return self.cache[key]
        shapes = resolve_input_shapes(original, None)
        begun = time.perf_counter()
        calib = random_calibration(original, shapes, CALIB, 0)
        exact = "mbconv" not in pipeline and "scale-depth" not in pipeline
        # strict_sites=False: a pipeline the search compiled names sites that an earlier step may have fused
        # away (as optimize runs them)
        result = api.run(start, PREFIX + ("," + pipeline if pipeline else ""), input_shapes=shapes, calibration=calib,
                         allow_drift=None if exact else 0.999, strict_sites=False)
        if exact:
            drift = calib_drift = 0.0
        else:
            held = random_calibration(original, shapes, HELD_OUT, 10_000)
            drift = 1 - verify_equivalence(original, result.model, shapes, held, check_other_sizes=False).cosine
            calib_drift = 1 - verify_equivalence(original, result.model, shapes, calib, check_other_sizes=False).cosine
        realized = Realized(result.model, pipeline, summarize(result.model, shapes).macs, drift, calib_drift,
                            time.perf_counter() - begun)
        self.cache[key] = realized
        return realized


@dataclass
class Row:
    reduction: float
    latency_ms: float
    params: int
    peak: int
    macs: int | None
    drift: float
    note: str


def measure_row(realized: Realized, target: str, base_ms: float, note: str) -> Row:
    e = api.estimate(realized.model, target)
    return Row(1 - e.latency_ms / base_ms, e.latency_ms, e.params_bytes, e.peak_activation_bytes, realized.macs,
               realized.drift, note)


def first_within(builder: Builder, original, start, start_label: str, pipelines: Iterable[str], budget: float,
                 tries: int) -> tuple[Realized | None, list[str]]:
    """The first pipeline (in the order given) whose built model stays within the drift budget."""
    misses = []
    for pipeline in pipelines:
        realized = _try_build(builder, original, start, start_label, pipeline, misses)
        if realized is not None and realized.drift <= budget:
            return realized, misses
        if realized is not None:
            misses.append(f"`{abbreviate(pipeline)}`: drift {realized.drift:.3f}")
        if len(misses) >= tries:
            break
    return None, misses


def longest_within(builder: Builder, original, start, start_label: str, path: Sequence[str], budget: float
                   ) -> tuple[Realized | None, list[str]]:
    """The furthest (fastest) pipeline along a search path whose model stays within the drift budget.

    Drift grows roughly with every step of the path, so the furthest step within the budget is found by
    bisection: about log2(len(path)) builds instead of one per step.
    """
    probes: list[str] = []
    lo, hi, best = 0, len(path) - 1, None
    while lo <= hi:
        mid = (lo + hi + 1) // 2
        realized = _try_build(builder, original, start, start_label, path[mid], probes)
        if realized is not None and realized.drift <= budget:
            best, lo = realized, mid + 1
        else:
            if realized is not None:
                probes.append(f"step {mid}/{len(path) - 1} `{abbreviate(path[mid])}`: drift {realized.drift:.3f}")
            hi = mid - 1
    return best, probes


def _try_build(builder: Builder, original, start, start_label: str, pipeline: str, misses: list[str]) -> Realized | None:
    try:
        return builder.realize(original, start, start_label, pipeline)
    except HwnasError as e:
        misses.append(f"`{abbreviate(pipeline)}`: {e}")
        return None


def abbreviate(pipeline: str) -> str:
    """`fuse-ibn{mode=mbconv,sites=@a;@b;@c}` → `fuse-ibn{mode=mbconv} ×3`."""
    steps = re.findall(r"([a-z-]+)\{([^}]*)\}", pipeline)
    out = []
    for name, options in steps:
        sites = re.search(r"sites=([^,}]*)", options)
        rest = ",".join(o for o in options.split(",") if not o.startswith("sites="))
        out.append(f"{name}{{{rest}}}" + (f" ×{len(sites.group(1).split(';'))}" if sites else ""))
    return ", ".join(out) or "(prefix only)"


def fused_sites(pipeline: str) -> int:
    match = re.search(r"fuse-ibn\{mode=mbconv[^}]*sites=([^,}]*)", pipeline)
    return len(match.group(1).split(";")) if match else 0


# ---------------------------------------------------------------- 3. detector table


def depth_missing() -> str | None:
    """None when hwnas has a depth-multiplier pass, else why not."""
    if "scale-depth" not in all_passes():
        return "this hwnas has no `scale-depth` pass (`hwnas passes`)"
    return None


def detector_markdown(runs: Runs, s: Settings, numbers: Numbers, builder: Builder | None = None) -> str:
    """The reference work's Echo Show table on the zoo ibn-detector."""
    builder = builder or Builder()
    name = "ibn-detector"
    model = runs.model(name)
    shapes = resolve_input_shapes(model, None)
    base_macs = summarize(model, shapes).macs
    no_depth = depth_missing() or (None if s.depth else "skipped with --quick (each scale-depth build takes minutes)")
    depth_steps = [f"scale-depth{{multiplier={m},round_to={s.depth_round_to}}}" for m in sorted(s.multipliers)]
    blocks = []
    for target in s.targets:
        base = api.estimate(model, target)
        rows = [["baseline", "no", "no", "–", "0.0 %", fmt(base.latency_ms, ".3f"), mb(base.params_bytes),
                 mb(base.peak_activation_bytes), fmt(2 * base_macs / 1e9, ".2f"), "0", "–"]]

        def add(label: str, fused: str, depth: str, ref: str, row: Row | str) -> None:
            if isinstance(row, str):
                rows.append([label, fused, depth, ref, row, "", "", "", "", "", ""])
                return
            trials = s.trials if label.startswith("exact") else s.subspace_trials
            numbers.add(f"detector/{target}/{label.split(' (')[0].replace(' ', '')}/trials{trials}/reduction", row.reduction, "deterministic")
            rows.append([label, fused, depth, ref, pct(row.reduction), fmt(row.latency_ms, ".3f"), mb(row.params),
                         mb(row.peak), fmt(2 * row.macs / 1e9, ".2f") if row.macs else "–", f"{row.drift:.3g}", row.note])

        exact = runs.get(target, name, "evolution", "curated", 0, s.trials)
        realized_exact = builder.realize(model, model, "original", exact["pipeline"].removeprefix(PREFIX).lstrip(","))
        add(f"exact only (trials={s.trials})", "no", "no", "–",
            measure_row(realized_exact, target, base.latency_ms, f"`optimize(exact=True)`, {exact['search']['candidates_evaluated']} candidates"))

        v1 = None
        if no_depth:
            add("V1", "no", "yes", "14 %", not_available(no_depth))
        else:  # fastest multiplier first: smaller m is faster on every target
            v1, misses = first_within(builder, model, model, "original", depth_steps, s.max_drift, len(depth_steps))
            add("V1", "no", "yes", "14 %", measure_row(v1, target, base.latency_ms, f"`{v1.pipeline}`")
                if v1 else not_available(f"no multiplier within drift {s.max_drift}: " + "; ".join(misses)))

        def fusion(label: str, start: onnx.ModelProto, start_label: str, kinds: tuple[str, ...], depth: str, ref: str) -> None:
            sub = subspace_search(start, target, kinds, s.subspace_trials, algorithm="greedy")
            if isinstance(sub, str):
                add(label, "yes", depth, ref, not_available(sub))
                return
            runs.subsearches.append((f"{target} ibn-detector {label}", sub))
            record_curve(numbers, f"detector/{target}/{label.replace(' ', '')}/greedy", sub.curve())
            path = [t.pipeline for t in sub.path()]
            realized, misses = longest_within(builder, model, start, start_label, path, s.max_drift)
            if realized is None:
                add(label, "yes", depth, ref, not_available(
                    f"no step of the search path stays within drift {s.max_drift}: " + "; ".join(misses)))
                return
            prefix = (start_label + " + ") if start_label != "original" else ""
            note = (f"{prefix}{fused_sites(realized.pipeline)} blocks fused; step {path.index(realized.pipeline)} of "
                    f"{len(path) - 1} on the search's path; {len(sub.trials)} candidates in {sub.wall_s:.0f} s")
            add(label, "yes", depth, ref, measure_row(realized, target, base.latency_ms, note))

        fusion("V2", model, "original", ("mbconv",), "no", "35 %")
        if no_depth:
            add("V3", "yes", "yes", "53 %", not_available(no_depth))
        elif v1 is None:
            add("V3", "yes", "yes", "53 %", not_available("V1 found no multiplier within the drift budget"))
        else:
            fusion("V3", v1.model, f"`{v1.pipeline}`", ("mbconv",), "yes", "53 %")
        fusion("V2 + exact passes", model, "original", ("mbconv", *EXACT_KINDS), "no", "–")
        blocks += [f"**{target}**", "", table(
            ["variant", "fused-IBN search", "depth-multiplier search", "reference work", "latency reduction",
             "latency ms", "params", "peak activations", "GFLOPs", "output drift (1 − cos)", "how"], rows), ""]
    return "\n".join([
        f"Zoo ibn-detector (SSDLite-MobileNetV2 at 320², random weights; sizes are float32 bytes). Drift budget "
        f"{s.max_drift} (1 − output cosine on {HELD_OUT} held-out random inputs; the reference work's budget was "
        f"\"the same mAP\", which random weights cannot have). Exact only: `optimize(exact=True, trials={s.trials}, "
        f"seed=0)`. V1: the fastest of {', '.join(f'`{p}`' for p in depth_steps)} within the budget. V2: greedy "
        f"descent over the fused-IBN decisions alone (one sweep tries fusing each block), {s.subspace_trials} "
        f"candidates on estimated latency (composed weights), then the furthest step of the search's path (each improvement on the best so far, ever faster) "
        f"whose model, built with least-squares weights ({CALIB} random calibration inputs), stays within the "
        f"budget (found by bisection). V3: the same on V1's model. \"V2 + exact passes\": the same "
        "descent from the expert recipe (alignment and regrouping to the PF) over fused-IBN first, then alignment, "
        "regrouping and linear fusion. Reference column: the reference work's "
        "Echo Show detector (trained, on its Neural Engine).",
        "",
        *blocks,
    ])


# ---------------------------------------------------------------- segmentation candidates


def segmenter_markdown(runs: Runs, s: Settings, numbers: Numbers, builder: Builder | None = None,
                       target: str = "npu-32x32") -> str:
    """Candidates for the zoo segmenter: latency reduction vs drift, and which are Pareto-optimal."""
    builder = builder or Builder()
    model = build("segmenter", resolution=s.segmenter_resolution) if s.segmenter_resolution else runs.model("segmenter")
    shapes = resolve_input_shapes(model, None)
    resolution = shapes[next(iter(shapes))][2]
    base = api.estimate(model, target)
    sub = subspace_search(model, target, ("mbconv", *EXACT_KINDS), s.subspace_trials, algorithm="greedy")
    if isinstance(sub, str):
        return not_available(sub)
    runs.subsearches.append((f"{target} segmenter {resolution}²", sub))
    record_curve(numbers, f"segmenter/{target}/r{resolution}/greedy", sub.curve())
    path = [t for t in sub.path() if t.pipeline] or sub.path()  # the candidates found, not the unchanged baseline
    picks = sorted({round(i * (len(path) - 1) / max(s.pareto_points - 1, 1)) for i in range(s.pareto_points)})
    rows, points, skipped = [], [], []
    for i in picks:
        f = sub.fused(path[i])
        try:
            realized = builder.realize(model, model, "original", path[i].pipeline)
        except HwnasError as e:
            skipped.append(f"step {i} ({f} fused blocks): {e}")
            continue
        points.append((f, realized, measure_row(realized, target, base.latency_ms, "")))
    points.sort(key=lambda p: -p[2].reduction)
    for i, (f, realized, row) in enumerate(points):
        pareto = not any(o.reduction >= row.reduction and o.drift <= row.drift and
                         (o.reduction > row.reduction or o.drift < row.drift) for _, _, o in points)
        numbers.add(f"segmenter/{target}/r{resolution}/trials{s.subspace_trials}/fused{f}/reduction", row.reduction, "deterministic")
        rows.append([chr(ord("A") + i), pct(row.reduction), f"{row.drift:.3g}", f"{realized.calib_drift:.3g}", f,
                     fmt(2 * row.macs / 1e9, ".2f") if row.macs else "–", mb(row.params), "yes" if pareto else "no",
                     abbreviate(realized.pipeline)])
    plot = plot_pareto([(chr(ord("A") + i), f, row) for i, (f, _, row) in enumerate(points)], s.plots,
                       f"segmenter {resolution}² on {target}")
    text = [
        f"Zoo segmenter (MobileNetV3-Large + LR-ASPP, {resolution}², random weights) on {target}, baseline "
        f"{base.latency_ms:.3f} ms: greedy descent from the expert recipe over every decision (fused-IBN first, then "
        f"alignment, regrouping, linear fusion), "
        f"{len(sub.trials)} candidates on estimated latency in {sub.wall_s:.0f} s. The search's path (each "
        f"improvement on the best so far: {len(path)} steps, ever faster, more blocks fused) is sampled at "
        f"{len(picks)} evenly spaced steps, each built with least-squares weights ({CALIB} random calibration inputs) "
        f"and its drift measured on {HELD_OUT} held-out random inputs. The reference work's "
        "segmentation models A–E: 27, 37, 38, 41, 51 % (trained, on its Neural Engine).",
        "",
        table(["candidate", "latency reduction", "drift held-out (1 − cos)", "drift on calibration inputs",
               "fused blocks", "GFLOPs", "params", "Pareto-optimal", "pipeline"], rows),
    ]
    if skipped:
        text += [""] + [f"- not built: {x}" for x in skipped]
    if plot:
        text += ["", f"![segmenter candidates: latency reduction vs drift]({plot})"]
    return "\n".join(text)


def plot_pareto(points: list[tuple[str, int, Row]], folder: Path, title: str) -> str | None:
    plt = _pyplot()
    if plt is None or not points:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter([r.drift for _, _, r in points], [100 * r.reduction for _, _, r in points])
    for label, f, r in points:
        ax.annotate(f"{label} ({f} fused)", (r.drift, 100 * r.reduction), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("output drift, held-out (1 − cosine)")
    ax.set_ylabel("estimated latency reduction (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "segmenter_pareto.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------- 2b. long convergence, one process


LONG_CHECKPOINTS = (8, 25, 50, 100, 150, 200, 300, 400, 500, 600)
GREEDY_CHECKPOINTS = (25, 50, 100, 150, 200, 300, 400, 600, 800)


def log(message: str) -> None:
    """Progress on stderr (the markdown goes to stdout): long sections say what finished, and when."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def mean_at(curves: Sequence[Sequence[float]], n: int, base_ms: float) -> str:
    """Mean best-so-far latency reduction after n evaluations ("–" when a run is shorter)."""
    if not curves or any(len(c) < n for c in curves):
        return "–"
    return pct(statistics.mean(1 - c[n - 1] / base_ms for c in curves))


def convergence_long_markdown(runs: Runs, s: Settings, numbers: Numbers) -> str:
    """Curated vs uncurated with enough evaluations to reach the reference, scored in this one process."""
    model_name = s.convergence_model
    model = runs.model(model_name)
    unseeded_label, seeded_label = "from the baseline (no expert seed)", "`optimize` default (baseline + expert seeds)"
    rows, checkpoint_rows, plot_data = [], [], {}
    for target in s.convergence_targets:
        base_ms = api.estimate(model, target).latency_ms
        groups: dict[str, tuple[dict, dict, dict]] = {}  # label -> (curves, sizes, search walls) by space
        unseeded = unseeded_curves(runs, model_name, target, s.long_trials, s.seeds, numbers, 1, f", {s.long_trials}")
        if isinstance(unseeded, str):
            return not_available(unseeded)
        curves, sizes, walls = groups[unseeded_label] = unseeded
        plot_data[target] = {space: [[1 - v / base_ms for v in c] for c in cs] for space, cs in curves.items()}
        curves, sizes, walls = {}, {}, {}
        for space in ("curated", "uncurated"):
            curves[space], walls[space] = [], []
            for seed in range(s.seeds):
                r = runs.get(target, model_name, "evolution", space, seed, s.long_seeded_trials, workers=1)
                curves[space].append(r["search"]["best_so_far"])
                walls[space].append(r["search"]["wall_s"])
                sizes[space] = (r["search"]["decisions"], r["search"]["space_size"])
                record_curve(numbers, f"search/{target}/{model_name}/evolution/{space}/seed{seed}", r["search"]["best_so_far"])
                log(f"convergence-long {target} seeded {space} seed {seed}: {len(r['search']['best_so_far'])} evaluations "
                    f"in {r['search']['wall_s']:.0f} s, best {1 - min(r['search']['best_so_far']) / base_ms:.2%}")
        groups[seeded_label] = (curves, sizes, walls)
        shared = min(min(c) for cs, _, _ in groups.values() for space_curves in cs.values() for c in space_curves)
        numbers.add(f"convergence-long/{target}/{model_name}/shared_best_ms", shared, "deterministic")
        for label, (cs, sz, ws) in groups.items():
            rows += convergence_rows(label, target, cs, base_ms, sz, shared)
            group_best = min(min(c) for space_curves in cs.values() for c in space_curves)
            for space, space_curves in cs.items():
                n = len(space_curves[0])
                checkpoint_rows.append([target, label, space, fmt(group_best, ".3f"), pct(1 - group_best / base_ms),
                                        *[mean_at(space_curves, k, base_ms) for k in LONG_CHECKPOINTS if k <= n],
                                        *(["–"] * sum(k > n for k in LONG_CHECKPOINTS)),
                                        fmt(statistics.mean(ws[space]), ".0f"),
                                        fmt(sum(len(c) for c in space_curves) / sum(ws[space]), ".1f")])
        log(f"convergence-long {target}: shared best {shared:.4f} ms ({1 - shared / base_ms:.2%})")
    plot = plot_convergence(plot_data, model_name, s.plots, "convergence_long.png")
    text = [
        f"Zoo {model_name}; evolution (NSGA-II) over the exact decisions (alignment, depthwise regrouping, linear "
        f"fusion), every candidate scored in this one process (`workers=1`; the batch size, and so the search, is "
        f"the same as with 2 workers). \"From the baseline\": hwnas's search (`hwnas.search.algorithms.search`) over "
        f"`build_space(..., curated=True/False)` with only the baseline as seed, {s.long_trials} candidates. "
        f"\"`optimize` default\": `api.optimize(model, target, exact=True, space=..., trials={s.long_seeded_trials}, "
        f"seed=..., workers=1)`, which seeds the baseline, the alignment advice alone and the full expert advice "
        f"(`hwnas.search.optimize.expert_seeds`) and surrounds them with its first generation. Seeds "
        f"0–{s.seeds - 1} each. Evaluations to 1 % = the first evaluation whose best-so-far latency is within "
        f"{WITHIN:.0%} of a reference: (a) the best any run of the row's group (same target, same kind of search, "
        f"either space) found, (b) the best any run on that target found (both kinds of search, both spaces: one "
        f"shared reference). A run that never gets there counts as its whole budget and the mean is then marked \"≥\".",
        "",
        table(["target", "search", "space", "decisions", "space size", "runs", "mean final reduction",
               "best final reduction", "(a) mean evaluations to 1 % of the group's best", "(a) runs that got there",
               "(a) per seed", "(b) mean evaluations to 1 % of the shared best", "(b) runs that got there",
               "(b) per seed"], rows),
        "",
        "Mean best-so-far latency reduction after n evaluations (mean over the seeds), with the group's best "
        "(latency ms and reduction) for reference; search s: mean wall time of one run's search (scoring included, "
        "not `optimize`'s final ORT verification).",
        "",
        table(["target", "search", "space", "group's best ms", "group's best reduction",
               *[f"@{k}" for k in LONG_CHECKPOINTS], "search s per run", "candidates/s"], checkpoint_rows),
    ]
    if plot:
        text += ["", f"![best-so-far latency reduction vs evaluations, curated vs uncurated, {s.long_trials} evaluations]({plot})"]
    return "\n".join(text)


def convergence_greedy_markdown(runs: Runs, s: Settings, numbers: Numbers) -> str:
    """Curated vs uncurated under greedy descent from the baseline, the decisions in a seeded random order."""
    model_name = s.convergence_model
    model = runs.model(model_name)
    rows, checkpoint_rows, plot_data = [], [], {}
    for target in s.convergence_targets:
        base_ms = api.estimate(model, target).latency_ms
        found = unseeded_curves(runs, model_name, target, s.greedy_trials, s.seeds, numbers, WORKERS,
                                f", greedy, {s.greedy_trials}", algorithm="greedy")
        if isinstance(found, str):
            return not_available(found)
        curves, sizes, walls = found
        best = min(min(c) for cs in curves.values() for c in cs)
        numbers.add(f"convergence-greedy/{target}/{model_name}/best_ms", best, "deterministic")
        rows += convergence_rows("greedy descent from the baseline", target, curves, base_ms, sizes)
        plot_data[target] = {space: [[1 - v / base_ms for v in c] for c in cs] for space, cs in curves.items()}
        for space, cs in curves.items():
            ends = [len(c) for c in cs]
            cs = [c + [c[-1]] * (s.greedy_trials - len(c)) for c in cs]  # a stopped descent has converged
            checkpoint_rows.append([target, space, fmt(best, ".3f"), pct(1 - best / base_ms),
                                    *[mean_at(cs, k, base_ms) for k in GREEDY_CHECKPOINTS],
                                    " ".join(map(str, ends)), fmt(statistics.mean(walls[space]), ".0f"),
                                    fmt(sum(ends) / sum(walls[space]), ".1f")])
        log(f"convergence-greedy {target}: best {best:.4f} ms ({1 - best / base_ms:.2%})")
    plot = plot_convergence(plot_data, model_name, s.plots, "convergence_greedy.png", "greedy from the baseline")
    text = [
        f"Zoo {model_name}; hwnas's greedy descent (`algorithm='greedy'`: coordinate descent, every other choice "
        f"of one decision at a time, the best kept, sweeps until one changes nothing) over the exact decisions "
        f"(alignment, depthwise regrouping, linear fusion) of `build_space(..., curated=True/False)`, from the "
        f"baseline alone, the decisions in an order shuffled with the seed (seeds 0–{s.seeds - 1}), at most "
        f"{s.greedy_trials} candidates per run, scored by the target's shipped estimator. A run stops early "
        f"when a whole sweep finds nothing better. Evaluations to 1 % = the first evaluation whose best-so-far "
        f"latency is within {WITHIN:.0%} of the best any run of this section found on the target; a run that never gets there "
        f"counts as its whole length and the mean is then marked \"≥\".",
        "",
        table(["target", "search", "space", "decisions", "space size", "runs", "mean final reduction",
               "best final reduction", "mean evaluations to 1 % of the best", "runs that got there", "per seed"], rows),
        "",
        "Mean best-so-far latency reduction after n evaluations (a finished run keeps its final value); "
        "evaluations: where each run stopped.",
        "",
        table(["target", "space", "best ms", "best reduction", *[f"@{k}" for k in GREEDY_CHECKPOINTS],
               "evaluations per seed", "search s per run", "candidates/s"], checkpoint_rows),
    ]
    if plot:
        text += ["", f"![best-so-far latency reduction vs evaluations, greedy descent, curated vs uncurated]({plot})"]
    return "\n".join(text)


# ---------------------------------------------------------------- 2c. evolution vs random, reconstructed passes allowed


@dataclass
class DriftRun:
    algorithm: str
    seed: int
    trials: list[Trial]
    curve: list[float]
    wall_s: float
    fresh: int  # candidates this run scored first (the others were scored by an earlier run: same scores)
    fresh_s: float


def drift_search_markdown(runs: Runs, s: Settings, numbers: Numbers) -> str:
    """Evolution vs random search at equal evaluations, reconstructed passes allowed, seeds 0..seeds−1."""
    algorithms = ("evolution", "random")
    checkpoints = sorted({3, 8, 12, 16, 20, 24, 32, 48, 64} & set(range(1, s.drift_trials + 1)) | {s.drift_trials})
    summary, per_seed, plot_data, notes = [], [], {}, []
    for target in s.drift_targets:
        the_target = get_target(target)
        for name in s.drift_models:
            model = build(name, resolution=s.drift_resolution) if s.drift_resolution else runs.model(name)
            shapes = resolve_input_shapes(model, None)
            resolution = shapes[next(iter(shapes))][2]
            calib = random_calibration(model, shapes, CALIB, 0)
            ctx = PassContext(template=model, input_shapes=shapes, calibration=calib, seed=0)
            prepared = PassManager(parse_pipeline(PREFIX)).run(to_graph(model), ctx).graph
            space = build_space(prepared, ctx, SpaceOptions(the_target.parallelism_factor, True, allow_reconstructed=True))
            evaluator = CandidateEvaluator(to_model(prepared.copy(), model), prepared, ctx, estimator_for(the_target),
                                           run_per_sample(make_session(model), calib), count_memory=False,
                                           judge_feeds=calib, fidelity=Drift(s.drift_budget))
            limits = Limits(evaluator.fidelity)
            scores: dict[str, Score] = {}
            seconds: dict[str, float] = {}

            def score_batch(pipelines: list[str]) -> list[Score]:
                for p in dict.fromkeys(pipelines):
                    if p not in scores:
                        begun = time.perf_counter()
                        scores[p] = evaluator.evaluate(p)
                        seconds[p] = time.perf_counter() - begun
                return [scores[p] for p in pipelines]

            base_ms = score_batch([""])[0].latency_ms
            population = population_size(space)
            seeds = expert_seeds(space)  # as run_search (no memory limit here)
            done: dict[str, list[DriftRun]] = {a: [] for a in algorithms}
            started = time.monotonic()
            for seed in range(s.seeds):  # seed by seed, both algorithms: an interrupted run stays balanced
                for algorithm in algorithms:
                    known = set(scores)
                    begun = time.monotonic()
                    history = search(space, score_batch, algorithm, s.drift_trials, limits, seed, seeds)
                    new = [p for p in dict.fromkeys(t.pipeline for t in history) if p not in known]
                    run = DriftRun(algorithm, seed, history, best_feasible_curve(history, limits), time.monotonic() - begun,
                                   len(new), sum(seconds[p] for p in new))
                    done[algorithm].append(run)
                    record_curve(numbers, f"drift-search/{target}/{name}/r{resolution}/drift{s.drift_budget:g}/{algorithm}/seed{seed}",
                                 run.curve)
                    log(f"drift-search {target} {name} {algorithm} seed {seed}: {len(history)} evaluations in "
                        f"{run.wall_s:.0f} s ({run.fresh} scored fresh, {run.fresh_s:.0f} s), best feasible "
                        f"{1 - min(run.curve) / base_ms:.2%}")
            wall = time.monotonic() - started
            label = f"{name} {resolution}²"
            for algorithm, group in done.items():
                finals = [1 - min(r.curve) / base_ms for r in group]
                best_trials = [min((t for t in r.trials if limits.feasible(t.score)), key=lambda t: (t.score.latency_ms, t.number))
                               for r in group]
                reconstructed = [t for r in group for t in r.trials if t.score.error is None and not t.score.exact]
                feasible = [t for r in group for t in r.trials if limits.feasible(t.score)]
                depth = [t for r in group for t in r.trials if t.candidate.get("depth:model", KEEP) != KEEP]
                total = sum(len(r.trials) for r in group)
                fresh, fresh_s = sum(r.fresh for r in group), sum(r.fresh_s for r in group)
                summary.append([target, label, algorithm, len(group), s.drift_trials,
                                *[mean_at([r.curve for r in group], k, base_ms) for k in checkpoints],
                                pct(statistics.mean(finals)), pct(min(finals)), pct(max(finals)),
                                f"{statistics.mean(t.score.drift for t in best_trials):.3f}",
                                f"{sum(not t.score.exact for t in best_trials)}/{len(best_trials)}",
                                f"{len(feasible)}/{total}", f"{len(reconstructed)}/{total}", f"{len(depth)}/{total}",
                                fmt(fresh_s / fresh if fresh else float("nan"), ".1f")])
                for r, f in zip(group, finals):
                    numbers.add(f"drift-search/{target}/{name}/r{resolution}/drift{s.drift_budget:g}/{algorithm}/seed{r.seed}"
                                f"/trials{s.drift_trials}/reduction", f, "deterministic")
            for ev, ra in zip(done["evolution"], done["random"]):
                e, r = 1 - min(ev.curve) / base_ms, 1 - min(ra.curve) / base_ms
                per_seed.append([target, label, ev.seed, pct(e), pct(r), f"{100 * (e - r):+.1f}",
                                 "evolution" if e > r + 1e-9 else "random" if r > e + 1e-9 else "tie",
                                 abbreviate(min(ev.trials, key=lambda t: (not limits.feasible(t.score), t.score.latency_ms)).pipeline),
                                 abbreviate(min(ra.trials, key=lambda t: (not limits.feasible(t.score), t.score.latency_ms)).pipeline)])
            expert = next((t for t in done["evolution"][0].trials if t.candidate == expert_candidate(space)), None)
            best_seed = min(done["evolution"][0].curve[:len(seeds)])
            notes.append(f"- {target} {label}: {len(space.decisions)} decisions "
                         f"({', '.join(f'{k} {sum(d.kind == k for d in space.decisions)}' for k in ('depth', 'dw', 'align', 'fuse', 'mbconv'))}), "
                         f"space size {space.size():.2g}, baseline {base_ms:.3f} ms, expert seed "
                         f"{'–' if expert is None else f'{expert.score.latency_ms:.3f} ms ({1 - expert.score.latency_ms / base_ms:.1%})'}; "
                         f"{len(seeds)} seed candidates (`expert_seeds`), evaluated first by both algorithms, the best "
                         f"feasible of them {best_seed:.3f} ms ({1 - best_seed / base_ms:.1%}); "
                         f"NSGA-II population {population} (so evaluations ≤ {population} are all its warm-start generation: "
                         f"the seeds and their neighbours, alternating between the seeds); {len(scores)} distinct candidates "
                         f"scored in {wall:.0f} s (the first candidate with each depth multiplier also builds the "
                         f"depth-scaled graph, ~40 s, which the evaluator then keeps).")
            plot_data[f"{label} on {target}"] = {a: [[1 - v / base_ms for v in r.curve] for r in group] for a, group in done.items()}
    plot = plot_algorithms(plot_data, s.plots)
    text = [
        f"Evolution (NSGA-II) vs random search at equal evaluations with reconstructed passes allowed: hwnas's "
        f"search (`hwnas.search.algorithms.search`, as `optimize` runs it: seeds `expert_seeds(space)` = baseline, "
        f"alignment advice, full expert advice, and the full advice with each depth multiplier; batch 8) over the curated space with `allow_reconstructed=True` (a global "
        f"depth multiplier {', '.join(CURATED_MULTIPLIERS)} rounded to the PF, and Fused-MBConv per IBN block, "
        f"besides the exact decisions), limit `max_drift={s.drift_budget}` (1 − the smallest output cosine on the "
        f"calibration inputs). Scoring as `optimize(..., max_drift={s.drift_budget})` does it "
        f"(`CandidateEvaluator`: estimated latency, least-squares refits and ORT drift on the calibration inputs), "
        f"calibration = {CALIB} seeded standard-normal inputs (`random_calibration(model, shapes, {CALIB}, seed=0)`, "
        f"optimize's own fallback; the zoo models have random weights) and fit seed 0 for every run, so that all runs "
        f"optimise the same function and only the search seed differs (`optimize` would use the search seed for "
        f"both). One process and one evaluator per model: a candidate scored by an earlier run is not scored again "
        f"(the same score), and each depth-scaled graph is built once (`CandidateEvaluator` keeps it). Seeds 0–{s.seeds - 1}, {s.drift_trials} evaluations "
        f"per run. Reduction = 1 − best feasible estimated latency / baseline.",
        "",
        *notes,
        "",
        table(["target", "model", "algorithm", "runs", "evaluations", *[f"mean @{k}" for k in checkpoints],
               "mean final reduction", "worst run", "best run", "mean drift of the best", "best is reconstructed",
               "feasible evaluations", "reconstructed evaluations", "with a depth multiplier",
               "s per fresh candidate"], summary),
        "",
        "Per seed: final best feasible reduction after the same number of evaluations, and the winner's pipeline.",
        "",
        table(["target", "model", "seed", "evolution", "random", "evolution − random (points)", "better",
               "evolution's best", "random's best"], per_seed),
    ]
    if plot:
        text += ["", f"![best feasible latency reduction vs evaluations, evolution vs random]({plot})"]
    return "\n".join(text)


def plot_algorithms(data: dict[str, dict[str, list[list[float]]]], folder: Path) -> str | None:
    return plot_curves(data, (("evolution", "tab:green"), ("random", "tab:red")),
                       "best feasible latency reduction (%)", folder / "drift_search.png")


# ---------------------------------------------------------------- search cost


GPU_DAYS = 2000  # the reference work: "multishot NAS with full training can take up to 2,000 GPU-days"


def cost_markdown(runs: Runs) -> str:
    """Wall time and candidates/s of the searches of this run, against the reference's 2,000 GPU-days."""
    searches = [(f"{t} {m} {a} {sp} seed {sd} (`optimize`)", r["search"]["candidates_evaluated"], r["search"]["wall_s"])
                for (t, m, a, sp, sd, _), r in sorted(runs.reports.items())]
    searches += [(label, len(sub.trials), sub.wall_s) for label, sub in runs.subsearches]
    if not searches:
        return not_available("no search ran")
    evaluated = sum(n for _, n, _ in searches)
    wall = sum(w for _, _, w in searches)
    slowest = max(searches, key=lambda x: x[2])
    return "\n".join([
        f"The {len(searches)} searches of this run: {evaluated:,} candidates in {wall:.0f} s of search, "
        f"{evaluated / wall:.1f} candidates/s ({WORKERS} worker processes, CPU only); the longest, {slowest[0]}: "
        f"{slowest[1]} candidates in {slowest[2]:.0f} s. Fitting Fused-MBConv / scale-depth weights for a chosen "
        f"candidate costs seconds to minutes more (the detector table's \"how\" column). The reference work: "
        f"multishot NAS with full training \"can take up to {GPU_DAYS:,} GPU-days\" ({GPU_DAYS * 86400:.2e} s): this "
        f"run's whole search time is {wall / (GPU_DAYS * 86400):.1e} of that. Not the same work — the reference "
        "trains every candidate for accuracy; hwnas keeps the trained function (exact passes, or least-squares "
        "refits judged by drift) and scores latency with a regression estimator, the reference's own device for "
        "not deploying candidates.",
        "",
        table(["search", "candidates", "search s", "candidates/s"],
              [[label, n, fmt(w, ".1f"), fmt(n / w if w else float("nan"), ".1f")] for label, n, w in searches]),
    ])


# ---------------------------------------------------------------- command line

SECTIONS = {
    "algorithms": algorithms_markdown,
    "convergence": convergence_markdown,
    "convergence-long": convergence_long_markdown,
    "convergence-greedy": convergence_greedy_markdown,
    "drift-search": drift_search_markdown,
    "detector": detector_markdown,
    "segmenter": segmenter_markdown,
    "cost": lambda runs, _s, _n: cost_markdown(runs),
}
LONG_SECTIONS = ("convergence-long", "convergence-greedy", "drift-search")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one target, fewer trials and seeds, no scale-depth")
    parser.add_argument("--trials", type=int, help="trials of the algorithm table")
    parser.add_argument("--seeds", type=int, help="seeds of the convergence, convergence-long and drift-search studies (≥ 5 for the claims)")
    parser.add_argument("--plots", type=Path)
    parser.add_argument("--drift-trials", type=int, help="evaluations per run of the drift-search section")
    parser.add_argument("--drift-budget", type=float, help="max drift (1 − cosine) of the drift-search section")
    parser.add_argument("--long-trials", type=int, help="evaluations per unseeded run of convergence-long")
    parser.add_argument("--long-seeded-trials", type=int, help="evaluations per expert-seeded run of convergence-long")
    parser.add_argument("--greedy-trials", type=int, help="evaluations per run of convergence-greedy (at most)")
    parser.add_argument("--numbers-out", type=Path, help="write the sections' numbers (JSON) here")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS),
                        default=[k for k in SECTIONS if k not in LONG_SECTIONS],
                        help=f"default: all but {', '.join(LONG_SECTIONS)} (long; give them by name)")
    args = parser.parse_args()
    s = QUICK if args.quick else Settings()
    s = dataclasses.replace(s, **{k: v for k, v in (
        ("trials", args.trials), ("seeds", args.seeds), ("plots", args.plots), ("drift_trials", args.drift_trials),
        ("drift_budget", args.drift_budget), ("long_trials", args.long_trials),
        ("long_seeded_trials", args.long_seeded_trials), ("greedy_trials", args.greedy_trials)) if v is not None})
    runs, numbers = Runs(), Numbers()
    print(f"`{command_line()}`\n")
    print(versions_block())
    for name in args.sections:
        print(f"\n### {name}\n", flush=True)
        begun = time.monotonic()
        print(SECTIONS[name](runs, s, numbers), flush=True)
        print(f"\n_{time.monotonic() - begun:.0f} s_", flush=True)
    if args.numbers_out:
        args.numbers_out.write_text(numbers.to_json() + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

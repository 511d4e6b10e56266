"""Search algorithms over a SearchSpace: evolution (NSGA-II), random, greedy local search, zero-shot.

Evolution and random sampling come from Optuna (NSGA-II: a regularized, multi-objective evolutionary
algorithm with constraint handling; `RandomSampler`); greedy is coordinate descent from the best seed
candidate, the way an expert refines a recipe one block at a time. All are seeded: candidates are asked
in batches and told back in order, so the same seed and the same scores give the same search, which is
what makes an interrupted search resumable from its journal of scores.

Objectives: estimated latency, and drift when reconstructed passes are allowed — or, for candidates
that will be trained, their quality (maximised): the trainability proxy for `zero-shot` (NSGA-II scored
by hwnas.search.proxy) or the --evaluate-cmd score with any algorithm. Constraints (memory budgets, the
drift budget, the quality floor) make a candidate infeasible by how much it misses them; the best
candidate is the fastest feasible one, and the Pareto front lists the non-dominated (latency,
drift or −quality, memory) points.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from hwnas.search.evaluate import Score
from hwnas.search.space import SearchSpace
from hwnas.verify.policy import Exact, Fidelity, fidelity_from_json

ALGORITHMS = ("evolution", "random", "greedy", "zero-shot")
BATCH = 8  # candidates asked at a time: a fixed number, so that a seed gives the same search on any machine
# scores in the order asked; an iterator may compute them lazily, so that a search past its deadline
# stops consuming (and so evaluating) after the candidate that crossed it
ScoreBatch = Callable[[list[str]], Iterable[Score]]


@dataclass(frozen=True)
class Limits:
    fidelity: Fidelity = Exact()  # what a candidate must keep of the function (hwnas.verify.policy)
    memory_budget: int | None = None
    max_params: int | None = None
    max_peak_act: int | None = None

    def violations(self, score: Score) -> list[float]:
        """How far over each limit the score is, relative to the limit (≤ 0 means within it)."""
        checks = [(score.drift, self.fidelity.drift_limit)]
        checks += [(v, lim) for v, lim in ((score.memory_bytes, self.memory_budget), (score.params_bytes, self.max_params),
                                            (score.peak_activation_bytes, self.max_peak_act)) if lim is not None]
        excess = [(value - limit) / limit for value, limit in checks]
        if (floor := self.fidelity.quality_floor) is not None:  # a floor, not a ceiling: how far below it, relative to its size
            quality = score.quality if score.quality is not None else float("-inf")
            excess.append((floor - quality) / max(abs(floor), 1e-12))
        return excess

    def feasible(self, score: Score) -> bool:
        return score.error is None and all(v <= 0 for v in self.violations(score))

    def loss(self, score: Score) -> float:
        """What the search minimises besides latency: the drift, or −quality for models to retrain."""
        return self.fidelity.loss(score.drift, score.quality)

    def to_json(self) -> dict:
        return {"fidelity": self.fidelity.to_json(), "memory_budget": self.memory_budget,
                "max_params": self.max_params, "max_peak_act": self.max_peak_act}

    @classmethod
    def from_json(cls, data: Mapping) -> Limits:
        """The limits `to_json` wrote (TypeError/KeyError/ValueError/BadInputError when malformed)."""
        return cls(fidelity_from_json(data["fidelity"]), **{k: v for k, v in data.items() if k != "fidelity"})


@dataclass(frozen=True)
class Trial:
    number: int
    candidate: dict[str, str]
    pipeline: str
    score: Score


def rank_key(limits: Limits) -> Callable[[Trial], tuple]:
    """Feasible before infeasible (least total excess first), then fastest, then the earliest found.

    Under a memory budget the goal is to fit with the least damage (the reference work's Blink case):
    among feasible candidates the one with the least drift wins, latency breaks ties.
    """
    fit_first = any(x is not None for x in (limits.memory_budget, limits.max_params, limits.max_peak_act))

    def key(t: Trial) -> tuple:
        excess = sum(max(v, 0.0) for v in limits.violations(t.score)) if t.score.error is None else float("inf")
        return (excess > 0, excess, limits.loss(t.score) if fit_first else 0.0, t.score.latency_ms, t.number)
    return key


def best_feasible_curve(trials: Sequence[Trial], limits: Limits) -> list[float]:
    """Best feasible estimated latency after each evaluation (inf until the first feasible one)."""
    best, curve = float("inf"), []
    for t in trials:
        if limits.feasible(t.score):
            best = min(best, t.score.latency_ms)
        curve.append(best)
    return curve


def pareto_front(trials: Sequence[Trial], limits: Limits) -> list[Trial]:
    """Trials no other trial beats on every one of latency, drift (or quality) and memory (errors excluded)."""
    def point(t: Trial) -> tuple[float, float, int]:
        return t.score.latency_ms, limits.loss(t.score), t.score.memory_bytes

    unique = {}
    for t in trials:  # one trial per distinct score, the earliest
        if t.score.error is None:
            unique.setdefault(point(t), t)

    def dominates(a: Trial, b: Trial) -> bool:
        worse = [x > y for x, y in zip(point(a), point(b))]
        better = [x < y for x, y in zip(point(a), point(b))]
        return not any(worse) and any(better)

    front = [t for t in unique.values() if not any(dominates(o, t) for o in unique.values())]
    return sorted(front, key=lambda t: t.score.latency_ms)


def search(
    space: SearchSpace,
    score_batch: ScoreBatch,
    algorithm: str,
    trials: int,
    limits: Limits,
    seed: int = 0,
    seeds: Sequence[Mapping[str, str]] = (),
    time_budget: float | None = None,
    batch_size: int = BATCH,
    progress: Callable[[int, Trial], None] | None = None,
    post: Callable[[list[str]], None] | None = None,
) -> list[Trial]:
    """Run `algorithm` for up to `trials` evaluations (or until `time_budget` seconds), seeds first.

    The time budget holds within one candidate: the search stops after the candidate during which it ran
    out, even in the middle of a batch (the rest of the batch is not scored).

    `post`: told the pipelines of the current batch and the next one before the current one is scored,
    whenever the algorithm's next batch cannot depend on the current one's scores (see `_same_before_told`),
    so that an evaluator working in the background (storage workers) keeps its idle workers busy; the
    trials stay the same."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    deadline = time.monotonic() + time_budget if time_budget else None
    history: list[Trial] = []

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() > deadline

    def evaluate(candidates: list[dict[str, str]]) -> list[Trial]:
        """Trials for a prefix of `candidates`: all of them unless the time budget ran out on the way."""
        pipelines = [space.compile(c) for c in candidates]
        made = []
        for c, p, s in zip(candidates, pipelines, score_batch(pipelines)):
            trial = Trial(len(history), c, p, s)
            history.append(trial)
            made.append(trial)
            if progress:
                progress(1, trial)
            if out_of_time():
                break
        return made

    def budget_left() -> int:
        return 0 if out_of_time() else trials - len(history)

    if algorithm == "greedy":
        _greedy(space, evaluate, limits, list(seeds) or [space.baseline()], budget_left)
    else:
        _optuna(space, evaluate, algorithm, limits, seed, list(seeds), batch_size, budget_left, post)
    return history


def _optuna(space, evaluate, algorithm, limits, seed, seeds, batch_size, budget_left, post) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    two_objectives = limits.fidelity.changes_function
    if algorithm in ("evolution", "zero-shot"):
        population = population_size(space)
        sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(directions=["minimize"] * (2 if two_objectives else 1), sampler=sampler)
    distributions = {d.key: CategoricalDistribution(d.choices) for d in space.decisions}
    for candidate in first_candidates(space, algorithm, seeds, seed):
        study.enqueue_trial(dict(candidate))

    def ask(n: int) -> list[optuna.trial.Trial]:
        return [study.ask(distributions) for _ in range(max(n, 0))]

    asked = ask(min(batch_size, budget_left()))
    while asked:
        # the next batch asked now, before this one is told, only where that gives the same candidates
        ahead = ask(min(batch_size, budget_left() - len(asked))) if post and _same_before_told(study, asked) else None
        if ahead:  # this batch first: the evaluator starts on its candidates before the next one's
            post([space.compile(dict(t.params)) for t in asked + ahead])
        for optuna_trial, trial in zip(asked, evaluate([dict(t.params) for t in asked])):
            score = trial.score
            if score.error is not None:
                study.tell(optuna_trial, state=TrialState.FAIL)
                continue
            for i, violation in enumerate(limits.violations(score)):
                optuna_trial.set_constraint(f"limit{i}", violation)
            study.tell(optuna_trial, [score.latency_ms, limits.loss(score)] if two_objectives else score.latency_ms)
        if budget_left() <= 0:  # out of time (a batch asked ahead is dropped unscored) or trials
            break
        asked = ahead if ahead is not None else ask(min(batch_size, budget_left()))


def first_candidates(space: SearchSpace, algorithm: str, seeds: Sequence[Mapping[str, str]], seed: int,
                     ) -> list[Mapping[str, str]]:
    """The candidates an evolution, random or zero-shot search asks first, in order, whatever their scores:
    the seeds, and for NSGA-II the rest of its first generation around them (its warm start)."""
    seeds = list(seeds)
    if algorithm not in ("evolution", "zero-shot") or not seeds:
        return seeds
    # warm start: the first generation surrounds the seeds (expert advice)
    centers = seeds[1:] or seeds
    count = population_size(space) - len(seeds)
    around = [neighbours(space, center, count // len(centers) + (i < count % len(centers)), seed * len(centers) + i)
              for i, center in enumerate(centers)]
    # round-robin over the centers: a search shorter than one generation still surrounds every seed
    return seeds + [c for row in itertools.zip_longest(*around) for c in row if c is not None]


def _same_before_told(study: optuna.Study, pending: list[optuna.trial.Trial]) -> bool:
    """Whether the sampler's next candidates are the same now as after the `pending` trials are told.

    Random sampling never looks at scores. NSGA-II does at a generation's end: a new trial joins the
    generation of the newest completed trials, or the next one once that generation holds `population`
    completed trials, whose parents are then chosen (once, cached) from them. So while the pending
    trials' generation cannot fill up whatever their scores, the next trials join it, with the parents it
    already has, and are drawn from the same seeded generator in the same order. Optuna records the
    generation from 4.2 on (its GA samplers' `_get_generation_key`); without it, nothing is asked ahead.
    tests/test_distributed.py holds this to Optuna's behaviour across generations, with failed trials.
    """
    sampler = study.sampler
    if isinstance(sampler, optuna.samplers.RandomSampler):
        return True
    generation_key = getattr(sampler, "_get_generation_key", None)
    if generation_key is None or getattr(sampler, "population_size", None) is None:
        return False
    key, trials = generation_key(), study.get_trials(deepcopy=False)
    # enqueued trials (the warm start) are given no generation: NSGA-II never counts them nor breeds from them
    generations = {trials[t.number].system_attrs.get(key) for t in pending} - {None}
    if len(generations) > 1:
        return False
    if not generations:
        return True
    (generation,) = generations
    completed = sum(t.state == TrialState.COMPLETE and t.system_attrs.get(key) == generation for t in trials)
    return completed + len(pending) < sampler.population_size


def population_size(space: SearchSpace) -> int:
    """NSGA-II's generation: two candidates per decision, 8 to 40 (its first generation is the warm start)."""
    return max(8, min(40, len(space.decisions) * 2))


def neighbours(space: SearchSpace, center: Mapping[str, str], count: int, seed: int) -> list[dict[str, str]]:
    """`count` candidates that each change one to three decisions of `center` (seeded)."""
    rng = random.Random(seed)
    out = []
    for _ in range(max(count, 0)):
        candidate = dict(center)
        for decision in rng.sample(space.decisions, min(len(space.decisions), rng.randint(1, 3))):
            candidate[decision.key] = rng.choice([c for c in decision.choices if c != center.get(decision.key)] or [center.get(decision.key)])
        out.append(candidate)
    return out


def _greedy(space, evaluate, limits, seeds, budget_left) -> None:
    """Coordinate descent: from the best seed, try every other choice of one decision at a time."""
    key = rank_key(limits)
    best = min(evaluate([dict(s) for s in seeds[: max(budget_left(), 0)]]), key=key)
    improved = True
    while improved and budget_left() > 0:
        improved = False
        for decision in space.decisions:
            alternatives = [c for c in decision.choices if c != best.candidate.get(decision.key)]
            alternatives = alternatives[: budget_left()]
            if not alternatives:
                continue
            tried = evaluate([{**best.candidate, decision.key: c} for c in alternatives])
            challenger = min(tried, key=key)
            if key(challenger)[:4] < key(best)[:4]:
                best, improved = challenger, True
            if budget_left() <= 0:
                return

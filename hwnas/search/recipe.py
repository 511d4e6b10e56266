"""Recipes: a search's result as JSON that can be replayed on the same model or transferred to another.

A recipe holds the full pipeline and the fingerprint of the model it was found on, plus one *rule* per
decision the search changed: the kind of site (depthwise conv, channel group, fusion), where it sits
(relative position among sites of its kind, output resolution) and how wide it is, with the choice
made. On the same model the pipeline is replayed as is. On another model (another width, another
resolution, another network) each site takes the choice of the most similar rule of its kind —
by position, log channel count and log resolution, never by node name — when that choice is valid
there; this is the reference work's expert-in-the-loop transfer, done by rule instead of by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from hwnas.errors import BadInputError
from hwnas.report.json_report import read_json
from hwnas.search.space import KEEP, PREFIX, Decision, SearchSpace

FORMAT = "hwnas-recipe"
VERSION = 1


def make_recipe(space: SearchSpace, candidate: Mapping[str, str], pipeline: str, fingerprint: str, target: str) -> dict:
    rules = [
        {"kind": d.kind, "position": round(d.position, 4), "channels": d.channels, "resolution": d.resolution,
         "choice": candidate.get(d.key, KEEP)}
        for d in space.decisions
    ]
    return {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "target": target,
            "parallelism_factor": space.options.parallelism_factor, "pipeline": pipeline, "rules": rules}


def load_recipe(path: str | Path) -> dict:
    p = Path(path)
    data = read_json(p, "recipe")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("pipeline"), str):
        raise BadInputError(f"{p} is not an hwnas recipe (format {FORMAT})")
    if not isinstance(data.get("rules", []), list):
        raise BadInputError(f"recipe {p}: 'rules' must be a list")
    return data


def _distance(rule: Mapping, d: Decision) -> float:
    def log_ratio(a: float, b: float) -> float:
        return abs(math.log2(max(a, 1) / max(b, 1)))

    return abs(rule["position"] - d.position) * 4 + log_ratio(rule["channels"], d.channels) + log_ratio(rule["resolution"], d.resolution)


def transfer(recipe: Mapping, space: SearchSpace) -> dict[str, str]:
    """A candidate for `space` (another model) that follows the recipe's rules."""
    candidate = space.baseline()
    for d in space.decisions:
        rules = [r for r in recipe.get("rules", []) if isinstance(r, dict) and r.get("kind") == d.kind]
        if not rules:
            continue
        nearest = min(rules, key=lambda r: _distance(r, d))
        if nearest.get("choice") in d.choices:
            candidate[d.key] = nearest["choice"]
    return _with_padding(candidate, space)


def _with_padding(candidate: dict[str, str], space: SearchSpace) -> dict[str, str]:
    """A depthwise site regrouped by a group size that divides only its padded channel count takes its
    group's padding too (or stays as it is): the rules of a model whose counts were multiples of the
    size may not say to pad."""
    decisions = {d.key: d for d in space.decisions}
    for key, align_key in space.pad_for.items():
        size = candidate.get(key, KEEP).removeprefix("g")
        if (not size.isdigit() or key not in decisions or decisions[key].channels % int(size) == 0
                or candidate.get(align_key, KEEP) != KEEP):
            continue
        if align_key not in decisions:
            candidate[key] = KEEP
            continue
        pads = [c for c in decisions[align_key].choices if c.startswith("pad") and int(c.removeprefix("pad")) % int(size) == 0]
        if pads:
            candidate[align_key] = pads[0]
        else:
            candidate[key] = KEEP
    return candidate


def full_pipeline(candidate_pipeline: str) -> str:
    return f"{PREFIX},{candidate_pipeline}" if candidate_pipeline else PREFIX

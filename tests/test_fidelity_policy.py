"""The fidelity policy (hwnas.verify.policy): Exact | Drift | Retrain, one `judge` per kind, and its JSON."""

from __future__ import annotations

import json
import math

import pytest

from hwnas import api
from hwnas.errors import BadInputError
from hwnas.models import build
from hwnas.search.algorithms import Limits
from hwnas.search.evaluate import Score
from hwnas.verify import Tolerance, VerificationReport
from hwnas.verify.equivalence import OutputComparison
from hwnas.verify.policy import Drift, Exact, Retrain, Verdict, fidelity_from_json


def _report(cosine: float, within: bool = False, equivalent: bool | None = None) -> VerificationReport:
    outputs = [OutputComparison("ok", 0.0, 0.0, 1.0, True), OutputComparison("out", 0.5, 0.25, cosine, within)]
    return VerificationReport(within if equivalent is None else equivalent, Tolerance(), outputs, [])


def test_exact_passes_only_an_equivalent_report_and_names_the_output_that_differs():
    assert Exact().judge(_report(1.0, within=True)) == Verdict(True, "equivalent")
    verdict = Exact().judge(_report(0.9999999))  # a cosine of ~1 is no excuse: the tolerance judges
    assert not verdict.ok and "'out' differs: max abs 0.5" in verdict.detail and verdict.function_checked


def test_drift_judges_the_worst_cosine_against_its_budget():
    assert Drift(0.1).judge(_report(0.95)).ok
    assert Drift(0.1).judge(_report(0.9)).ok  # the budget itself is within it
    verdict = Drift(0.1).judge(_report(0.85))
    assert not verdict.ok and "0.850000 < 1 - allow_drift = 0.900000" in verdict.detail
    assert not Drift(0.1).judge(_report(math.nan)).ok


def test_retrain_accepts_any_function_but_says_it_checked_none():
    verdict = Retrain().judge(_report(-1.0))
    assert verdict.ok and not verdict.function_checked
    assert not Retrain().judge(_report(math.nan)).ok  # NaN outputs are not a function to train from


@pytest.mark.parametrize("policy", [Exact(), Exact(Tolerance(1e-6, 0.0)), Drift(0.05), Retrain(), Retrain(0.75)])
def test_policies_and_limits_round_trip_through_json(policy):
    assert fidelity_from_json(json.loads(json.dumps(policy.to_json()))) == policy
    limits = Limits(policy, memory_budget=1000, max_params=None, max_peak_act=7)
    assert Limits.from_json(json.loads(json.dumps(limits.to_json()))) == limits


@pytest.mark.parametrize("data", [{"kind": "lossy"}, {"kind": "drift"}, {"kind": "drift", "max": "x", "metric": "cosine"},
                                  {"kind": "drift", "max": 0.1, "metric": "l2"}, {}])
def test_malformed_policies_are_bad_input(data):
    with pytest.raises(BadInputError):
        fidelity_from_json(data)


def test_a_drift_budget_is_a_number_at_least_zero():
    for bad in (-0.1, math.nan):
        with pytest.raises(BadInputError, match="drift budget"):
            Drift(bad)


def test_limits_hold_each_kind_to_its_own_measure():
    exact, drifted = Score(1.0, 10, 0, 0.0, True), Score(1.0, 10, 0, 0.05, False)
    assert Limits(Exact()).feasible(exact) and not Limits(Exact()).feasible(drifted)
    assert Limits(Drift(0.1)).feasible(drifted) and not Limits(Drift(0.01)).feasible(drifted)
    good, poor = Score(1.0, 10, 0, 0.0, False, quality=2.0), Score(1.0, 10, 0, 0.0, False, quality=1.0)
    floor = Limits(Retrain(1.5))
    assert floor.feasible(good) and not floor.feasible(poor)
    assert floor.loss(good) == -2.0 and Limits(Drift(0.1)).loss(drifted) == 0.05  # what the search minimises


def test_optimize_turns_its_arguments_into_one_policy():
    from hwnas.api import _requested_fidelity

    assert _requested_fidelity(None, None, retrain=False) == Exact()
    assert _requested_fidelity(None, 0.05, retrain=False) == Drift(0.05)
    assert _requested_fidelity(None, None, retrain=True) == Retrain()
    with pytest.raises(BadInputError, match="cannot be combined"):
        _requested_fidelity(True, 0.05, retrain=False)
    with pytest.raises(BadInputError, match="give the drift budget"):
        _requested_fidelity(False, None, retrain=False)


def test_a_reconstructed_result_under_retrain_is_not_reported_verified():
    """Retrain accepts any function: ORT ran it, nothing about its outputs was checked, so not "verified"
    (ANY_DRIFT used to pass it as a drift within budget); an exact result is still judged Exact."""
    model = build("mobilenetv2", resolution=32, width=0.35)
    changed = api.run(model, "fold-bn,scale-depth{multiplier=0.5}", fidelity=Retrain())
    assert changed.verdict.ok and not changed.verdict.function_checked
    assert changed.to_dict()["verified"] is False and changed.to_dict()["exact"] is False
    same = api.run(model, "fold-bn", fidelity=Retrain())
    assert same.verdict == Verdict(True, "equivalent") and same.to_dict()["verified"] is True
    with pytest.raises(BadInputError, match="not both"):
        api.run(model, "fold-bn", fidelity=Retrain(), allow_drift=0.1)

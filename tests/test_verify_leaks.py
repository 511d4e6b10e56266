"""The verification leaks of a drift budget: each test failed before its fix (issue 22)."""

from __future__ import annotations

import numpy as np
import pytest

import hwnas.api as api
from hwnas.errors import CheckFailedError
from hwnas.models import build


@pytest.fixture(scope="module")
def mobilenet():
    return build("mobilenetv2", resolution=64)


def _calibration(n: int = 8) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(1).standard_normal((n, 3, 64, 64)).astype(np.float32)}


def test_a_broken_exact_pass_is_caught_inside_a_mixed_pipeline_whatever_the_drift_budget(monkeypatch, mobilenet):
    import hwnas.passes.fold_bn as fold_bn

    real = fold_bn.scale_and_shift
    monkeypatch.setattr(fold_bn, "scale_and_shift", lambda g, n, s, t: real(g, n, s * 1.01, t))
    with pytest.raises(CheckFailedError, match="after pass 'fold-bn'"):
        api.run(mobilenet, "fold-bn,scale-depth{multiplier=0.75}", calibration=_calibration(), allow_drift=0.9)


@pytest.mark.slow
def test_a_sound_mixed_pipeline_passes_and_records_each_step(mobilenet):
    result = api.run(mobilenet, "fold-bn,scale-depth{multiplier=0.75}", calibration=_calibration(), allow_drift=0.9)
    assert [r.verified for r in result.records if r.modified] == [True, True]


def test_the_baseline_fallback_is_never_written_over_a_memory_budget(monkeypatch, mobilenet):
    """When the chosen candidates fail verification, the fallback to the input's own pipeline must still
    satisfy every limit: here the baseline is made to be over the budget, and every other candidate fails."""
    import dataclasses

    import hwnas.search.optimize as search
    from hwnas.search.space import PREFIX

    real_search, real_run = search.run_search, api.run

    def search_with_a_heavy_baseline(*args, **kwargs):
        outcome = real_search(*args, **kwargs)
        heavy = dataclasses.replace(outcome.baseline, score=dataclasses.replace(outcome.baseline.score, params_bytes=10**12))
        return dataclasses.replace(outcome, baseline=heavy,
                                   trials=[heavy if t is outcome.baseline else t for t in outcome.trials])

    def run_failing_all_but_the_baseline(model, pipeline, **kwargs):
        if str(pipeline) != PREFIX:
            raise CheckFailedError("made to fail")
        return real_run(model, pipeline, **kwargs)

    monkeypatch.setattr(search, "run_search", search_with_a_heavy_baseline)
    monkeypatch.setattr(api, "run", run_failing_all_but_the_baseline)
    with pytest.raises(CheckFailedError):
        api.optimize(mobilenet, "npu-32x32", trials=4, workers=1, exact=True, memory_budget=10**9)


@pytest.mark.slow
def test_no_verify_does_not_lift_the_rule_that_a_changed_function_needs_a_drift_budget(mobilenet):
    from hwnas.errors import BadInputError

    with pytest.raises(BadInputError, match="allow-drift"):
        api.run(mobilenet, "scale-depth{multiplier=0.75}", calibration=_calibration(), verify=False)



@pytest.mark.slow
def test_without_calibration_data_drift_is_judged_on_an_input_the_fits_never_saw(monkeypatch, mobilenet):
    """Without --calib the refits use seeded random samples; the one random input verification and the drift
    report used was the same draw as fitting sample 0, so the fit was judged on its own data."""
    from hwnas.graph.shapes import resolve_input_shapes
    from hwnas.verify import equivalence, random_calibration

    judged = []
    real_measure, real_run = api.measure_fidelity, equivalence.run

    def measure(reference, candidate, feeds):
        judged.append(feeds["input"][0])
        return real_measure(reference, candidate, feeds)

    def run_verified(session, feeds):
        judged.append(feeds["input"][0])
        return real_run(session, feeds)

    monkeypatch.setattr(api, "measure_fidelity", measure)
    monkeypatch.setattr(equivalence, "run", run_verified)
    result = api.run(mobilenet, "scale-depth{multiplier=0.75}", allow_drift=0.9)
    assert any("no calibration data" in w for w in result.warnings)  # the refits ran on random samples
    fitted = random_calibration(mobilenet, resolve_input_shapes(mobilenet, None), 8, seed=0)["input"]
    assert judged and not any(np.array_equal(j, f) for j in judged for f in fitted)


@pytest.mark.slow
def test_drift_is_judged_on_calibration_samples_the_fits_did_not_use():
    """Verification and the drift report used the same samples the least-squares fits were taken from,
    which flatters a fitted model: the last quarter is now held back from fitting and judged alone."""
    from hwnas.verify import measure_fidelity

    model = build("mobilenetv2", resolution=64)
    rng = np.random.default_rng(3)
    calibration = {"input": rng.standard_normal((8, 3, 64, 64)).astype(np.float32)}
    result = api.run(model, "fold-bn,scale-depth{multiplier=0.5}", calibration=calibration, allow_drift=0.9)
    assert result.to_dict()["calibration_split"]["fitted"] == 6
    assert result.calibration_split.held_back == 2
    held_back = measure_fidelity(model, result.model, {"input": calibration["input"][6:]})
    everything = measure_fidelity(model, result.model, calibration)
    assert result.drift["calibration"].cosine == pytest.approx(held_back.cosine, abs=1e-7)
    assert abs(held_back.cosine - everything.cosine) > 1e-6  # the two measures differ on this model
    assert result.verification.outputs[0].cosine == pytest.approx(held_back.outputs[0].min_sample_cosine, abs=1e-6)

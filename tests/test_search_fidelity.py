"""What the search's scores claim about fidelity is measured, not read from a pass's label (issue 22)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import onnx
from onnx import numpy_helper

from hwnas.estimator.defaults import estimator_for
from hwnas.graph.gsgraph import to_graph
from hwnas.graph.session import make_session, run_per_sample
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.models import build
from hwnas.passes.base import Exactness, PassContext
from hwnas.search.evaluate import STRICT_PASSES_ENV, CandidateEvaluator
from hwnas.targets import get_target
from hwnas.verify import random_calibration
from hwnas.verify.policy import Drift


def _evaluator(model: onnx.ModelProto) -> CandidateEvaluator:
    shapes = resolve_input_shapes(model, None)
    calibration = random_calibration(model, shapes, samples=2, seed=0)
    ctx = PassContext(template=model, input_shapes=shapes, calibration=calibration)
    reference = run_per_sample(make_session(model), calibration)
    return CandidateEvaluator(model, to_graph(model), ctx, estimator_for(get_target("npu-32x32")), reference,
                              judge_feeds=calibration, fidelity=Drift(0.05))


def test_an_exact_candidate_that_changed_the_function_scores_its_measured_drift(monkeypatch):
    """A pass labelled exact that is wrong (here: the first conv's weights made 5 % larger) used to score
    drift 0 from its label in a drift-budget search, and so ranked as a perfect candidate."""
    model = build("mobilenetv2", resolution=64)
    evaluator = _evaluator(model)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    first = next(n for n in broken.graph.node if n.op_type == "Conv")
    weight = next(i for i in broken.graph.initializer if i.name == first.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.05), weight.name))
    monkeypatch.setattr(evaluator, "build", lambda pipeline: (broken, Exactness.EXACT))
    score = evaluator.evaluate("replace-conv{mode=dense}")
    assert score.exact and score.error is None
    assert score.drift > 1e-6


def test_a_sound_exact_candidate_measures_about_no_drift():
    model = build("mobilenetv2", resolution=64)
    score = _evaluator(model).evaluate("replace-conv{mode=dense,sites=0}")
    assert score.exact and score.error is None
    assert 0 <= score.drift < 1e-5


def test_a_pass_failing_with_a_value_error_is_counted_and_reported_not_hidden(monkeypatch, tmp_path, capsys):
    """A ValueError/RuntimeError out of a pass is a bug: it used to become one more bad candidate, silently."""
    import json

    from hwnas.cli import main

    real = CandidateEvaluator.build

    def replace_conv_is_broken(self, pipeline):
        if "replace-conv" in pipeline:
            raise ValueError("index 7 is out of bounds (simulated pass bug)")
        return real(self, pipeline)

    monkeypatch.setattr(CandidateEvaluator, "build", replace_conv_is_broken)
    monkeypatch.delenv(STRICT_PASSES_ENV)  # as users run it: counted and reported
    model = tmp_path / "m.onnx"
    onnx.save(build("mobilenetv2", resolution=64), str(model))
    report = tmp_path / "r.json"
    code = main(["optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--target", "npu-32x32", "--trials", "12",
                 "--workers", "1", "--quiet", "--report", str(report)])
    assert code == 0
    errors = json.loads(report.read_text())["search"]["pass_errors"]
    assert errors["count"] > 0 and "simulated pass bug" in errors["first"][0]
    assert f"a pass failed on {errors['count']} candidate(s)" in capsys.readouterr().err


def test_the_test_suite_fails_on_a_pass_bug_met_in_a_search(monkeypatch):
    """conftest sets STRICT_PASSES_ENV: a pass bug raises out of the search instead of being counted."""
    from hwnas import api

    def broken(self, pipeline):
        raise RuntimeError("simulated pass bug")

    monkeypatch.setattr(CandidateEvaluator, "build", broken)
    with pytest.raises(RuntimeError, match="simulated pass bug"):
        api.optimize(build("mobilenetv2", resolution=64), "npu-32x32", trials=4, seed=0, workers=1)


@pytest.mark.slow
def test_a_sound_search_reports_no_pass_errors():
    from hwnas import api

    report = api.optimize(build("mobilenetv2", resolution=64), "npu-32x32", trials=12, seed=0, workers=1).to_dict()
    assert report["search"]["pass_errors"] == {"count": 0, "first": []}


@pytest.mark.slow
def test_a_resume_after_changing_the_calibration_data_or_the_estimator_scores_again(tmp_path):
    """The journal's header named neither: a resume reused scores (drift, latency) of other data or another
    estimator as if they were this search's."""
    from hwnas import api

    model = build("mobilenetv2", resolution=32, width=0.35)  # small: each of the four searches ranks depth choices first
    journal = tmp_path / "j.jsonl"

    def calib(seed):
        return {"input": np.random.default_rng(seed).standard_normal((2, 3, 32, 32)).astype(np.float32)}

    def scored(**kwargs):
        result = api.optimize(model, "npu-32x32", max_drift=0.2, trials=6, seed=0, workers=1, journal=journal, **kwargs)
        return result.to_dict()["search"]["candidates_scored"]

    first = scored(calibration=calib(1))
    assert first > 0 and scored(calibration=calib(1)) == 0  # a true resume reuses everything
    assert scored(calibration=calib(2)) == first
    changed = copy.deepcopy(estimator_for(get_target("npu-32x32")))  # the shipped one is cached: never mutate it
    changed.kernel_offset_ms += 0.001  # refitted or re-profiled: other latencies
    assert scored(calibration=calib(2), estimator=changed) == first


def test_the_search_scores_drift_by_the_worst_sample_as_verification_judges_it():
    """The search pooled all samples into one cosine per output, verification takes the worst single
    sample: a candidate within the budget by the search's measure could fail verification (issue 22)."""
    from hwnas.verify import measure_fidelity

    model = build("mobilenetv2", resolution=64)
    evaluator = _evaluator(model)
    pipeline = "align-channels{mode=trim,multiple=16}"
    fidelity = measure_fidelity(model, evaluator.build(pipeline)[0], evaluator.ctx.calibration)
    worst_sample = min(o.min_sample_cosine for o in fidelity.outputs)
    assert abs(worst_sample - fidelity.cosine) > 1e-4  # the two measures differ here (0.01284 vs 0.01189 drift)
    assert evaluator.evaluate(pipeline).drift == pytest.approx(1 - worst_sample, abs=1e-7)

"""cpu int8 profiling: networks quantized by the quantize pass give int8 kernels regressors of their own."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hwnas import api
from hwnas.estimator.estimator import LatencyEstimator
from hwnas.estimator.profile import profile_target
from hwnas.models import build
from hwnas.passes.quantize import quantize_model
from hwnas.targets import get_target


@pytest.mark.slow
def test_profiling_with_quantize_fits_int8_regressors_that_int8_models_use(tmp_path):
    target = get_target("cpu")
    estimator, report = profile_target(target, 60, seed=0, rounds=1, quantize=quantize_model)
    assert estimator.target_config["profiling"]["int8_networks"] >= 1
    int8_keys = {k for k in estimator.regressors_ if k.endswith("/int8")}
    assert "conv/int8" in int8_keys or "dwconv/int8" in int8_keys
    assert any(s.kernel.int8 for s in estimator.samples_) and any(not s.kernel.int8 for s in estimator.samples_)
    path = tmp_path / "cpu.json"
    estimator.save(path)
    loaded = LatencyEstimator.load(path)
    assert set(loaded.regressors_) == set(estimator.regressors_)  # KIND/int8 survives the round trip
    model = build("mobilenetv2", width=0.35, resolution=64)
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    q = api.run(model, "quantize{preset=cpu}", calibration={model.graph.input[0].name: x}, allow_drift=1.0,
                verify=False).model
    shapes = {model.graph.input[0].name: (1, 3, 64, 64)}
    float_ms = loaded.estimate(model, shapes).latency_ms
    int8 = loaded.estimate(q, shapes)
    assert int8.latency_ms > 0 and int8.latency_ms != pytest.approx(float_ms, rel=1e-6)
    # an int8 kernel of a kind profiled in int8 is predicted by the int8 regressor, not the float one
    from hwnas.targets.kernels import decompose

    kind = "conv" if "conv/int8" in int8_keys else "dwconv"
    kernel = next(k for k in decompose(q, shapes, loaded.rules) if k.kind == kind and k.int8)
    as_int8, as_float = loaded.predict_kernels([kernel, dataclasses.replace(kernel, int8=False)])
    assert as_int8.latency_ms != pytest.approx(as_float.latency_ms, rel=1e-6)

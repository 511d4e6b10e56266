"""Large models: weights over LARGE_MODEL_BYTES stay on disk through load, passes, verification and save.

The slow test runs `hwnas run --passes fold-bn` and `hwnas estimate` on a generated model with 2.06 GiB
of weights in child processes and checks their peak RSS against the weights (below 1.5×). The fast
tests force the large-model path on a small model (LARGE_MODEL_BYTES = 0) and check what it must
keep: the same function, the same bytes, external data in the output, nothing read that is not used.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from hwnas import api
from hwnas.cli import main
from hwnas.errors import BadInputError
from hwnas.graph import io as graph_io
from hwnas.graph.gsgraph import ExternalValues, const_value, to_graph, to_model
from hwnas.graph.io import external_refs, load_model, save_model
from hwnas.graph.session import MappedSession, make_session, random_feeds
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.passes.base import PassContext
from hwnas.passes.manager import PassManager
from hwnas.passes.pipeline import parse_pipeline
from scripts.large_model_rss import available_memory, check_output, hwnas, measure, write_large_model

CHANNELS, BLOCKS, SPATIAL = 256, 3, 4  # 256 KiB per conv weight: above INLINE_BYTES, so kept on disk


@pytest.fixture
def lazy(monkeypatch):
    """Every model with external data counts as large."""
    monkeypatch.setattr(graph_io, "LARGE_MODEL_BYTES", 0)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "in" / "m.onnx"
    path.parent.mkdir()
    write_large_model(path, CHANNELS, BLOCKS, SPATIAL)
    return path


def ort_outputs(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_large_model_keeps_its_weights_on_disk(lazy, source):
    model = load_model(source)
    refs = external_refs(model)
    assert len(refs) == BLOCKS
    assert all(os.path.isabs(r.path) and r.path == os.path.realpath(f"{source}.data") for r in refs)
    assert all(not t.raw_data for t in model.graph.initializer if t.name.startswith("w"))
    whole = onnx.load(str(source))
    for tensor in model.graph.initializer:
        ref = graph_io.external_ref(tensor)
        if ref is not None:
            expected = next(t for t in whole.graph.initializer if t.name == tensor.name)
            assert np.array_equal(graph_io.map_external(ref, tensor.data_type, tensor.dims), onnx.numpy_helper.to_array(expected))


def test_small_external_models_are_loaded_whole(source):
    model = load_model(source)  # 768 KiB of external data: far under LARGE_MODEL_BYTES
    assert not external_refs(model)
    assert all(t.raw_data for t in model.graph.initializer)


def test_weights_are_mapped_when_read_and_never_cached(lazy, source):
    graph = to_graph(load_model(source))
    weight = next(t for n in graph.nodes if n.op == "Conv" for t in n.inputs[1:2])
    assert isinstance(weight._values, ExternalValues)
    assert tuple(weight.shape) == (CHANNELS, CHANNELS, 1, 1)  # from the reference: nothing read
    value = const_value(weight)
    assert isinstance(value, np.memmap) and not value.flags.writeable
    assert isinstance(weight._values, ExternalValues)  # so the pages read go when the caller drops them


def test_run_on_a_large_model_is_equivalent_and_writes_external_data(lazy, source, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code = main(["run", str(source), "-o", str(out), "--passes", "fold-bn", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["verified"]
    written = check_output(out)
    assert written["locations"] == ["out.onnx.data"] and written["external_tensors"] >= BLOCKS
    assert written["data_bytes"] >= BLOCKS * CHANNELS * CHANNELS * 4
    x = np.random.default_rng(0).standard_normal((1, CHANNELS, SPATIAL, SPATIAL)).astype(np.float32)
    np.testing.assert_allclose(ort_outputs(out, x), ort_outputs(source, x), rtol=1e-4, atol=1e-5)
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(out), load_external_data=False).graph.node)


def test_weights_a_pass_leaves_alone_are_copied_not_rewritten(lazy, source, tmp_path):
    original = load_model(source)
    ctx = PassContext(template=original, input_shapes=resolve_input_shapes(original))
    graph = PassManager(parse_pipeline("fold-bn{sites=0}")).run(to_graph(original), ctx).graph
    convs = [n for n in graph.nodes if n.op == "Conv"]
    refs = [n.inputs[1]._values.ref for n in convs]
    assert refs[0].path != os.path.realpath(f"{source}.data")  # folded: written to a temporary file
    assert all(r.path == os.path.realpath(f"{source}.data") for r in refs[1:])  # untouched: still the input's
    out = tmp_path / "out.onnx"
    save_model(to_model(graph, original), out)
    before, after = onnx.load(str(source)), onnx.load(str(out))
    for name in ("w1", "w2"):
        old, new = (next(t for t in m.graph.initializer if t.name == name) for m in (before, after))
        assert old.raw_data == new.raw_data


def test_mapped_session_opens_per_run_and_answers_like_a_session(lazy, source):
    model = load_model(source)
    session = make_session(model)
    assert isinstance(session, MappedSession)
    assert [i.name for i in session.get_inputs()] == ["x"]
    feeds = random_feeds(model, resolve_input_shapes(model), seed=0)
    expected = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    first = session.run(None, feeds)[0]
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)  # ORT's default optimizations re-associate
    np.testing.assert_array_equal(session.run(None, feeds)[0], first)


def test_saving_a_large_model_over_its_own_file(lazy, source):
    model = load_model(source)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(source)).graph.initializer}
    save_model(model, source)
    assert external_refs(model)[0].path == os.path.realpath(f"{source}.data")  # follows the new file
    reloaded = onnx.load(str(source))
    for tensor in reloaded.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), values[tensor.name])
    for tensor in model.graph.initializer:  # the caller's model still reads the right bytes
        ref = graph_io.external_ref(tensor)
        if ref is not None:
            np.testing.assert_array_equal(graph_io.map_external(ref, tensor.data_type, tensor.dims), values[tensor.name])


def test_estimate_is_the_same_for_a_large_model(source, monkeypatch):
    whole = api.estimate(source, "npu-32x32")
    monkeypatch.setattr(graph_io, "LARGE_MODEL_BYTES", 0)
    lazy = api.estimate(source, "npu-32x32")
    assert lazy.params_bytes == whole.params_bytes == BLOCKS * (CHANNELS * CHANNELS + 5 * CHANNELS) * 4
    assert lazy.latency_ms == whole.latency_ms


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_broken_external_data_is_bad_input(lazy, source, tmp_path, capsys, damage):
    data = source.with_name(source.name + ".data")
    if damage == "missing":
        data.unlink()
    else:
        with open(data, "r+b") as f:
            f.truncate(1000)
    with pytest.raises(BadInputError, match="external data of tensor 'w0'"):
        load_model(source)
    assert main(["run", str(source), "-o", str(tmp_path / "o.onnx"), "--passes", "fold-bn"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


# ---- the real thing: over 2 GB of weights ----------------------------------------------------------

LARGE = {"channels": 4096, "blocks": 33, "spatial": 2}  # 33 × 64 MiB of conv weights: 2.06 GiB


@pytest.mark.slow
def test_over_2gb_of_weights_run_and_estimate_under_1_5x_the_weights_in_memory(tmp_path):
    weights = LARGE["blocks"] * (LARGE["channels"] ** 2 + 5 * LARGE["channels"]) * 4
    spill = tempfile.gettempdir()
    same_disk = os.stat(spill).st_dev == os.stat(tmp_path).st_dev
    need = {str(tmp_path): (3 if same_disk else 2) * weights * 1.05}  # input, output (+ temporary weights)
    if not same_disk:
        need[spill] = weights * 1.05
    for folder, n in need.items():
        if shutil.disk_usage(folder).free < n:
            pytest.skip(f"needs {n / 2**30:.1f} GiB free in {folder}, has {shutil.disk_usage(folder).free / 2**30:.1f}")
    if available_memory() < 1.5 * weights + (1 << 30):
        pytest.skip(f"needs {(1.5 * weights + (1 << 30)) / 2**30:.1f} GiB of available memory")
    source, out = tmp_path / "large.onnx", tmp_path / "large.opt.onnx"
    assert write_large_model(source, **LARGE) == weights
    assert source.stat().st_size < 4 << 20

    code, rss, stdout, stderr, _ = measure(hwnas("run", str(source), "-o", str(out), "--passes", "fold-bn", "--json"))
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["verified"] and report["verification"]["equivalent"]
    assert rss < 1.5 * weights, f"run: peak RSS {rss:,} bytes = {rss / weights:.2f}x the weights"
    written = check_output(out)
    assert written["model_bytes"] < 1 << 20 and written["locations"] == [out.name + ".data"]
    assert written["data_bytes"] >= LARGE["blocks"] * LARGE["channels"] ** 2 * 4

    code, rss, stdout, stderr, _ = measure(hwnas("estimate", str(source), "--target", "npu-32x32", "--json"))
    assert code == 0, stderr
    assert json.loads(stdout)["params_bytes"] == weights
    assert rss < 1.5 * weights, f"estimate: peak RSS {rss:,} bytes = {rss / weights:.2f}x the weights"

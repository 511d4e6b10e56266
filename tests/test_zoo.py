"""The model zoo: validity, runtime behaviour, determinism and reference costs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from hwnas.graph.flops import count_macs, count_params
from hwnas.models import SPECS, ZOO_NAMES, build, zoo_info

OUTPUT_SHAPES = {
    "mobilenetv2": {"logits": (1, 1000)},
    "ibn-detector": {"boxes": (1, 2034, 4), "scores": (1, 2034, 91)},
    "segmenter": {"logits": (1, 21, 512, 512)},
}
BN_NODES = {"mobilenetv2": 52, "ibn-detector": 76, "segmenter": 47}
BLOCKS = {"mobilenetv2": (16, 17), "ibn-detector": (16, 21), "segmenter": (14, 15)}


@pytest.fixture(scope="module")
def models() -> dict[str, onnx.ModelProto]:
    return {name: build(name) for name in ZOO_NAMES}


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _bn_running_stats(model: onnx.ModelProto) -> int:
    """Elements of the BN running means and variances (inference-only state, not trained weights)."""
    inits = _initializers(model)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    return sum(inits[bn.input[3]].size + inits[bn.input[4]].size for bn in bns)


def _conv_channels(model: onnx.ModelProto) -> list[int]:
    inits = _initializers(model)
    return [inits[n.input[1]].shape[0] for n in model.graph.node if n.op_type == "Conv"]


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_valid_onnx(models, name: str) -> None:
    model = models[name]
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, SPECS[name].default_resolution, SPECS[name].default_resolution]


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_runs_with_sane_outputs(models, name: str) -> None:
    model = models[name]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    res = SPECS[name].default_resolution
    x = np.random.default_rng(0).standard_normal((1, 3, res, res), dtype=np.float32)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))
    assert {k: v.shape for k, v in outputs.items()} == OUTPUT_SHAPES[name]
    for value in outputs.values():
        assert np.isfinite(value).all()
        assert 1e-3 < value.std() < 1e3


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_deterministic(models, name: str) -> None:
    assert build(name, seed=0).SerializeToString() == models[name].SerializeToString()
    assert build(name, seed=1).SerializeToString() != models[name].SerializeToString()


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_batchnorm_unfolded(models, name: str) -> None:
    model = models[name]
    inits = _initializers(model)
    consumers = {i: n for n in model.graph.node for i in n.input}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == BN_NODES[name]
    # LR-ASPP's gate conv is bias-free and feeds a Sigmoid directly, as in torchvision.
    bias_free = [n for n in model.graph.node if n.op_type == "Conv" and len(n.input) == 2]
    for conv in (n for n in bias_free if n.name != "lraspp/scale/conv"):
        assert consumers[conv.output[0]].op_type == "BatchNormalization", conv.name
    for bn in bns:
        scale, bias, mean, var = (inits[i] for i in bn.input[1:])
        assert (var > 0).all()
        assert not np.allclose(scale, 1) and not np.allclose(bias, 0) and not np.allclose(mean, 0)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_block_counts(models, name: str) -> None:
    info = zoo_info(name)
    assert (info.ibn_blocks, info.blocks) == BLOCKS[name]
    assert info.macs == sum(count_macs(models[name]).values())
    assert info.params == count_params(models[name])


def test_mobilenetv2_matches_reference(models) -> None:
    model = models["mobilenetv2"]
    macs, params = sum(count_macs(model).values()), count_params(model)
    assert abs(macs - 300.8e6) / 300.8e6 < 0.01
    assert abs(params - 3_504_872) / 3_504_872 < 0.01
    # Exactly torchvision's trainable parameters, once BN running stats and the ReLU6 bounds are removed.
    assert params - _bn_running_stats(model) - 2 == 3_504_872
    names = {n.name for n in model.graph.node}
    assert {"block4/expand/conv", "block4/dw/conv", "block4/project/bn", "block4/add"} <= names
    assert "block0/expand/conv" not in names


def test_detector_matches_paper(models) -> None:
    model = models["ibn-detector"]
    assert abs(sum(count_macs(model).values()) - 0.8e9) / 0.8e9 < 0.10
    assert abs(count_params(model) - 4.3e6) / 4.3e6 < 0.10
    # The first SSDLite map is block13's 576-channel expansion at 20×20.
    head0 = next(n for n in model.graph.node if n.name == "head0/box/dw/conv")
    assert head0.input[0] == "block13/expand/relu6"
    assert _initializers(model)["block13/expand/conv/weight"].shape[0] == 576


def test_segmenter_matches_torchvision() -> None:
    info = zoo_info("segmenter", resolution=520)
    assert abs(info.macs - 2.086e9) / 2.086e9 < 0.01  # torchvision's lraspp_mobilenet_v3_large at 520²


def test_segmenter_params_match_torchvision(models) -> None:
    model = models["segmenter"]
    assert count_params(model) - _bn_running_stats(model) == 3_221_538


def test_width_and_divisor() -> None:
    assert all(c % 8 == 0 for c in _conv_channels(build("mobilenetv2", width=1.3)))
    assert not all(c % 8 == 0 for c in _conv_channels(build("mobilenetv2", width=1.3, divisor=1)))
    stem = _initializers(build("mobilenetv2", width=0.9, divisor=1))["stem/conv/weight"]
    assert stem.shape[0] == 29  # 32 × 0.9 = 28.8, rounded as torchvision's _make_divisible does
    assert zoo_info("mobilenetv2", width=0.75).macs < zoo_info("mobilenetv2").macs


def test_resolution_option() -> None:
    model = build("ibn-detector", resolution=160, width=0.5)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 160, 160]
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "resnet50"},
        {"name": "mobilenetv2", "width": 0},
        {"name": "mobilenetv2", "width": float("nan")},
        {"name": "mobilenetv2", "resolution": 16},
        {"name": "mobilenetv2", "resolution": 224.0},
        {"name": "mobilenetv2", "divisor": 0},
        {"name": "mobilenetv2", "seed": -1},
    ],
)
def test_invalid_options_raise(kwargs) -> None:
    with pytest.raises(ValueError):
        build(**kwargs)

"""Hints: which depthwise convs to regroup, which blocks to fuse, as the target's estimator sees it.

Every saving a hint states is checked the long way round: its pipeline applied to the model with
`api.run` and the result estimated with `api.estimate`.
"""

from __future__ import annotations

import json

import onnx
import pytest

from hwnas import api
from hwnas.advice import hints
from hwnas.cli import main
from hwnas.estimator.defaults import estimator_for
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.models import build
from hwnas.models._builder import ZooBuilder
from hwnas.models.mobilenetv2 import Block, inverted_residual
from hwnas.search.proxy import architecture_only
from hwnas.search.recipe import full_pipeline
from hwnas.search.space import PREFIX
from hwnas.targets import get_target

NPU = get_target("npu-32x32")


def ibn_net() -> onnx.ModelProto:
    """A stem and five IBN blocks, from 48² and 32 channels down to 3² and 960 expanded channels."""
    b = ZooBuilder(0)
    h = b.conv_bn_act(b.image("input", 3, 96, 96), "stem", 32, "relu6", kernel=3, stride=2)
    for i, block in enumerate([Block(6, 24, 2), Block(6, 64, 2), Block(6, 160, 2), Block(6, 160, 2), Block(6, 160, 1)]):
        h = inverted_residual(b, h, f"block{i}", block)
    return b.model([h], graph_name="ibn_net")


def advise(model: onnx.ModelProto, **kwargs):
    return hints(model, NPU, resolve_input_shapes(model, None), estimator_for(NPU), **kwargs)


def estimated_saving(model: onnx.ModelProto, pipeline: str) -> float:
    """Estimated latency after the exact prefix minus after the prefix and `pipeline` (the architecture)."""
    before = api.run(model, PREFIX, verify=False).model
    after = api.run(model, architecture_only(full_pipeline(pipeline)), allow_drift=1.0, verify=False).model
    return api.estimate(before, NPU).latency_ms - api.estimate(after, NPU).latency_ms


@pytest.fixture(scope="module")
def net():
    return ibn_net()


@pytest.fixture(scope="module")
def net_hints(net):
    return advise(net)


def test_hints_name_every_depthwise_conv_to_regroup(net_hints):
    regroup = [h for h in net_hints if h.kind == "regroup"]
    assert {h.node for h in regroup} == {f"block{i}/dw/conv" for i in range(5)}
    assert all("replace-conv{mode=" in h.pipeline and f"sites=@{h.node}" in h.pipeline for h in regroup)


def test_savings_are_what_the_estimator_says_and_sorted(net, net_hints):
    assert [h.saving_ms for h in net_hints] == sorted((h.saving_ms for h in net_hints), reverse=True)
    for h in net_hints:
        assert h.saving_ms == pytest.approx(estimated_saving(net, h.pipeline), abs=1e-9)


def test_fusion_is_advised_exactly_where_the_estimator_says_it_pays(net, net_hints):
    expands = [f"block{i}/expand/conv" for i in range(5)]
    savings = {e: estimated_saving(net, f"fuse-ibn{{mode=mbconv,sites=@{e}}}") for e in expands}
    advised = {h.node for h in net_hints if h.kind == "mbconv"}
    assert advised == {e for e, s in savings.items() if s > 0.001 * api.estimate(net, NPU).latency_ms}
    assert savings[expands[0]] > 0 > savings[expands[-1]]  # the reference work: early blocks win, late ones lose
    assert all(not h.exact for h in net_hints if h.kind == "mbconv")


def test_exact_hints_run_as_they_are_written(net, net_hints):
    for h in [h for h in net_hints if h.exact][:3]:
        assert api.run(net, full_pipeline(h.pipeline)).verification.equivalent


def test_hints_cli_prints_them_as_json(net, tmp_path, capsys):
    path = tmp_path / "net.onnx"
    onnx.save_model(net, path)
    assert main(["hints", str(path), "--target", "npu-32x32", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["hints"]
    assert [(h["node"], h["pipeline"]) for h in printed] == [(h.node, h.pipeline) for h in advise(net)]


@pytest.mark.slow
def test_mobilenetv2_early_blocks_fuse_late_ones_do_not():
    model = build("mobilenetv2", resolution=96)
    found = advise(model)
    dw = {h.node for h in found if h.kind == "regroup"}
    assert dw == {f"block{i}/dw/conv" for i in range(17)}
    fused = {h.node for h in found if h.kind == "mbconv"}
    savings = {f"block{i}/expand/conv": estimated_saving(model, f"fuse-ibn{{mode=mbconv,sites=@block{i}/expand/conv}}")
               for i in range(1, 17)}
    assert fused == {e for e, s in savings.items() if s > 0.001 * api.estimate(model, NPU).latency_ms}
    assert "block1/expand/conv" in fused and "block16/expand/conv" not in fused

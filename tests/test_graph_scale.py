"""Graph work that must stay linear in the graph's size (issue 18): counted, not timed, so that a busy
machine cannot make these pass or fail."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx_graphsurgeon as gs

from hwnas import api
from hwnas.graph.channels import ChannelGroup, Segment
from hwnas.graph.gsgraph import to_graph, unique_name
from hwnas.passes import _pruning

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from graph_scale import conv_bn_relu_chain  # noqa: E402


def test_unique_name_skips_every_name_in_the_graph_and_the_ones_it_handed_out():
    graph = to_graph(conv_bn_relu_chain(3))
    assert unique_name(graph, "fresh") == "fresh"
    assert unique_name(graph, "fresh") == "fresh_1"  # handed out above, though nothing uses it yet
    assert unique_name(graph, "w0") == "w0_1"  # a weight
    assert unique_name(graph, "conv1") == "conv1_1"  # a node and its output tensor
    assert unique_name(graph, "x") == "x_1"  # the graph input


def test_unique_name_sees_nodes_appended_and_a_new_node_list():
    graph = to_graph(conv_bn_relu_chain(2))
    unique_name(graph, "warm")  # the names are now cached for this graph
    out = gs.Variable("added_out")
    graph.nodes.append(gs.Node("Relu", name="added", inputs=[graph.outputs[0]], outputs=[out]))
    assert unique_name(graph, "added") == "added_1"
    assert unique_name(graph, "added_out") == "added_out_1"
    graph.nodes = list(graph.nodes) + [gs.Node("Relu", name="later", inputs=[out], outputs=[gs.Variable("later_out")])]
    assert unique_name(graph, "later_out") == "later_out_1"


def test_fold_bn_walks_the_tensor_map_a_fixed_number_of_times(monkeypatch):
    """The quadratic cost was `Graph.tensors()` once per new name: 2 names per folded BN."""
    calls = []
    original = gs.Graph.tensors

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    counts = {}
    for blocks in (10, 40):
        calls.clear()
        monkeypatch.setattr(gs.Graph, "tensors", counted)
        api.run(conv_bn_relu_chain(blocks), "fold-bn", verify=False)
        monkeypatch.setattr(gs.Graph, "tensors", original)
        counts[blocks] = len(calls)
    assert counts[40] == counts[10], counts


def _group(gid: int, segments: tuple[Segment, ...] | None = None) -> ChannelGroup:
    return ChannelGroup(gid, 8, (f"t{gid}",), (), (), (), (), segments or (Segment(gid, 8),))


def test_concatenations_index_lists_each_concat_once_per_segment_group_in_order():
    a, b = _group(0), _group(1)
    first = _group(2, (Segment(0, 4), Segment(1, 4)))
    second = _group(3, (Segment(0, 4), Segment(0, 4)))  # a concat of one group with itself
    index = _pruning.concatenations([a, b, first, second])
    assert index == {0: (first, second), 1: (first,)}


def test_fold_bn_on_a_long_chain_folds_every_bn_with_unique_names():
    """fold-bn on a long chain still folds every BN and verifies (names stay unique: ORT would reject a clash)."""
    result = api.run(conv_bn_relu_chain(300), "fold-bn")
    assert result.records[0].stats["folded"] == 300
    assert result.verification.equivalent
    names = [t.name for t in result.model.graph.initializer]
    assert len(names) == len(set(names))


def test_sequential_run_computes_what_the_whole_model_computes_keeping_only_live_tensors():
    from hwnas.passes._reconstruct import SequentialRun, collect_activations
    from hwnas.verify import random_calibration

    model = conv_bn_relu_chain(6)
    graph = to_graph(model)
    samples = random_calibration(model, {"x": (1, 8, 8, 8)}, samples=3, seed=0)["x"]
    feeds = [{"x": x[None]} for x in samples]
    run = SequentialRun(graph, model, feeds)
    nodes = {n.name: n for n in graph.nodes}
    at_conv3 = run.advance(nodes["conv3"])
    assert all(set(values) == {"relu2"} for values in at_conv3)  # conv3's input; everything before it is dropped
    whole = collect_activations(model, ["relu2"], feeds)["relu2"]
    assert all((values["relu2"] == whole[i : i + 1]).all() for i, values in enumerate(at_conv3))
    at_relu5 = run.advance(nodes["relu5"])  # from conv3 on
    assert all((values["bn5"] == collect_activations(model, ["bn5"], [feed])["bn5"]).all()
               for values, feed in zip(at_relu5, feeds))

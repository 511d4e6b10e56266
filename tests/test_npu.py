"""The simulated npu target: closed forms hand-computed, cost cliffs, roofline, configs, real models."""

from __future__ import annotations

import json

import pytest
from onnx import helper
from test_kernels import conv, conv_model, make_model

from hwnas.errors import BadInputError
from hwnas.graph.io import load_model
from hwnas.targets import get_target
from hwnas.targets.kernels import GemmShape, decompose, node_keys
from hwnas.targets.npu import NpuConfig, NpuTarget, array_cycles

NPU32 = NpuTarget(NpuConfig(name="npu-32x32"))


def kernels_and_cycles(target: NpuTarget, model):
    kernels = [k for k in decompose(model, {}, target.rules) if k.kind != "free"]
    return {k.name: target.kernel_cycles(k) for k in kernels}, kernels


def ibn_block(fused: bool):
    """An IBN block at 28², 32→192→32 with its residual Add (DESIGN.md's example); fused: expand+dw → 3×3."""
    if fused:
        first, w1 = conv("x", "fused", 32, 192, k=3)
        body, weights = [first, helper.make_node("Relu", ["fused"], ["b"], name="r1")], w1
    else:
        expand, w1 = conv("x", "expand", 32, 192)
        dw, w2 = conv("a", "dw", 192, 192, k=3, groups=192)
        body = [expand, helper.make_node("Relu", ["expand"], ["a"], name="r1"), dw,
                helper.make_node("Relu", ["dw"], ["b"], name="r2")]
        weights = {**w1, **w2}
    project, w3 = conv("b", "project", 192, 32)
    nodes = [*body, project, helper.make_node("Add", ["project", "x"], ["y"], name="add")]
    return make_model(nodes, {"x": (1, 32, 28, 28)}, {**weights, **w3})


# ---- closed forms ------------------------------------------------------------------------------


def test_channel_cliff_32_to_33_on_a_32x32_array():
    # 1×1 conv at 28², WS: one fold of (2·32 + 32 + 784 − 2) = 878 cycles; at 33 channels K and N each
    # need a second fold: 4 · 878. DESIGN.md quotes SCALE-Sim's 877 and 3,511 (one less per layer).
    assert NPU32.measure(conv_model(28, 32, 32), {}).cycles == 878
    assert NPU32.measure(conv_model(28, 33, 33), {}).cycles == 4 * 878 == 3512
    assert NPU32.measure(conv_model(28, 64, 64), {}).cycles == 4 * 878  # twice the channels, same cost as 33


def test_ibn_block_versus_fused_ibn_on_32x32_ws():
    ibn, kernels = kernels_and_cycles(NPU32, ibn_block(fused=False))
    fold = 2 * 32 + 32 + 28 * 28 - 2  # 878
    assert ibn == {"expand": 6 * fold, "dw": 192 * fold, "project": 6 * fold}  # 5,268 + 168,576 + 5,268
    assert sum(ibn.values()) == 179_112 == 178_918 + 194  # DESIGN.md's SCALE-Sim total + 1 per simulated layer
    fused, fused_kernels = kernels_and_cycles(NPU32, ibn_block(fused=True))
    assert fused == {"fused": 9 * 6 * fold, "project": 6 * fold}  # K = 9·32 → 9 row folds
    assert sum(fused.values()) == 52_680 == 52_678 + 2
    # Compute-bound everywhere: the roofline does not change these numbers; the residual Add rides free.
    assert all(NPU32.kernel_cycles(k) == NPU32.compute_cycles(k) for k in kernels + fused_kernels)
    assert kernels[-1].residual and kernels[-1].nodes == ("project", "add")


def test_output_and_input_stationary_closed_forms():
    model = conv_model(10, 20, 40, k=3)  # P = 100, K = 180, N = 40
    for dataflow, expected in (
        ("ws", 12 * 3 * (2 * 16 + 16 + 100 - 2)),  # ceil(180/16) · ceil(40/16) · (2R + C + P − 2)
        ("os", 7 * 3 * (16 + 16 + 180 - 2)),  # ceil(100/16) · ceil(40/16) · (R + C + K − 2)
        ("is", 12 * 7 * (2 * 16 + 16 + 40 - 2)),  # ceil(180/16) · ceil(100/16) · (2R + C + N − 2)
    ):
        target = get_target(f"npu-16x16:df={dataflow}")
        assert target.measure(model, {}).cycles == expected, dataflow


def test_non_square_array_uses_rows_for_k_and_columns_for_n():
    gemm = GemmShape(p=50, k=40, n=20)
    assert array_cycles(gemm, rows=8, cols=32, dataflow="ws") == 5 * 1 * (16 + 32 + 50 - 2)
    assert array_cycles(gemm, rows=32, cols=8, dataflow="ws") == 2 * 3 * (64 + 8 + 50 - 2)


def test_depthwise_serial_versus_parallel():
    model = conv_model(28, 192, 192, k=3, groups=192)
    fold = 2 * 32 + 32 + 784 - 2
    serial = get_target("npu-32x32").measure(model, {}).cycles
    parallel = get_target("npu-32x32:dw=parallel").measure(model, {}).cycles
    assert serial == 192 * fold  # 192 single-channel layers, one after another
    assert parallel == 6 * fold  # K = 9 on the rows, the 192 channels over the columns
    dense = conv_model(28, 192, 192, k=1)  # the parallel option only changes depthwise convs
    dense_parallel = get_target("npu-32x32:dw=parallel").measure(dense, {}).cycles
    assert dense_parallel == get_target("npu-32x32").measure(dense, {}).cycles


# ---- roofline, vector unit, overhead -----------------------------------------------------------


def test_roofline_bounds_a_memory_bound_elementwise_add():
    shape = (1, 64, 56, 56)
    model = make_model([helper.make_node("Add", ["a", "b"], ["y"], name="add")], {"a": shape, "b": shape}, {})
    (kernel,) = decompose(model, {}, NPU32.rules)
    elements = 64 * 56 * 56
    assert NPU32.compute_cycles(kernel) == elements // 32  # 6,272 on 32 vector lanes
    assert NPU32.memory_cycles(kernel) == 3 * elements // 64  # 9,408: two reads and a write at 64 B/cycle
    assert NPU32.kernel_cycles(kernel) == NPU32.measure(model, {}).cycles == 9408


def test_roofline_kicks_in_for_a_conv_when_dram_is_slow(tmp_path):
    model = conv_model(28, 32, 32)  # 878 compute cycles; 784·32 + 32·32 + 784·32 = 51,200 bytes
    path = tmp_path / "slow.json"
    path.write_text(json.dumps({"rows": 32, "cols": 32, "dram_bytes_per_cycle": 16}))
    assert get_target(str(path)).measure(model, {}).cycles == 51_200 // 16
    path.write_text(json.dumps({"rows": 32, "cols": 32, "bytes_per_element": 2, "dram_bytes_per_cycle": 64}))
    assert get_target(str(path)).measure(model, {}).cycles == 2 * 51_200 // 64  # 1,600 > 878


def test_vector_unit_pools_and_per_op_overhead():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["m"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["m"], ["y"], name="flat"),
    ]
    model = make_model(nodes, {"x": (1, 32, 8, 8)}, {})
    base = get_target("npu-32x32").measure(model, {})
    # Relu: 2,048 outputs / 32 lanes = 64; pool: 512 outputs × 4 reads / 32 = 64; Flatten is free.
    assert base.details["kernels"] == [("relu", "Relu", 64), ("pool", "MaxPool", 64)]
    lanes16 = get_target("npu-32x32:vector_lanes=16").measure(model, {})
    assert lanes16.cycles == 2 * base.cycles
    overhead = get_target("npu-32x32:per_op_overhead_cycles=100").measure(model, {})
    assert overhead.cycles == base.cycles + 2 * 100  # free kernels cost nothing, not even the overhead


def test_unknown_op_costs_cycles_as_other_kernel():
    model = make_model([helper.make_node("Hardmax", ["x"], ["y"], name="hm", axis=1)], {"x": (4, 100)}, {})
    result = NPU32.measure(model, {})
    assert result.details["kernels"] == [("hm", "Hardmax", 13)]  # 400 elements / 32 lanes
    assert result.cycles == 13 and result.latency_ms == pytest.approx(13e-6)


def test_clock_converts_cycles_to_milliseconds():
    model = conv_model(28, 32, 32)
    assert get_target("npu-32x32").measure(model, {}).latency_ms == pytest.approx(878 / 1e6)
    assert get_target("npu-32x32:clock_ghz=2").measure(model, {}).latency_ms == pytest.approx(878 / 2e6)


# ---- lane utilisation --------------------------------------------------------------------------


def test_lane_use_reports_idle_lanes_in_the_last_fold():
    (k30,) = decompose(conv_model(8, 16, 30), {}, NPU32.rules)
    use = NPU32.lane_use(k30)
    assert (use.size, use.folds, use.idle_in_last_fold) == (30, 1, 2)
    assert use.message() == "conv y: 30 output channels, not a multiple of 32 → 2 of 32 lanes idle in its last fold"
    (k64,) = decompose(conv_model(8, 16, 64), {}, NPU32.rules)
    assert NPU32.lane_use(k64).idle_in_last_fold == 0 and NPU32.lane_use(k64).utilization == 1.0
    (dw,) = decompose(conv_model(8, 48, 48, k=3, groups=48), {}, NPU32.rules)
    assert NPU32.lane_use(dw).idle_in_last_fold == 31  # serial depthwise: one channel per pass
    assert get_target("npu-32x32:dw=parallel").lane_use(dw).idle_in_last_fold == 16  # 48 = 32 + 16
    assert get_target("npu-32x32:df=is").lane_use(k30).size == 16  # IS spreads K = 16 over the rows


def test_vector_kernels_have_no_lane_use():
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], {"x": (1, 30, 4, 4)}, {})
    (kernel,) = decompose(model, {}, NPU32.rules)
    assert NPU32.lane_use(kernel) is None


# ---- configuration -----------------------------------------------------------------------------


def test_presets_and_options():
    t16 = get_target("npu-16x16")
    assert (t16.name, t16.parallelism_factor, t16.config.rows, t16.config.lanes) == ("npu-16x16", 16, 16, 16)
    t = get_target("npu-8x64:df=os,dw=parallel,per_op_overhead_cycles=5,dram_bytes_per_cycle=12.5")
    assert (t.config.rows, t.config.cols, t.config.dataflow, t.config.depthwise) == (8, 64, "os", "parallel")
    assert (t.config.per_op_overhead_cycles, t.config.dram_bytes_per_cycle, t.parallelism_factor) == (5, 12.5, 64)
    described = t.describe()
    assert described["config"]["vector_lanes"] == 64 and "Conv" in described["fusion_rules"]["anchors"]


def test_config_file_loads(tmp_path):
    path = tmp_path / "edge.json"
    settings = {"name": "edge-npu", "rows": 16, "cols": 8, "dataflow": "is", "sram_kb": 256, "vector_lanes": 4}
    path.write_text(json.dumps(settings))
    target = get_target(str(path))
    assert (target.name, target.parallelism_factor, target.config.dataflow) == ("edge-npu", 8, "is")
    assert (target.config.lanes, target.config.sram_kb) == (4, 256)
    path.write_text(json.dumps({"rows": 16}))
    assert get_target(str(path)).name == str(path)  # unnamed configs are named by their path


@pytest.mark.parametrize(
    "content, message",
    [
        ({"rows": 32, "colums": 32}, "unknown keys \\['colums'\\]"),
        ({"rows": 0}, "rows must be a positive integer"),
        ({"rows": "32"}, "rows must be a positive integer"),
        ({"cols": True}, "cols must be a positive integer"),
        ({"cols": 16.5}, "cols must be a positive integer"),
        ({"dataflow": "xs"}, "dataflow must be one of ws\\|os\\|is"),
        ({"depthwise": "fast"}, "depthwise must be one of serial\\|parallel"),
        ({"dram_bytes_per_cycle": 0}, "dram_bytes_per_cycle must be a positive number"),
        ({"clock_ghz": -1.0}, "clock_ghz must be a positive number"),
        ({"per_op_overhead_cycles": -3}, "per_op_overhead_cycles must be a non-negative integer"),
        ({"vector_lanes": 0}, "vector_lanes must be a positive integer"),
        ([32, 32], "expected an object"),
    ],
)
def test_bad_config_files_are_bad_input(tmp_path, content, message):
    path = tmp_path / "npu.json"
    path.write_text(json.dumps(content))
    with pytest.raises(BadInputError, match=message):
        get_target(str(path))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("npu-32", "bad npu target"),
        ("npu-0x32", "rows must be a positive integer"),
        ("npu-32x32:speed=9", "unknown npu option 'speed'"),
        ("npu-32x32:rows", "expected key=value"),
        ("npu-32x32:rows=many", "not a number"),
        ("npu-32x32:df=diagonal", "dataflow must be one of"),
    ],
)
def test_bad_specs_are_bad_input(spec, message):
    with pytest.raises(BadInputError, match=message):
        get_target(spec)


def test_unreadable_config_files_are_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="cannot read npu config"):
        get_target(str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{rows: 32")
    with pytest.raises(BadInputError, match="not valid JSON"):
        get_target(str(tmp_path / "broken.json"))


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        NpuConfig().rows = 8  # type: ignore[misc]


# ---- real and zoo models -----------------------------------------------------------------------


def test_real_models_measure_consistently(real_model):
    path, shapes = real_model
    model = load_model(path)
    result = NPU32.measure(model, shapes)
    per_kernel = [c for _, _, c in result.details["kernels"]]
    assert result.cycles == sum(per_kernel) > 0 and min(per_kernel) > 0
    assert result.latency_ms == pytest.approx(result.cycles / 1e6)
    # A quarter of the MAC units can never be faster; the vector unit also halves.
    assert get_target("npu-16x16").measure(model, shapes).cycles > result.cycles


@pytest.mark.parametrize("name", ["mobilenetv2", "ibn-detector", "segmenter"])
def test_zoo_models_decompose_completely(name):
    models = pytest.importorskip("hwnas.models")
    model = models.build(name, resolution=96)
    kernels = decompose(model, {}, NPU32.rules)
    assert sorted(n for k in kernels for n in k.nodes) == sorted(node_keys(model.graph.node))
    assert NPU32.measure(model, {}).cycles > 0

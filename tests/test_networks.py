"""The profiling networks' families beyond mobile CNNs: attention blocks, large-kernel depthwise convs,
large-vocabulary classifiers, pixel shuffles and Softplus (issue 19, deliverable 1), built, run and timed in
context."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from hwnas.estimator.attribution import measure_in_context
from hwnas.estimator.networks import (
    UPSAMPLES,
    BlockConfig,
    NetworkConfig,
    block_of,
    build_network,
    network_around,
    random_head,
    random_network,
    text_line_network,
)
from hwnas.gate import conv_channels
from hwnas.graph.session import make_session, random_feeds, run
from hwnas.targets import get_target
from hwnas.targets.kernels import decompose
from hwnas.targets.measure import MeasureSettings

HYBRID = NetworkConfig(3, 64, (
    BlockConfig("conv", 32, 3, 2, act="relu"),
    BlockConfig("dwsep", 48, 9, 2, act="gelu", op="act"),  # large-kernel depthwise
    BlockConfig("attention", 48, groups=4, hidden=96, act="gelu"),
    BlockConfig("head", 6625, op="classifier", act="none"),  # a text recogniser's vocabulary
), seed=3)


def test_a_hybrid_network_is_a_valid_model_whose_shapes_the_builder_tracked():
    model, inputs = build_network(HYBRID)
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"LayerNormalization", "MatMul", "Softmax", "Erf", "Split", "Transpose", "Gemm"} <= ops
    assert [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim] == [1, 6625]
    assert inputs == [(3, 64), (32, 32), (48, 16), (48, 16)]
    out = run(make_session(model, optimized=True), random_feeds(model, {"x": (1, 3, 64, 64)}, seed=0))
    assert np.isfinite(out[0]).all()


def test_the_attention_kernels_are_batched_gemms_softmax_and_layernorm_of_their_block():
    model, _ = build_network(HYBRID)
    kernels = [k for k in decompose(model, {"x": (1, 3, 64, 64)}, get_target("cpu").rules) if k.kind != "free"]
    attention = [k for k in kernels if block_of(k) == 2]
    batched = [k for k in attention if k.op == "MatMul" and k.gemm and k.gemm.groups == 4]
    assert len(batched) == 2 and all(k.gemm.p == 256 for k in batched)  # 16x16 tokens, 4 heads
    assert {"Softmax", "LayerNormalization"} <= {k.op for k in attention}
    assert any(k.kind == "dwconv" and k.kernel_h == 9 for k in kernels)


@pytest.mark.slow
def test_a_hybrid_network_is_timed_kernel_by_kernel_in_context():
    model, _ = build_network(HYBRID)
    target = get_target("cpu")
    profile = measure_in_context(model, {"x": (1, 3, 64, 64)}, target.rules, MeasureSettings(warmup=1, repeats=3, min_seconds=0))
    timed = {k.name: t for k, t in zip(profile.kernels, profile.latency_ms)}
    ops = {k.op for k in profile.kernels if block_of(k) == 2}
    assert {"MatMul", "Softmax", "LayerNormalization"} <= ops
    assert all(t > 0 for t in timed.values())


def test_random_networks_draw_the_new_families():
    rng = np.random.default_rng(0)
    kinds, kernels, classes = set(), set(), []
    for _ in range(300):
        config = random_network(rng)
        kinds |= {b.kind for b in config.blocks}
        kernels |= {b.kernel for b in config.blocks if b.kind == "dwsep"}
    for _ in range(300):
        head = random_head(rng, 512)
        if head.op == "classifier":
            classes.append(head.c_out)
    assert "attention" in kinds and {7, 9} <= kernels
    assert max(classes) >= 5000


def test_profile_around_turns_attention_kernels_into_attention_blocks_of_their_shape():
    from hwnas.estimator.around import block_unit, kernel_unit

    model, _ = build_network(HYBRID)
    kernels = [k for k in decompose(model, {"x": (1, 3, 64, 64)}, get_target("cpu").rules) if block_of(k) == 2]
    scores = [k for k in kernels if k.op == "MatMul" and k.gemm.groups == 4]
    for k in scores + [next(k for k in kernels if k.op == "LayerNormalization")]:
        block, c, h = block_unit(k)
        assert (block.kind, c, h, block.c_out) == ("attention", 48, 16, 48)
        assert block.groups == (4 if k.op == "MatMul" else 1)
    assert isinstance(kernel_unit(scores[0]), str)  # no one-kernel model has GEMM rows yet: a reason


def test_profile_around_rebuilds_a_shufflenet_units_split_concat_and_channel_shuffle():
    """A ShuffleNet unit's Split, Concat and channel shuffle (a 5-d Transpose): each becomes a split or shuffle block
    whose network holds a kernel of the same op and shapes; a 5-d Transpose of another permutation gets a reason."""
    from hwnas.estimator.around import block_unit

    rules = get_target("cpu").rules
    unit = (BlockConfig("conv", 58, 1), BlockConfig("split", 58, 1, hidden=29, op="dense"), BlockConfig("shuffle", 58, groups=2))
    model, _ = build_network(NetworkConfig(3, 14, unit))
    kernels = [k for k in decompose(model, {"x": (1, 3, 14, 14)}, rules) if k.op in ("Split", "Concat", "Transpose")]
    assert sorted(k.op for k in kernels) == ["Concat", "Split", "Transpose"]
    rng = np.random.default_rng(0)
    for k in kernels:
        block, c, h = block_unit(k)
        assert (block.kind, c, h) == ("shuffle" if k.op == "Transpose" else "split", 58, 14)
        rebuilt, _ = build_network(network_around(rng, block, c, h))
        same = [(x.input_shapes, x.output_shapes) for x in decompose(rebuilt, {"x": (1, 3, 14, 14)}, rules) if x.op == k.op]
        assert (k.input_shapes, k.output_shapes) in same
    other = dataclasses.replace(kernels[0], op="Transpose", input_shapes=((1, 2, 29, 14, 14),), output_shapes=((1, 29, 14, 14, 2),))
    assert "other than a channel shuffle" in block_unit(other)


@pytest.mark.parametrize("form, scale, skip", [("nearest_asymmetric", 4, "add"), ("linear_pytorch", 2, "concat"),
                                              ("nearest", 8, "")])
def test_upsample_blocks_write_the_exporters_resize_and_profile_around_rebuilds_it(form, scale, skip):
    """A feature pyramid's merge (upsample, lateral 1x1 conv, Add) or a segmentation head's 4x/8x upsample,
    with the Resize attributes an exporter writes; `profile --around` builds that block back from the kernel."""
    from hwnas.estimator.around import block_unit

    downs = tuple(BlockConfig("conv", 16, 3, 2) for _ in range(scale.bit_length() - 1))  # back to the skip's size
    blocks = (BlockConfig("conv", 8, 3, 1), *downs, BlockConfig("upsample", 8, op=form, scale=scale, skip=skip))
    shapes = {"x": (1, 3, 32, 32)}
    model, _ = build_network(NetworkConfig(3, 32, blocks))
    kernels = decompose(model, shapes, get_target("cpu").rules)
    resize = next(k for k in kernels if k.op == "Resize")
    assert (resize.input_shapes[0][2], resize.output_shapes[0][2]) == (32 // scale, 32)
    assert resize.interpolation.split(":")[0] == UPSAMPLES[form]["mode"]
    joins = [op for k in kernels for op in k.ops if op in ("Add", "Concat")]  # the Add rides in the lateral conv
    assert joins == {"add": ["Add"], "concat": ["Concat"]}.get(skip, [])
    block, c, h = block_unit(resize)
    assert (block.kind, block.op, block.scale, c, h) == ("upsample", form, scale, 16, 32 // scale)
    out = run(make_session(model, optimized=True), random_feeds(model, shapes, seed=0))
    assert np.isfinite(out[0]).all()


def test_a_learnable_affine_around_the_activation_leaves_the_one_after_it_to_kernels_of_its_own():
    """PP-LCNetV3 (PP-OCRv5 det): a · act(conv(x)) + b; ORT folds an affine into the conv before the
    activation only, so the profiling networks time the one after it as the kernels the estimator cuts."""
    config = NetworkConfig(8, 16, (BlockConfig("affine", 16, 3, 1, act="hardswish", op="around_act"),
                                   BlockConfig("conv", 8, 1, 1, act="relu")), seed=0)
    model, _ = build_network(config)
    kernels = [k for k in decompose(model, {"x": (1, 8, 16, 16)}, get_target("cpu").rules) if k.kind != "free"]
    assert [k.ops for k in kernels] == [("Conv", "BatchNormalization", "Mul", "Add", "HardSwish"), ("Mul",), ("Add",),
                                        ("Conv", "BatchNormalization", "Relu")]
    out = run(make_session(model, optimized=True), random_feeds(model, {"x": (1, 8, 16, 16)}, seed=0))
    assert np.isfinite(out[0]).all()


# rapidocr lite's detector: a 6-d space-to-depth Reshape/Transpose/Reshape, a DepthToSpace and a Softplus
SHUFFLES = NetworkConfig(3, 64, (
    BlockConfig("conv", 16, 3, 2, act="relu"),
    BlockConfig("pixel_shuffle", 24, act="hardswish", op="space_to_depth"),  # 16 at 32² -> 64 at 16², 1x1 to 24
    BlockConfig("pixel_shuffle", 16, act="relu", op="depth_to_space"),  # 24 at 16² -> 6 at 32², 1x1 to 16
    BlockConfig("pixel_shuffle", 8, act="softplus", op="DepthToSpace"),  # 16 at 32² -> 4 at 64², 1x1 to 8
), seed=2)


def test_pixel_shuffles_and_softplus_build_run_and_are_timed_in_context():
    model, inputs = build_network(SHUFFLES)
    onnx.checker.check_model(model, full_check=True)
    assert inputs == [(3, 64), (16, 32), (24, 16), (16, 32)]
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim] == [1, 8, 64, 64]
    transposes = {tuple(a.ints) for n in model.graph.node if n.op_type == "Transpose" for a in n.attribute}
    assert transposes == {(0, 1, 3, 5, 2, 4), (0, 1, 4, 2, 5, 3)}
    assert {"DepthToSpace", "Softplus"} <= {n.op_type for n in model.graph.node}
    shapes = {"x": (1, 3, 64, 64)}
    out = run(make_session(model, optimized=True), random_feeds(model, shapes, seed=0))
    assert out[0].shape == (1, 8, 64, 64) and np.isfinite(out[0]).all()
    rules = get_target("cpu").rules
    profile = measure_in_context(model, shapes, rules, MeasureSettings(warmup=1, repeats=3, min_seconds=0))
    assert profile.dropped == ()
    timed = {k.op: k for k in profile.kernels}
    assert {"Transpose", "DepthToSpace", "Softplus"} <= set(timed)  # Softplus: a kernel of its own (ORT fuses it nowhere)
    assert sorted(len(k.input_shapes[0]) for k in profile.kernels if k.op == "Transpose") == [6, 6]
    assert all(t > 0 for t in profile.latency_ms)


def test_random_networks_draw_pixel_shuffles_and_softplus():
    rng = np.random.default_rng(1)
    forms, acts = set(), set()
    for _ in range(300):
        config = random_network(rng)
        forms |= {b.op for b in config.blocks if b.kind == "pixel_shuffle"}
        acts |= {b.act for b in config.blocks}
    assert forms == {"space_to_depth", "depth_to_space", "DepthToSpace"} and "softplus" in acts


def test_a_1d_depthwise_block_builds_runs_and_is_timed_as_a_1d_dwconv():
    config = NetworkConfig(3, 32, (BlockConfig("conv", 16, 3, 2, act="relu"), BlockConfig("dwsep", 24, 9, act="gelu", op="1d")))
    model, _ = build_network(config)
    onnx.checker.check_model(model, full_check=True)
    shapes = {"x": (1, 3, 32, 32)}
    out = run(make_session(model, optimized=True), random_feeds(model, shapes, seed=0))
    assert out[0].shape == (1, 24, 16, 16) and np.isfinite(out[0]).all()
    profile = measure_in_context(model, shapes, get_target("cpu").rules, MeasureSettings(warmup=1, repeats=3, min_seconds=0))
    dw = [k for k in profile.kernels if k.kind == "dwconv"]
    assert [(k.input_shapes[0], k.kernel_h, k.groups) for k in dw] == [((1, 16, 256), 9, 16)]
    assert all(t > 0 for t in profile.latency_ms) and profile.dropped == ()


def test_random_networks_draw_1d_depthwise_blocks():
    rng = np.random.default_rng(2)
    ops = {b.op for _ in range(300) for b in random_network(rng).blocks if b.kind == "dwsep"}
    assert "1d" in ops


def test_random_networks_draw_resnet_stems_and_segmentation_heads():
    rng = np.random.default_rng(3)
    configs = [random_network(rng) for _ in range(300)]
    assert {3, 5, 7} <= {c.blocks[0].kernel for c in configs if c.c_in == 3 and c.size >= 32}
    segmenters = [c for c in configs if c.blocks and c.blocks[-1].kind == "head" and c.blocks[-1].op == "segment"]
    assert segmenters
    for config in segmenters[:3]:  # the classes bilinearly resized back to the input's side (2x if not smaller)
        model, inputs = build_network(config)
        side = max(config.size, 2 * inputs[-1][1])
        last = model.graph.node[-1]
        assert last.op_type == "Resize" and {a.name: a.s for a in last.attribute}["mode"] == b"linear"
        feeds = random_feeds(model, {"x": (1, config.c_in, config.size, config.size)}, seed=0)
        (y,) = run(make_session(model, optimized=True, threads=1), feeds)
        assert y.shape == (1, config.blocks[-1].c_out, side, side)


def test_random_networks_keep_one_channel_layout_as_real_models_do():
    """Aligned networks: nearly every conv's output a multiple of 8 (SE squeezes and splits derive theirs);
    unaligned ones (ShuffleNet's 58/116, widths without a divisor): rarely, so ORT's blocked layout is the
    exception there, not a change at every conv."""
    rng = np.random.default_rng(4)
    by_layout: dict[str, list[float]] = {"aligned": [], "unaligned": []}
    for layout, shares in by_layout.items():
        for _ in range(60):
            model, _ = build_network(random_network(rng, layout))
            counts = [c.outputs for c in conv_channels(model, None) if c.outputs > 8]
            if counts:
                shares.append(np.mean([c % 8 == 0 for c in counts]))
    assert len(by_layout["aligned"]) > 30 and len(by_layout["unaligned"]) > 20
    assert np.mean(by_layout["aligned"]) > 0.9
    assert np.mean(by_layout["unaligned"]) < 0.3
    with pytest.raises(ValueError, match="channel layout"):
        random_network(rng, "Aligned")


def test_the_mobile_mix_draws_depthwise_blocks_more_often_and_int8_networks_use_it():
    """The int8 networks' mix (what is deployed quantized): inverted bottlenecks and depthwise-separable blocks
    more often than in the mix of every family; a profile draws its int8 networks from it."""
    from hwnas.estimator.profile import is_int8_network

    def depthwise_share(mix: str) -> float:
        rng = np.random.default_rng(5)
        kinds = [b.kind for _ in range(200) for b in random_network(rng, mix=mix).blocks]
        return float(np.mean([k in ("ibn", "dwsep") for k in kinds]))

    assert depthwise_share("mobile") > depthwise_share("any") + 0.1
    with pytest.raises(ValueError, match="block mix"):
        random_network(np.random.default_rng(0), mix="Mobile")
    quantize = object()  # only whether there is a quantizer matters
    assert [is_int8_network(i, quantize, 2) for i in range(4)] == [False, True, False, True]
    assert all(is_int8_network(i, quantize, 1) for i in range(3)) and not is_int8_network(1, None, 2)


def test_an_lstm_head_scores_each_step_over_a_vocabulary_as_ctc_recognisers_do():
    head = BlockConfig("head", 6625, op="lstm", hidden=512, groups=2)
    config = NetworkConfig(3, 32, (BlockConfig("conv", 64, 3, 2), BlockConfig("conv", 64, 3, 2), head))
    model, _ = build_network(config)
    assert [n.op_type for n in model.graph.node[-3:]] == ["LSTM", "Reshape", "Gemm"]
    (y,) = run(make_session(model, optimized=True, threads=1), random_feeds(model, {"x": (1, 3, 32, 32)}, seed=0))
    assert y.shape == (8, 6625) and np.isfinite(y).all()
    rng = np.random.default_rng(5)
    heads = [h for h in (random_head(rng, 512, 16) for _ in range(600)) if h.op == "lstm"]
    assert {h.hidden for h in heads} >= {256, 512} and any(h.c_out >= 1000 for h in heads) and any(h.c_out == 1 for h in heads)


def test_text_line_networks_are_wide_and_keep_their_width_through_height_only_strides():
    rng = np.random.default_rng(3)
    shapes_seen, height_only = set(), 0
    for _ in range(12):
        config = text_line_network(rng)
        assert config.width >= 4 * config.size and config.keep_width_below == config.size // 4
        model, _ = build_network(config)
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model)
        dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
        dims["x"] = [1, 3, config.size, config.width]
        for node in model.graph.node:
            strides = next((list(a.ints) for a in node.attribute if a.name == "strides"), None)
            if node.op_type in ("Conv", "MaxPool", "AveragePool") and strides and max(strides) == 2:
                rows = dims[node.input[0]][2]
                assert strides == ([2, 1] if rows < config.keep_width_below else [2, 2]), (node.name, rows, strides)
                height_only += strides == [2, 1]
            if node.op_type == "Conv" and len(dims.get(node.output[0], [])) == 4:
                shapes_seen.add(tuple(dims[node.output[0]][2:]))
        feeds = random_feeds(model, {"x": (1, 3, config.size, config.width)}, seed=0)
        outputs = run(make_session(model, optimized=True, threads=1), feeds)
        assert all(np.isfinite(o).all() for o in outputs)
    # maps of a few rows by tens of columns, which square networks never make
    assert height_only > 0 and any(h <= 6 and w >= 6 * h for h, w in shapes_seen)


"""Property tests: every exact pass (each option set) and a few exact pipelines on random CNNs.

The graphs come from `tests/strategies.py`. Whatever exact passes are registered when the tests run
are tested; a pass with no applicable site in a graph is fine, anything but a verified result or a
clean skip is not. Runs are reproducible (`derandomize=True`, no example database). The default suite
tries HWNAS_EXAMPLES (25) graphs per pass; `scripts/fuzz_passes.py --graphs N` is the nightly-size run.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings

from hwnas.graph.session import make_session, random_feeds
from tests.strategies import (
    ACTIVATIONS,
    OPSETS,
    OPTION_SETS,
    analysis_shapes,
    cnn_models,
    describe,
    exact_pipelines,
    exact_specs,
    generate,
    pass_variants,
    run_exact,
    spec_text,
)

EXAMPLES = int(os.environ.get("HWNAS_EXAMPLES", "25"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check_exact(model: onnx.ModelProto, spec: str) -> None:
    outcome = run_exact(model, spec)
    assert outcome.status in ("verified", "no-site"), f"{spec}: {outcome.status}: {outcome.detail}\n{describe(model)}"


# -- the passes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", exact_specs())
@PROPERTY
@given(model=cnn_models())
def test_exact_pass_is_exact_on_random_cnns(spec, model):
    check_exact(model, spec)


@pytest.mark.parametrize("pipeline", exact_pipelines())
@PROPERTY
@given(model=cnn_models())
def test_exact_pipeline_is_exact_on_random_cnns(pipeline, model):
    check_exact(model, pipeline)


def test_option_sets_name_real_options():
    """A renamed option must not silently drop a pass from these tests (an unoffered mode only warns)."""
    from hwnas.passes import get_pass

    for variant in pass_variants():
        if variant.exact is not None:
            continue
        name = variant.spec.split("{")[0]
        known = {doc["name"] for doc in get_pass(name).option_docs()}
        options = next(o for o in OPTION_SETS[name] if spec_text(name, o) == variant.spec)
        missing = sorted(set(options) - known)
        assert not missing, f"{variant.spec}: the pass has no option {missing} (options: {sorted(known)})"
        warnings.warn(f"{variant.spec} is not offered by the pass (yet): {variant.problem}", stacklevel=1)


# -- the generator ---------------------------------------------------------------------------------


@PROPERTY
@given(model=cnn_models())
def test_generated_models_are_valid_and_run(model):
    onnx.checker.check_model(model, full_check=True)
    shapes = analysis_shapes(model)
    session = make_session(model)
    outputs = session.run(None, random_feeds(model, shapes, 0))
    assert all(np.isfinite(o).all() and np.abs(o).max() < 1e3 for o in outputs)
    if any(d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim):
        n, c, h, w = shapes["x"]
        session.run(None, random_feeds(model, {"x": (n, c, h + 3, w + 5)}, 0))  # any size runs


def test_generate_is_deterministic():
    assert generate(11).SerializeToString() == generate(11).SerializeToString()
    assert generate(11).SerializeToString() != generate(12).SerializeToString()


def _is_prime(n: int) -> bool:
    return n > 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def graph_features(model: onnx.ModelProto) -> set[str]:
    """The features a generated graph has, read off the graph itself (not the generator's notes)."""
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    op_of = lambda name: producer[name].op_type if name in producer else None  # noqa: E731
    found = {f"opset:{model.opset_import[0].version}"}
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if any(d.dim_param for d in dims):
        found.add("dynamic")
    if any(n.op_type == "Constant" for n in model.graph.node):
        found.add("constant-nodes")
    for n in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        op = n.op_type
        if op == "Conv":
            w = consts[n.input[1]]
            if "auto_pad" in attrs:
                found.add("auto_pad")
            if "kernel_shape" not in attrs:
                found.add("no-kernel_shape")
            if sum(u.op_type == "Conv" and u.input[1] == n.input[1] for u in users[n.input[1]]) > 1:
                found.add("shared-weight")
            group = attrs.get("group", 1)
            out, cin = w.shape[0], w.shape[1] * group
            found.add("odd-channels" if out % 2 else "even-channels")
            if _is_prime(out):
                found.add("prime-channels")
            if len(n.input) > 2:
                found.add("conv-bias")
            if group == cin and cin > 1:
                found.add(f"depthwise-k{w.shape[2]}-s{attrs.get('strides', [1])[0]}")
            elif group > 1:
                found.add("grouped")
        elif op == "BatchNormalization":
            found.add("bn")
        elif op in ("Mul", "Add") and op_of(n.input[0]) == "Conv" and any(i in consts for i in n.input):
            found.add("affine")
        elif op == "Add" and not any(i in consts for i in n.input) and all(op_of(i) for i in n.input):
            found.add("residual")
        elif op == "Concat":
            found.add("concat" if attrs["axis"] == 1 else "concat-negative-axis")
        elif op == "Relu":
            feeds = producer.get(n.input[0])
            in_se = feeds is not None and feeds.op_type == "Conv" and op_of(feeds.input[0]) == "GlobalAveragePool"
            found.add("se-relu" if in_se else "act:relu")
        elif op == "Clip":
            add = producer.get(n.input[0])
            x = None
            if add is not None and add.op_type == "Add":
                x = next((i for i in add.input if i not in consts), None)
            paddle = x is not None and any(u.op_type == "Mul" and x in u.input for u in users.get(n.output[0], []))
            found.add("act:paddle_hswish" if paddle else "act:relu6")
        elif op in ("HardSwish", "PRelu", "LeakyRelu"):
            found.add(f"act:{op.lower()}")
        elif op in ("HardSigmoid", "Sigmoid"):
            if any(u.op_type == "Mul" and n.input[0] in u.input for u in users.get(n.output[0], [])):
                found.add("act:hsig_x" if op == "HardSigmoid" else "act:sigmoid_x")
            chain = [n.input[0]]
            for _ in range(3):
                feeds = producer.get(chain[-1])
                chain.append(feeds.input[0] if feeds is not None and feeds.input else "")
            if [op_of(t) for t in chain] == ["Conv", "Relu", "Conv", "GlobalAveragePool"]:
                found.add("se")
        elif op in ("Identity", "Dropout", "Reshape", "Gemm", "MatMul", "MaxPool", "AveragePool", "Pad", "ReduceMean",
                    "Transpose", "Sub"):
            found.add(op.lower())
    if analysis_shapes(model)["x"][0] == 2:
        found.add("batch-2")
    if len(model.graph.output) > 1:
        found.add("extra-output")
    return found


def test_generator_makes_every_feature_it_claims():
    counts: Counter = Counter()
    for seed in range(300):
        model = generate(seed)
        features = graph_features(model)
        counts.update(features)
        if model.opset_import[0].version < 14:
            assert "act:hardswish" not in features, f"seed {seed}: HardSwish below opset 14"
    wanted = {
        *(f"opset:{v}" for v in OPSETS),
        *(f"act:{a}" for a in ACTIVATIONS if a != "none"),
        *(f"depthwise-k{k}-s{s}" for k in (3, 5, 7) for s in (1, 2)),
        "residual", "concat", "se", "grouped", "odd-channels", "prime-channels", "bn", "conv-bias", "affine",
        "dynamic", "batch-2", "constant-nodes", "identity", "dropout", "reshape", "extra-output", "gemm", "matmul",
        "maxpool", "averagepool", "auto_pad", "no-kernel_shape", "shared-weight", "pad", "reducemean", "transpose",
        "sub", "concat-negative-axis",
    }  # fmt: skip
    missing = sorted(f for f in wanted if counts[f] < 3)
    assert not missing, f"features made fewer than 3 times in 300 graphs: {missing}"

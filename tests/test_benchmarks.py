"""`benchmarks/run_all.py --quick` reproduces the numbers committed with BENCHMARKS.md, and its layout.

benchmarks/results/run_all/numbers.json holds the numbers of BENCHMARKS.md's tables. Keys name every setting a number
depends on, and the full run's searches are longer versions of the quick run's (a seeded search's first
N candidates do not depend on how many follow), so the two runs share many keys: best-so-far latencies
at fixed evaluation counts, byte counts, measured speed ratios. The shared ones must agree — simulated
and other deterministic numbers tightly, measured ORT CPU ratios loosely (tolerances in
benchmarks/_common.py, printed in BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS / "studies"))  # one-off studies: estimator_kernels, residency_probe...

from _common import close  # noqa: E402

# the quick sections whose numbers the full run also has (detector, segmenter, reconstruction: other settings)
SECTIONS = ["search", "memory", "peers", "align"]
MIN_SHARED = 10


def committed_numbers() -> dict:
    path = BENCHMARKS / "results" / "run_all" / "numbers.json"
    if not path.exists():
        pytest.skip("no benchmarks/results/run_all/numbers.json yet: run `python benchmarks/run_all.py`")
    return json.loads(path.read_text(encoding="utf-8"))


def check_layout(markdown: str, folder: Path) -> None:
    """The headline table within the first 80 lines, every SECTIONS entry a section, every link a file."""
    import run_all

    head = markdown.splitlines()[:80]
    assert "## Headline results" in head
    start = head.index("## Headline results") + 2
    assert head[start].startswith("| claim | number | peer / reference | date | regenerate |")
    assert sum(line.startswith("| ") for line in head[start:]) >= 1 + len(run_all.HEADLINES)
    titles = re.findall(r"^## (.+)$", markdown, re.M)
    assert titles[0] == "Headline results"
    links = re.findall(r"\]\(([^)#]+)\)", markdown)
    assert links and all((folder / link).exists() for link in links), [l for l in links if not (folder / l).exists()]


def test_committed_benchmarks_have_the_headline_first_and_link_only_existing_files():
    import run_all

    markdown = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    check_layout(markdown, ROOT)
    titles = re.findall(r"^## (.+)$", markdown, re.M)
    assert titles[1:] == [s.title for s in run_all.SECTIONS]
    assert "not in this run" not in markdown.split("## Headline results")[1].split("\n## ")[0]
    assert len(markdown.splitlines()) < 400


def test_split_tables_moves_the_later_tables_with_their_labels():
    import run_all

    text = "intro\n\n| a |\n|---|\n| 1 |\n\nnote\n\n**second**\n\n| b |\n|---|\n| 2 |\n\nafter"
    shown, rest = run_all.split_tables(text, 1)
    assert shown == "intro\n\n| a |\n|---|\n| 1 |\n\nnote"
    assert rest == "**second**\n\n| b |\n|---|\n| 2 |\n\nafter"
    assert run_all.split_tables(text, 0) == ("intro", text[len("intro\n\n"):])
    assert run_all.split_tables(text, 2) == (text, "")


def test_close_uses_the_kind():
    assert close("deterministic", 1.0005, 1.0)
    assert not close("deterministic", 1.01, 1.0)
    assert close("measured", 1.2, 1.0)
    assert not close("measured", 1.5, 1.0)
    assert close("measured", True, True) and not close("measured", False, True)


@pytest.mark.slow
def test_quick_run_matches_committed_numbers(tmp_path):
    committed = committed_numbers()
    out = tmp_path / "numbers.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run_all.py"), "--quick", "--sections", *SECTIONS,
         "--out", str(tmp_path / "BENCHMARKS.md"), "--plots", str(tmp_path / "plots"), "--numbers-out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_layout((tmp_path / "BENCHMARKS.md").read_text(encoding="utf-8"), tmp_path)
    fresh = json.loads(out.read_text(encoding="utf-8"))
    shared = sorted(set(fresh) & set(committed))
    deterministic = [k for k in shared if committed[k]["kind"] == "deterministic"]
    assert len(deterministic) >= MIN_SHARED, (
        f"only {len(deterministic)} deterministic numbers in common with BENCHMARKS.md: regenerate it "
        "(python benchmarks/run_all.py)"
    )
    # Measured ORT CPU numbers are compared only when HWNAS_BENCH_MEASURED=1: on a shared CI machine the
    # load decides them (spreads of 40-100 % were recorded), and a gate on noise would only be noise.
    compared = shared if os.environ.get("HWNAS_BENCH_MEASURED") == "1" else deterministic
    wrong = [
        f"{k}: quick run {fresh[k]['value']!r}, BENCHMARKS.md {committed[k]['value']!r} ({committed[k]['kind']})"
        for k in compared
        if not close(committed[k]["kind"], fresh[k]["value"], committed[k]["value"])
    ]
    assert not wrong, f"{len(wrong)} of {len(compared)} shared numbers differ:\n" + "\n".join(wrong)


def test_greedy_study_visits_the_decisions_in_a_seeded_order():
    """convergence-greedy's seeds differ only by the order greedy descent visits the decisions in."""
    import search_npu

    from hwnas.models import build

    model = build("mobilenetv2", width=0.35, resolution=64)

    def run(order_seed):
        return search_npu.subspace_search(model, "npu-32x32", search_npu.EXACT_KINDS, 6, expert=False,
                                          algorithm="greedy", workers=1, order_seed=order_seed)

    plain, first, second = run(None), run(0), run(1)
    orders = [[d.key for d in s.space.decisions] for s in (plain, first, second)]
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(orders[2]) and orders[1] != orders[2]
    assert [d.kind for d in plain.space.decisions] == sorted((d.kind for d in plain.space.decisions),
                                                             key=search_npu.EXACT_KINDS.index)
    assert run(1).trials[1].candidate == second.trials[1].candidate  # the same seed, the same order
    for sub in (first, second):
        assert sub.trials[0].pipeline == ""  # the baseline first, then the first decision's alternatives
        changed = [key for key, choice in sub.trials[1].candidate.items() if choice != search_npu.KEEP]
        assert changed == [sub.space.decisions[0].key]


def test_estimator_kernels_compares_each_kernel_in_context():
    import estimator_kernels

    from hwnas.graph.shapes import resolve_input_shapes
    from hwnas.models import build

    model = build("mobilenetv2", width=0.35, resolution=64)
    text = estimator_kernels.kernel_errors(model, resolve_input_shapes(model), worst=3)
    head, kinds, worst = text.split("\n\n")
    measured = float(head.split("kernels measured in context ")[1].split(" ms")[0])
    rows = [line.split(" | ") for line in kinds.splitlines()[2:]]
    assert {"conv", "dwconv", "gemm"} <= {row[0].strip("| ") for row in rows}
    assert sum(float(row[3]) for row in rows) == pytest.approx(measured, abs=0.002 * len(rows))
    assert len(worst.splitlines()) == 2 + 3


def test_estimator_cv_holds_each_network_out_of_its_own_fit():
    import estimator_cv

    from hwnas.estimator.defaults import estimator_for
    from hwnas.targets import get_target

    shipped = estimator_for(get_target("cpu"))
    networks = sorted({s.network for s in shipped.samples_ if s.network is not None})[:12]
    small = shipped.refitted([s for s in shipped.samples_ if s.network in networks])
    predicted = estimator_cv.cross_validate(small, folds=3, seed=0)
    in_sample = np.array([e.latency_ms for e in small.predict_kernels([s.kernel for s in small.samples_])])
    live = np.array([s.kernel.kind != "free" for s in small.samples_])
    assert (predicted[live] > 0).all()
    # held out, so not the in-sample fit (which the boosted trees bend towards every sample)
    assert np.median(np.abs(np.log(predicted[live] / in_sample[live]))) > 0.01
    tables = estimator_cv.cv_tables(small, predicted)
    all_row = next(line for line in tables.splitlines() if line.startswith("| all |"))
    assert int(all_row.split(" | ")[1]) == len(networks)


@pytest.mark.slow
def test_profile_replay_rebuilds_the_random_third_of_a_profile():
    import profile_replay

    from hwnas import api
    from hwnas.estimator.profile import profile_target
    from hwnas.targets import get_target

    estimator, _ = profile_target(get_target("cpu:warmup=1,repeats=3,min_seconds=0"), 90, seed=3,
                                  quantize=api.profiling_quantizer())
    third = estimator.samples_[:30]  # the profile's random third, two networks: a float one, then an int8 one
    matched = profile_replay.matched_samples(estimator)
    assert [s for s, _ in matched] == third  # every sample of the third, its kernel rebuilt
    assert any(k.int8 for _, k in matched) and all(s.kernel == k for s, k in matched)


def test_residency_probe_widens_only_the_classifier():
    import residency_probe

    from hwnas.targets.kernels import decompose
    from hwnas.graph.shapes import resolve_input_shapes
    from hwnas.models import build
    from hwnas.targets import get_target
    from hwnas.graph.session import make_session, random_feeds, run

    base = build("mobilenetv2", width=0.35, resolution=64)
    shapes = resolve_input_shapes(base)
    wide = residency_probe.with_classes(base, 3000)
    rules = get_target("cpu").rules
    before, after = decompose(base, shapes, rules), decompose(wide, shapes, rules)
    changed = [(a.name, b.weight_elements - a.weight_elements) for a, b in zip(before, after) if a != b]
    features = next(k.c_in for k in before if k.name == "logits")
    assert changed == [("logits", 2000 * (features + 1))]  # the classifier alone (weights and bias), 1000 -> 3000 outputs
    outputs = run(make_session(wide, optimized=True), random_feeds(wide, shapes, seed=0))
    assert outputs[0].shape == (1, 3000) and np.isfinite(outputs[0]).all()
    assert base.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 1000  # the input model is untouched


def test_machine_drift_measures_rounds_and_summarizes_them():
    import machine_drift

    from hwnas.targets.measure import MeasureSettings

    spec = machine_drift.parse_model("ibn-detector:width=0.5,resolution=256")
    assert spec == ("ibn-detector", {"width": 0.5, "resolution": 256})
    assert machine_drift.parse_model("segmenter") == ("segmenter", {})
    with pytest.raises(ValueError, match="depth=2"):
        machine_drift.parse_model("mobilenetv2:depth=2")
    spec = "mobilenetv2:width=0.35,resolution=64"
    rounds, load = machine_drift.drift([spec], 0.0, MeasureSettings(warmup=1, repeats=3, min_seconds=0))
    assert len(load) == 1 and len(rounds[spec]) == 1 and rounds[spec][0] > 0
    table = machine_drift.markdown({"m": [1.0, 1.02, 0.9, 1.2]}, [0.5, 0.7, 0.6, 0.6])
    row = table.splitlines()[-1]
    # median 1.01: lowest 0.9 (-10.9 %), highest 1.2 (+18.8 %), 10th / 90th percentiles (numpy's linear
    # interpolation) 0.93 / 1.146, two of four rounds within ±5 %
    assert row == "| m | 1.010 | -10.9% | -7.9% | +13.5% | +18.8% | 50% |"
    assert table.startswith("4 rounds; 1-minute load average 0.50–0.70")


def test_profile_levels_divides_a_profiles_overall_level_out():
    import profile_levels

    consensus = {"a": 1.0, "b": 2.0, "c": 4.0, "d": 8.0, "e": 10.0}
    predicted = {name: ms * 1.1 for name, ms in consensus.items()} | {"e": 13.0}  # 10 % high overall, e 30 %
    level, raw, levelled = profile_levels.levelled_errors(predicted, consensus)
    assert level == pytest.approx(0.1)
    assert raw == pytest.approx([10, 10, 10, 10, 30])
    assert levelled[:4] == pytest.approx([0, 0, 0, 0], abs=1e-9) and levelled[4] == pytest.approx(100 * (1.3 / 1.1 - 1))
    assert profile_levels.scores(levelled) == "80% / 80% / 3.6 %"


def test_pool_int8_draws_takes_each_draw_from_its_own_profile():
    """Draw 1 of one `--int8-draws 2` profile with draw 2 of another: their int8 samples and records, the float
    samples of the base, the networks numbered after those before them."""
    import pool_int8_draws

    from hwnas.estimator.estimator import LatencyEstimator, Sample

    shipped = LatencyEstimator.load(ROOT / "hwnas/estimator/data/estimators/cpu.json")
    floats = [s for s in shipped.samples_ if not s.kernel.int8 and s.network is not None][:60]
    int8 = [s for s in shipped.samples_ if s.kernel.int8][:40]

    def two_draws(first: float, second: float, seed: int) -> LatencyEstimator:
        # float networks 0-9, draw 1 on networks 10-14, draw 2 on 15-19; each draw's int8 times scaled as given
        samples = [Sample(s.kernel, s.latency_ms, i % 10, 1.0) for i, s in enumerate(floats)]
        samples += [Sample(s.kernel, first * s.latency_ms, 10 + i % 5, 1.0) for i, s in enumerate(int8)]
        samples += [Sample(s.kernel, second * s.latency_ms, 15 + i % 5, 1.0) for i, s in enumerate(int8)]
        config = {"profiling": {"seed": 0}, "int8_profiling": {"seed": seed, "networks_from": 10},
                  "int8_2_profiling": {"seed": seed + 1, "networks_from": 15}}
        return LatencyEstimator(shipped.target, shipped.parallelism_factor, shipped.rules, config).fit(samples)

    a, b = two_draws(2.0, 3.0, seed=31), two_draws(5.0, 7.0, seed=41)
    pooled = pool_int8_draws.pool(a, [(a, 1), (b, 2)])
    times = sorted(s.latency_ms for s in pooled.samples_ if s.kernel.int8)
    assert times == pytest.approx(sorted([2.0 * s.latency_ms for s in int8] + [7.0 * s.latency_ms for s in int8]))
    assert [s.latency_ms for s in pooled.samples_ if not s.kernel.int8] == [s.latency_ms for s in floats]
    # each draw's record as `profile_cpu.merged` writes it: the draw's own, renumbered after what came before
    first, second = pooled.target_config["int8_profiling"], pooled.target_config["int8_2_profiling"]
    assert {k: first[k] for k in ("seed", "networks_from")} == {"seed": 31, "networks_from": 10}
    assert {k: second[k] for k in ("seed", "networks_from")} == {"seed": 42, "networks_from": 15}
    with pytest.raises(ValueError):
        pool_int8_draws.pool(a, [(a, 1)])


def test_int8_stage_draws_profiles_aligned_mobile_stages_and_pools_only_the_chosen_kinds():
    """The family's networks hold 3×3 depthwise convs with every channel count a multiple of 8; pooling keeps the
    base's samples and adds a draw's int8 samples of the chosen kinds only, under the next draw's record."""
    import int8_stage_draws

    from hwnas.estimator.estimator import LatencyEstimator, Sample
    from hwnas.estimator.networks import build_network
    from hwnas.targets import get_target
    from hwnas.targets.kernels import decompose

    rules = get_target("cpu").rules
    rng = np.random.default_rng(0)
    for _ in range(12):
        config = int8_stage_draws.mobile_stage(rng)
        model, _ = build_network(config)
        kernels = decompose(model, {"x": (1, 3, config.size, config.size)}, rules)
        depthwise = [k for k in kernels if k.kind == "dwconv"]
        assert depthwise and all(k.kernel_h == 3 and k.c_in % 8 == 0 for k in depthwise)
        assert all(k.c_out % 8 == 0 for k in kernels if k.kind in ("conv", "dwconv"))

    shipped = LatencyEstimator.load(ROOT / "hwnas/estimator/data/estimators/cpu.json")
    int8 = [s for s in shipped.samples_ if s.kernel.int8 and s.kernel.kind in ("conv", "dwconv")][:60]
    fresh = LatencyEstimator(shipped.target, shipped.parallelism_factor, shipped.rules, {"profiling": {"seed": 91}}).fit(
        [Sample(s.kernel, s.latency_ms, i % 6, 1.0) for i, s in enumerate(int8)])
    pooled = int8_stage_draws.pool(shipped, [fresh], {"dwconv"})
    added = pooled.samples_[len(shipped.samples_):]
    assert pooled.samples_[: len(shipped.samples_)] == shipped.samples_
    assert added and all(s.kernel.kind == "dwconv" and s.kernel.int8 for s in added)
    assert len(added) == sum(s.kernel.kind == "dwconv" for s in int8)
    assert pooled.target_config[f"int8_{int8_stage_draws.FIRST_DRAW}_profiling"]["seed"] == 91


def test_equalize_drift_calibrates_on_as_many_inputs_as_asked():
    """api.run holds back a quarter of its calibration inputs for its own drift report: the study gives it enough
    more that `--fit` of them calibrate (with 16 given, 12 did, and the drift table moved)."""
    import equalize_drift

    from hwnas.verify.calibration import split_calibration

    for fit in (1, 2, 12, 16, 32):
        given = equalize_drift.with_held_back(fit)
        assert given - split_calibration({"x": np.zeros((given, 1))}).held_back == fit
    assert equalize_drift.with_held_back(16) == 21


def test_equalize_drift_judges_every_calibration_draw_on_the_same_held_out_inputs():
    import equalize_drift

    for name in ("ch_ppocr_mobile_v2.0_cls_infer.onnx", "mobilenetv2"):
        draws = [equalize_drift.data(name, 2, 3, seed) for seed in (0, 1)]
        (_, _, fit0, held0), (_, _, fit1, held1) = draws
        (key,) = held0
        assert len(held0[key]) == 3 and len(fit0[key]) == equalize_drift.with_held_back(2)
        np.testing.assert_array_equal(held0[key], held1[key])
        assert not np.array_equal(fit0[key], fit1[key])
        assert not any(np.array_equal(h, f) for h in held0[key] for f in (*fit0[key], *fit1[key]))


def test_equalize_drift_at_the_logits_cuts_the_final_softmax_and_nothing_else():
    import equalize_drift

    from hwnas.graph.session import make_session, random_feeds, run

    path, shapes, _, _ = equalize_drift.data("ch_ppocr_mobile_v2.0_cls_infer.onnx", 1, 1)
    full = onnx.load(path)
    logits = equalize_drift.without_final_activation(full)
    assert [o.name for o in logits.graph.output] == ["linear_1.tmp_1"]
    feeds = random_feeds(full, shapes, seed=0)
    (probabilities,), (scores,) = run(make_session(full), feeds), run(make_session(logits), feeds)
    softmax = np.exp(scores - scores.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(axis=-1, keepdims=True), probabilities, rtol=1e-5, atol=1e-6)
    zoo = equalize_drift.data("mobilenetv2", 1, 1)[0]  # ends at its classifier's Gemm: nothing to cut
    assert equalize_drift.without_final_activation(zoo) is zoo


def test_time_warm_records_each_models_own_speed_level(monkeypatch):
    """Rounds over many models span minutes, and the machine's level moves between models: each summary carries
    the gate's level while that model's runs were let through, which estimator_accuracy.py scales it by."""
    import itertools

    from _common import time_warm

    from hwnas.estimator.quiet import QuietGate
    from hwnas.models import build
    from hwnas.targets.measure import MeasureSettings

    settings = MeasureSettings(warmup=1, repeats=3, threads=1, min_seconds=0.0)
    gate = QuietGate(settings, tolerance=10.0, pause=0.0)
    looks = itertools.cycle([0.1, 0.1, 0.2, 0.2])  # two looks around each measurement: model a's, then b's
    monkeypatch.setattr(gate, "reference_ms", lambda runs=15: next(looks))
    model = build("mobilenetv2", width=0.25, resolution=32)
    timed = time_warm({"a": model, "b": model}, {}, settings, 2, gate)
    assert timed["a"].details["reference_ms"] == pytest.approx(0.1)
    assert timed["b"].details["reference_ms"] == pytest.approx(0.2)
    assert "reference_ms" not in time_warm({"a": model}, {}, settings, 1, None)["a"].details


def test_time_warm_runs_each_model_at_its_own_input_shapes():
    """int8.py times all its rows' quantized models in one `time_warm`, each at its own input shapes
    (`shapes_of`): a dynamic model at two sizes takes two times."""
    from _common import time_warm
    from onnx import TensorProto, helper

    from hwnas.targets.measure import MeasureSettings

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], np.ones(64 * 64, np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    settings = MeasureSettings(warmup=1, repeats=5, threads=1, min_seconds=0.0)
    timed = time_warm({"small": model, "large": model}, {"x": (1, 64)}, settings, 1, None,
                      shapes_of={"large": {"x": (4096, 64)}})
    assert timed["large"].latency_ms > 5 * timed["small"].latency_ms


def test_int8_benchmark_saves_each_rows_quantized_models_and_shapes(tmp_path):
    """`int8.py --save-models DIR`: what the estimate columns timed, to time or profile again later."""
    import json

    import int8
    import onnx

    from hwnas.models import build

    model = build("mobilenetv2", width=0.25, resolution=32)
    rows = [int8.Row("mobilenetv2@0.9/1", "k", {"input": (1, 3, 32, 32)}, {"peer": model, "hwnas": model}, [], [])]
    int8.save_models(rows, tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "mobilenetv2@0.9_1-hwnas.onnx", "mobilenetv2@0.9_1-peer.onnx", "mobilenetv2@0.9_1-shapes.json"]
    assert json.loads((tmp_path / "saved" / "mobilenetv2@0.9_1-shapes.json").read_text()) == {"input": [1, 3, 32, 32]}
    assert onnx.load(str(tmp_path / "saved" / "mobilenetv2@0.9_1-peer.onnx")).graph == model.graph

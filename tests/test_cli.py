"""The command line: exit codes, one-line errors, nothing written on failure, atomic outputs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from hwnas.cli import build_parser, main
from tests.conftest import real_model_path
from tests.graphs import conv_bn_model, tensor


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_bn_model(), str(path))
    return path


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad_input(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("hwnas ")


def test_passes_json(capsys):
    code, out, _ = run_cli(capsys, "passes", "--json")
    assert code == 0
    names = {p["name"]: p for p in json.loads(out)}
    assert names["fold-bn"]["exactness"] == "exact"


def test_run_writes_verified_model_and_report(capsys, model_path, tmp_path):
    out_path, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, out, err = run_cli(capsys, "run", str(model_path), "-o", str(out_path), "--passes", "fold-bn", "--report", str(report))
    assert code == 0, err
    assert "before" in out and "after" in out and "equivalent" in out
    data = json.loads(report.read_text())
    assert data["verification"]["equivalent"] is True
    assert data["exact"] is True
    assert data["passes"][0]["sites_applied"] == 1
    assert [n.op_type for n in onnx.load(str(out_path)).graph.node] == ["Conv"]


def test_json_output_is_only_json(capsys, model_path, tmp_path):
    code, out, _ = run_cli(capsys, "run", str(model_path), "-o", str(tmp_path / "o.onnx"), "--passes", "fold-bn", "--json")
    assert code == 0
    assert json.loads(out)["schema_version"] == 1


def test_dry_run_lists_sites_and_writes_nothing(capsys, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_bn_model(extra_consumer=True), str(path))
    code, out, _ = run_cli(capsys, "run", str(path), "--passes", "fold-bn", "--dry-run")
    assert code == 0
    assert "skipped: " in out and "2 consumers" in out
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(
    "content, fragment",
    [(b"this is not onnx at all" * 10, "cannot"), (b"", "no graph")],
    ids=["not-onnx", "empty"],
)
def test_bad_files(capsys, tmp_path, content, fragment):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    out_path = tmp_path / "out.onnx"
    code, _, err = run_cli(capsys, "run", str(bad), "-o", str(out_path), "--passes", "fold-bn")
    assert_bad_input(code, err, fragment)
    assert not out_path.exists()


def test_truncated_model(capsys, tmp_path):
    data = conv_bn_model().SerializeToString()
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "run", str(bad), "-o", str(tmp_path / "o.onnx"), "--passes", "fold-bn")
    assert_bad_input(code, err)
    assert not (tmp_path / "o.onnx").exists()


def test_missing_file_and_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx"), "--passes", "fold-bn")
    assert_bad_input(code, err, "no such file")
    code, _, err = run_cli(capsys, "run", str(tmp_path), "-o", str(tmp_path / "o.onnx"), "--passes", "fold-bn")
    assert_bad_input(code, err, "directory")


def test_unwritable_outputs(capsys, model_path, tmp_path):
    code, _, err = run_cli(capsys, "run", str(model_path), "-o", str(tmp_path / "missing" / "o.onnx"), "--passes", "fold-bn")
    assert_bad_input(code, err, "does not exist")
    code, _, err = run_cli(capsys, "run", str(model_path), "-o", str(model_path / "o.onnx"), "--passes", "fold-bn")
    assert_bad_input(code, err, "is a file")
    code, _, err = run_cli(capsys, "run", str(model_path), "-o", str(tmp_path), "--passes", "fold-bn")
    assert_bad_input(code, err, "directory")


def test_output_equal_to_input_is_written_atomically(capsys, model_path):
    code, _, _ = run_cli(capsys, "run", str(model_path), "-o", str(model_path), "--passes", "fold-bn")
    assert code == 0
    assert [n.op_type for n in onnx.load(str(model_path)).graph.node] == ["Conv"]
    assert sorted(p.name for p in model_path.parent.iterdir()) == ["m.onnx"]  # no temp files left


def test_bad_pipeline_and_options(capsys, model_path, tmp_path):
    out_path = tmp_path / "o.onnx"
    code, _, err = run_cli(capsys, "run", str(model_path), "-o", str(out_path), "--passes", "fold-bn{bogus=1}")
    assert_bad_input(code, err, "no option 'bogus'")
    code, _, err = run_cli(capsys, "run", str(model_path), "-o", str(out_path), "--passes", "fold-bn", "--input-shape", "y:1x3")
    assert_bad_input(code, err, "--input-shape")
    code, _, err = run_cli(capsys, "run", str(model_path), "--bogus")
    assert_bad_input(code, err, "unrecognized arguments")
    assert not out_path.exists()


def test_unsupported_opset(capsys, tmp_path):
    model = conv_bn_model()
    model.opset_import[0].version = 7
    path = tmp_path / "old.onnx"
    path.write_bytes(model.SerializeToString())
    code, _, err = run_cli(capsys, "run", str(path), "-o", str(tmp_path / "o.onnx"), "--passes", "fold-bn")
    assert_bad_input(code, err, "opset 7")


def test_dynamic_dims_need_input_shape(capsys, tmp_path):
    path = real_model_path("ch_PP-OCRv4_det_infer.onnx")
    code, _, err = run_cli(capsys, "run", str(path), "-o", str(tmp_path / "o.onnx"), "--passes", "fold-bn")
    assert_bad_input(code, err, "input 'x'", "--input-shape x:")


def _unchecked_model(nodes, initializers) -> onnx.ModelProto:
    """x[1,4] -> ... -> y[1,4], built without onnx.checker (which refuses these models too)."""
    graph = helper.make_graph(nodes, "bad", [tensor("x", [1, 4])], [tensor("y", [1, 4])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def cyclic_model() -> onnx.ModelProto:
    return _unchecked_model([
        helper.make_node("Add", ["x", "back"], ["t"], name="add"),
        helper.make_node("Relu", ["t"], ["back"], name="loop"),
        helper.make_node("Relu", ["t"], ["y"], name="out"),
    ], [])


def short_raw_data_model() -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    weight.raw_data = weight.raw_data[:20]  # 20 bytes where 4x4 floats need 64
    return _unchecked_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [weight])


def huge_constant_model() -> onnx.ModelProto:
    """A ConstantOfShape of 120000x1000x1000 floats: 480 GB, more than any machine this runs on."""
    fill = helper.make_tensor("fill", onnx.TensorProto.FLOAT, [1], [1.0])
    return _unchecked_model([
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=fill),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Add", ["x", "total"], ["y"]),
    ], [numpy_helper.from_array(np.array([120000, 1000, 1000], np.int64), "shape")])


@pytest.mark.parametrize(
    "build, fragment",
    [(cyclic_model, "the graph has a cycle (through node 'add')"), (short_raw_data_model, "the file is corrupt")],
    ids=["cycle", "raw-data-size"],
)
def test_malformed_graphs_are_bad_input_at_load(capsys, tmp_path, build, fragment):
    """Found by hand: a cycle was an internal error (exit 3), short raw_data a failed check suggesting
    --no-verify (exit 1): both are bad files, refused when loaded, by every command."""
    path = tmp_path / "bad.onnx"
    path.write_bytes(build().SerializeToString())
    out_path = tmp_path / "o.onnx"
    for argv in (["run", "--passes", "fold-bn", "-o", str(out_path)], ["run", "--passes", "fold-bn", "--no-verify", "-o", str(out_path)],
                 ["optimize", "--target", "cpu", "-o", str(out_path)], ["estimate", "--target", "cpu"],
                 ["check", "--target", "cpu", "--max-params", "1MB"]):
        code, _, err = run_cli(capsys, argv[0], str(path), *argv[1:])
        assert_bad_input(code, err, fragment)
        assert "--no-verify" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_a_model_that_needs_more_memory_than_the_machine_has_is_one_quiet_line(tmp_path):
    """ORT printed several coloured log lines (its own, and from onnx-graphsurgeon's constant folding)
    before hwnas's line; it runs as a subprocess because ORT writes to the file descriptor, not sys.stderr."""
    path = tmp_path / "huge.onnx"
    path.write_bytes(huge_constant_model().SerializeToString())
    out_path = tmp_path / "o.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "hwnas", "run", str(path), "-o", str(out_path), "--passes", "fold-constants,fold-bn"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "the model asks for more memory than this machine has" in proc.stderr and "480 GB" in proc.stderr
    assert proc.stdout == ""
    assert not out_path.exists()


def test_console_script_bad_input_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "hwnas", "run", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx"), "--passes", "fold-bn"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_zoo_list_and_export(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "zoo", "list")
    assert code == 0
    assert all(name in out for name in ("mobilenetv2", "ibn-detector", "segmenter"))
    out_path = tmp_path / "m.onnx"
    code, out, _ = run_cli(capsys, "zoo", "export", "mobilenetv2", "-o", str(out_path), "--width", "0.5", "--resolution", "96")
    assert code == 0 and "MACs" in out
    assert onnx.load(str(out_path)).graph.input[0].type.tensor_type.shape.dim[2].dim_value == 96
    code, _, err = run_cli(capsys, "zoo", "export", "nope", "-o", str(tmp_path / "n.onnx"))
    assert_bad_input(code, err, "unknown model")
    assert not (tmp_path / "n.onnx").exists()


def test_check_within_budget_exits_0(capsys, model_path, tmp_path):
    junit = tmp_path / "check.xml"
    code, out, err = run_cli(capsys, "check", str(model_path), "--target", "npu-32x32", "--max-latency-ms", "10",
                             "--max-params", "1MB", "--max-peak-act", "1MiB", "--require-multiple", "8",
                             "--baseline", str(model_path), "--max-regression", "5", "--junit", str(junit))
    assert code == 0, err
    assert out.count("PASS") == 5 and "FAIL" not in out
    assert ET.parse(junit).getroot().get("failures") == "0"


def test_check_exceeded_budget_exits_1_and_junit_names_it(capsys, model_path, tmp_path):
    junit = tmp_path / "check.xml"
    code, out, _ = run_cli(capsys, "check", str(model_path), "--target", "npu-32x32", "--max-latency-ms", "10",
                           "--max-params", "100B", "--junit", str(junit))
    assert code == 1
    assert "FAIL  max-params" in out and "PASS  max-latency-ms" in out
    suite = ET.parse(junit).getroot().find("testsuite")
    assert [c.get("name") for c in suite.findall("testcase") if c.find("failure") is not None] == ["max-params"]
    assert "max-params" in suite.find("testcase[@name='max-params']/failure").get("message")


def test_check_json(capsys, model_path):
    code, out, _ = run_cli(capsys, "check", str(model_path), "--target", "npu-32x32", "--max-params", "100", "--json")
    data = json.loads(out)
    assert code == 1 and data["passed"] is False and data["failed"] == ["max-params"] and data["schema_version"] == 1


@pytest.mark.parametrize("extra, fragment", [((), "at least one budget"), (("--max-params", "4XB"), "size"),
                                             (("--max-regression", "5"), "--baseline")])
def test_check_bad_options_exit_2(capsys, model_path, extra, fragment):
    code, _, err = run_cli(capsys, "check", str(model_path), "--target", "npu-32x32", *extra)
    assert_bad_input(code, err, fragment)


def test_check_corrupt_model_exits_2_and_writes_nothing(capsys, tmp_path):
    bad, junit = tmp_path / "bad.onnx", tmp_path / "check.xml"
    bad.write_bytes(b"\x00garbage")
    code, _, err = run_cli(capsys, "check", str(bad), "--target", "npu-32x32", "--max-params", "1MB", "--junit", str(junit))
    assert_bad_input(code, err, "bad.onnx")
    assert not junit.exists()


@pytest.mark.parametrize(
    "extra",
    [["--passes", "fold-bn{sites=@nosuchnode}"], ["--passes", "fold-bn{sites=7}"],
     ["--passes", "fold-bn", "--disable-pass", "nosuchpass"]],
)
def test_selectors_and_disabled_passes_that_match_nothing_exit_2(capsys, model_path, tmp_path, extra):
    out_path = tmp_path / "o.onnx"
    code, _, err = run_cli(capsys, "run", str(model_path), "-o", str(out_path), *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out_path.exists()


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of every command and sub-command, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subcommands(sub, (*path, name))


def test_every_command_has_an_example_and_one_line_in_the_overview():
    parser = build_parser()
    commands = list(_subcommands(parser))
    assert {"run", "optimize", "check", "zoo export"} <= {" ".join(path) for path, _ in commands}
    for path, sub in commands:
        example = [line for line in sub.format_help().splitlines() if line.startswith("example: ")]
        assert len(example) == 1 and example[0].startswith(f"example: hwnas {path[0]}"), (path, sub.format_help())
    overview = parser.format_help().split("commands:\n")[1].split("\n\n")[0].splitlines()[1:]  # after "COMMAND"
    top = [path[0] for path, _ in commands if len(path) == 1]
    assert [line.split()[0] for line in overview] == top, overview  # one line each: no wrapped summaries
    assert all(len(line.split()) > 2 for line in overview)

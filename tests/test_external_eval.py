"""--evaluate-cmd: a user's command scores candidates (higher is better) and that score steers the search."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import onnx
import pytest

from hwnas import api
from hwnas.errors import BadInputError, CheckFailedError
from hwnas.models._builder import ZooBuilder
from hwnas.search.external import ExternalEvaluator, parse_score

SCORER = Path(__file__).parent / "data" / "score_candidate.py"
KEPT = "dw2/conv"  # the depthwise conv the scorer rewards keeping


def scorer(*options: str) -> str:
    return shlex.join([sys.executable, str(SCORER), "{model}", *options])


def separable_net() -> onnx.ModelProto:
    """Stem, then two depthwise-separable layers at 48²: 32 channels (a group of the PF: no depth multiplier
    applies), no IBN expand pattern (no Fused-MBConv), so the only choices are how to regroup each depthwise conv."""
    b = ZooBuilder(0)
    h = b.conv_bn_act(b.image("input", 3, 96, 96), "stem", 32, "relu", kernel=3, stride=2)
    h = b.conv_bn_act(h, "dw1", 32, "relu", kernel=3, groups=32)
    h = b.conv_bn_act(h, "pw1", 32, None)
    h = b.conv_bn_act(h, "dw2", 32, "relu", kernel=3, groups=32)
    return b.model([b.conv_bn_act(h, "pw2", 16, None)], graph_name="separable")


@pytest.fixture(scope="module")
def net():
    return separable_net()


@pytest.mark.parametrize("stdout, expected", [
    ("0.713\n", 0.713),
    ("epoch 3/3\ntop1=71.3%\n\n", 71.3),
    ("score: -0.42", -0.42),
    ("loss 1e-3 after 2 epochs", 2.0),  # the last number on the line
    ("accuracy 0.9\ndone\n", None),  # the last line has no number
    ("", None),
])
def test_parse_score_reads_the_last_number_of_the_last_line(stdout, expected):
    assert parse_score(stdout) == expected


def test_the_command_scores_the_candidate_it_is_given(net):
    evaluate = ExternalEvaluator(scorer("--keep-depthwise", KEPT))
    assert evaluate(net) == 1.0
    assert evaluate(api.run(net, f"replace-conv{{mode=dense,sites=@{KEPT}}}").model) == 0.0


def test_a_failing_command_says_why_with_its_stderr(net):
    evaluate = ExternalEvaluator(scorer("--fail", "CUDA out of memory"))
    with pytest.raises(CheckFailedError, match="exited with status 3: CUDA out of memory"):
        evaluate(net)


def test_a_command_past_its_timeout_fails(net):
    evaluate = ExternalEvaluator(shlex.join([sys.executable, "-c", "import time; time.sleep(30)", "{model}"]), timeout=0.5)
    with pytest.raises(CheckFailedError, match="did not finish within 0.5 s"):
        evaluate(net)


@pytest.mark.parametrize("command, timeout, message", [
    ("python train.py", 60, "must contain {model}"),
    ("no-such-program-hwnas {model}", 60, "not found"),
    (f"{sys.executable} {{model}}", 0, "timeout must be a positive number"),
])
def test_bad_commands_are_refused_before_any_work(command, timeout, message):
    with pytest.raises(BadInputError, match=message):
        ExternalEvaluator(command, timeout)


def test_optimize_stops_when_the_original_cannot_be_scored(net):
    with pytest.raises(CheckFailedError, match="original model's quality.*no disk left"):
        api.optimize(net, "npu-32x32", trials=4, workers=1, evaluate_cmd=scorer("--fail", "no disk left"))


def test_the_score_steers_the_search(net):
    plain = api.optimize(net, "npu-32x32", trials=12, seed=0, workers=1)
    assert f"@{KEPT}" in plain.to_dict()["pipeline"]  # on latency alone both depthwise convs are replaced
    steered = api.optimize(net, "npu-32x32", trials=12, seed=0, workers=1, evaluate_cmd=scorer("--keep-depthwise", KEPT))
    assert f"@{KEPT}" not in steered.to_dict()["pipeline"]
    assert "@dw1/conv" in steered.to_dict()["pipeline"]  # the other one still is
    assert 0 < steered.to_dict()["latency_reduction"] < plain.to_dict()["latency_reduction"]
    assert steered.to_dict()["search"]["quality"] == {"kind": "evaluate-cmd", "original": 1.0, "floor": 0.99, "chosen": 1.0}

"""External evaluation: a user's command scores each candidate (multishot search with training).

The reference work's multishot search trains every sampled architecture and judges it by its accuracy.
hwnas cannot train; `--evaluate-cmd "CMD {model}"` hands that step to the user: for each candidate the
search writes the candidate model (its rewritten weights, a warm start for fine-tuning, and the original
signature) to a temporary file, runs the command with `{model}` replaced by its path, and reads a score
from the command's standard output — **higher is better**: accuracy after fine-tuning, mAP, −loss.

The contract is the `cmd:` target's (hwnas.targets.command, docs/measurement.md): the command runs without
a shell, split like a POSIX shell would (`shlex`), unless `shell=True` asks for one; it has `timeout`
seconds; the score is the last number on the last non-empty line of stdout (`0.713`, `top1=71.3%`,
`score: -0.42` all read); a non-zero exit, no number or a timeout is a failure whose message carries the
last line of the command's stderr. The search treats a failed candidate like one that cannot be built.
Scores are journaled by pipeline like every other score, so an interrupted search does not re-run the
command for candidates it already scored.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from hwnas.errors import BadInputError, CheckFailedError
from hwnas.graph.io import save_model
from hwnas.targets.command import CommandTarget
from hwnas.targets.measure import last_line

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
DEFAULT_TIMEOUT_S = 3600.0  # fine-tuning takes a while


@dataclass(frozen=True)
class ExternalEvaluator:
    """`evaluator(model)` is the command's score for `model`; CheckFailedError says why there is none."""

    command: str
    timeout: float = DEFAULT_TIMEOUT_S
    shell: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise BadInputError(f"--evaluate-cmd: the timeout must be a positive number of seconds, got {self.timeout!r}")
        try:
            self._runner.check_command()
        except BadInputError as e:
            raise BadInputError(f"--evaluate-cmd: {_without_prefix(e)}") from None

    @property
    def _runner(self) -> CommandTarget:
        """The cmd: target runs programs this same way (its process group killed on timeout, stderr kept)."""
        return CommandTarget(self.command, self.shell, float(self.timeout))

    def __call__(self, model: onnx.ModelProto) -> float:
        with tempfile.TemporaryDirectory(prefix="hwnas-evaluate-") as tmp:
            path = save_model(model, Path(tmp) / "candidate.onnx")
            try:
                stdout = self._runner._run(str(path))
            except CheckFailedError as e:
                raise CheckFailedError(f"evaluate-cmd: {_without_prefix(e)}") from None
        score = parse_score(stdout)
        if score is None:
            last = last_line(stdout)
            raise CheckFailedError(f"evaluate-cmd: no score on the last line of stdout (got {last!r}); "
                                   "print the score (higher is better) last")
        return score


def parse_score(stdout: str) -> float | None:
    """The last finite number on the last non-empty line of `stdout`, or None."""
    numbers = _NUMBER.findall(last_line(stdout))
    value = float(numbers[-1]) if numbers else math.nan
    return value if math.isfinite(value) else None


def _without_prefix(error: Exception) -> str:
    """The cmd: target's message, worded for --evaluate-cmd."""
    return str(error).removeprefix("cmd: ")

"""`cmd:<command {model}>`: an external program measures the model (on a device, a board, a farm).

The contract (docs/measurement.md): hwnas writes the model to a temporary file with its inputs fixed
to the analysis shapes, replaces `{model}` in the command with that path, runs the command and reads
the latency in milliseconds from the last non-empty line of its standard output (the last number on
it; `12.3`, `12.3 ms` and `latency=12.3ms` all read 12.3). A non-zero exit, no number, or no answer
within the timeout is a failed check whose message carries the last line of the program's stderr.

The command runs without a shell (split like a POSIX shell would, with `shlex`) unless the spec asks
for one: `cmd:[shell=1] ssh board "bench $(basename {model})"`. Options go in a leading `[...]`:
`shell=1`, `timeout=SECONDS` (default 600), `pf=N` (the device's parallelism factor, default 8).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx

from hwnas.errors import BadInputError, CheckFailedError
from hwnas.graph.io import save_model
from hwnas.graph.shapes import Shape, resolve_input_shapes, with_static_inputs
from hwnas.targets.base import Measurement, Target
from hwnas.targets.measure import last_line, parse_options, positive_int
from hwnas.targets.ort_ep import DEFAULT_PF

PLACEHOLDER = "{model}"
DEFAULT_TIMEOUT_S = 600.0
_OPTIONS = ("shell", "timeout", "pf")
_SEPARATORS = re.compile(r"[\s=:,;]+")


@dataclass(frozen=True)
class CommandTarget(Target):
    command: str
    shell: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    parallelism_factor: int = DEFAULT_PF

    @property
    def name(self) -> str:
        """The canonical spec: `get_target(t.name)` gives back an equal target."""
        options = [f"shell={int(self.shell)}"] if self.shell else []
        if self.timeout_s != DEFAULT_TIMEOUT_S:
            options.append(f"timeout={self.timeout_s:g}")
        if self.parallelism_factor != DEFAULT_PF:
            options.append(f"pf={self.parallelism_factor}")
        return "cmd:" + (f"[{','.join(options)}] " if options else "") + self.command

    @classmethod
    def from_spec(cls, spec: str) -> CommandTarget:
        head, _, text = spec.partition(":")
        if head.strip() != "cmd":
            raise BadInputError(f"not a cmd target: {spec!r}")
        options, command = _split_options(text.strip())
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise BadInputError(f"cmd: unknown option(s) {', '.join(sorted(unknown))}; allowed: {', '.join(_OPTIONS)}")
        shell = options.get("shell", "0")
        if shell not in ("0", "1"):
            raise BadInputError(f"cmd: shell must be 1 or 0, got {shell!r}")
        target = cls(
            command=command,
            shell=shell == "1",
            timeout_s=_timeout(options.get("timeout")),
            parallelism_factor=positive_int(options, "pf", "cmd") or DEFAULT_PF,
        )
        target.check_command()
        return target

    def check_command(self) -> None:
        """Fail before any work is done: no placeholder, unbalanced quotes, or a program that is not there."""
        if PLACEHOLDER not in self.command:
            raise BadInputError(
                f"cmd: the command must contain {PLACEHOLDER}, where the model file's path goes: {self.command!r}"
            )
        if self.shell:
            return  # the shell resolves the program; nothing to check before running it
        program = self._argv("MODEL")[0]
        if shutil.which(program) is None:
            raise BadInputError(f"cmd: program {program!r} not found (not on PATH, or not executable)")

    def measure(self, model: onnx.ModelProto, input_shapes: Mapping[str, Shape]) -> Measurement:
        # The program cannot be told the analysis shapes any other way: fix them in the file it reads.
        static = with_static_inputs(model, resolve_input_shapes(model, input_shapes))
        with tempfile.TemporaryDirectory(prefix="hwnas-cmd-") as tmp:
            path = save_model(static, Path(tmp) / "model.onnx")
            stdout = self._run(str(path))
        latency = parse_latency_ms(stdout)
        if latency is None:
            raise CheckFailedError(self._no_latency(stdout))
        return Measurement(latency_ms=latency, samples_ms=(latency,), details={"command": self.command})

    def describe(self) -> dict:
        return {**super().describe(), "command": self.command, "shell": self.shell, "timeout_s": self.timeout_s}

    def _no_latency(self, stdout: str) -> str:
        last = last_line(stdout)
        if not last:
            return f"cmd: {self._program()} printed nothing on stdout; its last line must be the latency in ms"
        return f"cmd: {self._program()} printed no latency: its last line must end with the milliseconds, got {last!r}"

    def _argv(self, model_path: str) -> list[str]:
        try:
            args = shlex.split(self.command)
        except ValueError as e:  # e.g. "No closing quotation"
            raise BadInputError(f"cmd: cannot split the command {self.command!r}: {e}") from None
        if not args:
            raise BadInputError("cmd: empty command")
        return [arg.replace(PLACEHOLDER, model_path) for arg in args]

    def _program(self) -> str:
        return "the shell command" if self.shell else repr(self._argv("MODEL")[0])

    def _run(self, model_path: str) -> str:
        args: str | list[str] = (
            self.command.replace(PLACEHOLDER, shlex.quote(model_path)) if self.shell else self._argv(model_path)
        )
        try:
            # A session of its own, so that a timeout can kill everything it started (a shell's children,
            # an ssh), not just the first process, which would leave the pipes open and hang us.
            proc = subprocess.Popen(
                args, shell=self.shell, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, errors="replace", start_new_session=True,
            )
        except OSError as e:
            raise CheckFailedError(f"cmd: cannot run {self._program()}: {e.strerror or e}") from None
        try:
            stdout, stderr = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # it may have finished just now
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise CheckFailedError(f"cmd: {self._program()} did not finish within {self.timeout_s:g} s") from None
        if proc.returncode != 0:
            reason = last_line(stderr) or "nothing on stderr"
            raise CheckFailedError(f"cmd: {self._program()} exited with status {proc.returncode}: {reason}")
        return stdout


def parse_latency_ms(stdout: str) -> float | None:
    """The last number on the last non-empty line (a trailing `ms` allowed), if it is a positive latency."""
    for token in reversed(_SEPARATORS.split(last_line(stdout))):
        try:
            value = float(token.removesuffix("ms"))
        except ValueError:
            continue
        return value if math.isfinite(value) and value > 0 else None
    return None


def _split_options(text: str) -> tuple[dict[str, str], str]:
    if not text.startswith("["):
        return {}, text
    end = text.find("]")
    if end < 0:
        raise BadInputError(f"cmd: options start with '[' but have no closing ']': {text!r}")
    return parse_options(text[1:end], "cmd"), text[end + 1 :].strip()


def _timeout(text: str | None) -> float:
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise BadInputError(f"cmd: timeout must be a positive number of seconds, got {text!r}")
    return value

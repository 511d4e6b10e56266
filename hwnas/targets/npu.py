"""`npu-RxC`: a simulated systolic-array accelerator whose compute model matches SCALE-Sim exactly.

A model is cut into kernels by `hwnas.targets.kernels.decompose` under the npu's fusion rules
(`fusion_npu.json`: BN, activations, per-channel affine ops, swish/hard-swish and a residual Add ride
free in the conv before them). Each kernel then costs

    cycles = max(compute, ceil(bytes moved / DRAM bytes per cycle)) + per-op overhead

and the model's cycles are the sum (kernels run one after another); milliseconds = cycles / clock.
`free` kernels (Reshape, Identity, shape arithmetic) cost nothing, not even the overhead.

Compute on the R×C array, for `groups` products of a P×K by a K×N matrix (`GemmShape`; for a conv
P = output pixels × batch, K = R·S·C_in/g, N = C_out/g), groups run one after another:

    ws (weight-stationary)  g · ceil(K/R) · ceil(N/C) · (2R + C + P − 2)
    os (output-stationary)  g · ceil(P/R) · ceil(N/C) · (R + C + K − 2)
    is (input-stationary)   g · ceil(K/R) · ceil(P/C) · (2R + C + N − 2)

These are the row counts of the demand matrices SCALE-Sim 3.0.0 builds per fold
(`scalesim/compute/systolic_compute_{ws,os,is}.py`); its reported "Total Cycles" is this minus one.
Depthwise convs (`depthwise: serial`, the default) run as SCALE-Sim runs them: C single-channel layers
in sequence, which is the grouped formula with g = C and N = 1 (or the depth multiplier).
`depthwise: parallel` models an engine with a dedicated depthwise path that feeds each column its own
input channel: one product with K = R·S and N = C_out, i.e. the formula above with g = 1 — the array
is filled along the channels instead of idling on N = 1.

Every other kernel (elementwise, pool, resize, concat, and `other` ops as a fallback) runs on a vector
unit of `vector_lanes` lanes (default: one per column): ceil(elements / lanes) cycles, at least 1, where
elements = output elements (× the window for pools and reductions; max(inputs, outputs) for `other`).

Bytes moved = (input + weight + output elements) × bytes per element: every tensor crosses DRAM once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import onnx

from hwnas.errors import BadInputError
from hwnas.graph.shapes import Shape
from hwnas.targets.base import Measurement, Target
from hwnas.targets.fusion_rules import FusionRules, builtin_rules
from hwnas.targets.kernels import GemmShape, Kernel, decompose

_SPEC_RE = re.compile(r"^npu-(?P<rows>\d+)x(?P<cols>\d+)(?::(?P<options>.*))?$")
_OPTION_ALIASES = MappingProxyType({"df": "dataflow", "dw": "depthwise"})
_CHOICES = MappingProxyType({"dataflow": ("ws", "os", "is"), "depthwise": ("serial", "parallel")})
_POSITIVE_INTS = ("rows", "cols", "bytes_per_element")
_POSITIVE_NUMBERS = ("dram_bytes_per_cycle", "clock_ghz")
_NON_NEGATIVE_INTS = ("per_op_overhead_cycles", "sram_kb")


@dataclass(frozen=True)
class NpuConfig:
    rows: int = 32
    cols: int = 32
    dataflow: str = "ws"  # ws | os | is
    depthwise: str = "serial"  # serial | parallel
    bytes_per_element: int = 1  # of a float32 element (1: costed as int8); int8/uint16... tensors cost their own size
    dram_bytes_per_cycle: float = 64
    per_op_overhead_cycles: int = 0
    clock_ghz: float = 1.0
    sram_kb: int = 512  # recorded in reports; the model assumes every kernel's operands fit
    vector_lanes: int | None = None  # None: one lane per array column
    name: str = ""

    def __post_init__(self) -> None:
        problem = _config_problem(self)
        if problem:
            raise BadInputError(f"npu config {self.name or '(unnamed)'}: {problem}")

    @property
    def lanes(self) -> int:
        return self.vector_lanes if self.vector_lanes is not None else self.cols

    @classmethod
    def from_dict(cls, data: Mapping, name: str) -> NpuConfig:
        """Settings by field name; `name` is used unless the settings carry their own."""
        if not isinstance(data, Mapping):
            raise BadInputError(f"npu config {name}: expected an object of settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInputError(f"npu config {name}: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**{"name": name, **data})

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "vector_lanes": self.lanes}


def computes_in_int8(description: Mapping) -> bool:
    """Whether a target (its `describe()`, as an estimator file stores it) runs every kernel in int8: an npu
    whose float32 element costs 1 byte."""
    return description.get("config", {}).get("bytes_per_element") == 1


def _config_problem(config: NpuConfig) -> str | None:
    """The first thing wrong with a config, in words, or None."""
    for key in _POSITIVE_INTS + _NON_NEGATIVE_INTS:
        value = getattr(config, key)
        if not _is_int(value) or value < (0 if key in _NON_NEGATIVE_INTS else 1):
            least = "a non-negative" if key in _NON_NEGATIVE_INTS else "a positive"
            return f"{key} must be {least} integer, got {value!r}"
    for key in _POSITIVE_NUMBERS:
        value = getattr(config, key)
        if not (_is_number(value) and value > 0):
            return f"{key} must be a positive number, got {value!r}"
    for key, choices in _CHOICES.items():
        if getattr(config, key) not in choices:
            return f"{key} must be one of {'|'.join(choices)}, got {getattr(config, key)!r}"
    if config.vector_lanes is not None and not (_is_int(config.vector_lanes) and config.vector_lanes > 0):
        return f"vector_lanes must be a positive integer, got {config.vector_lanes!r}"
    if not isinstance(config.name, str):
        return f"name must be a string, got {config.name!r}"
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_spec(spec: str) -> NpuConfig:
    """`npu-RxC[:key=value,...]` (keys: NpuConfig fields, `df`, `dw`) or a `.json`/`.toml` config file."""
    if spec.endswith((".json", ".toml")):
        return load_config(spec)
    m = _SPEC_RE.match(spec)
    if not m:
        raise BadInputError(
            f"bad npu target {spec!r}: use npu-RxC (e.g. npu-32x32, npu-16x16:df=os,dw=parallel) or a .json config"
        )
    settings: dict = {"rows": int(m["rows"]), "cols": int(m["cols"])}
    for item in filter(None, (m["options"] or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise BadInputError(f"bad npu option {item!r} in {spec!r}: expected key=value")
        key = _OPTION_ALIASES.get(key.strip(), key.strip())
        settings[key] = _option_value(key, value.strip(), spec)
    return NpuConfig.from_dict(settings, name=spec)


def _option_value(key: str, text: str, spec: str):
    """An option given on the command line, typed like the field it sets."""
    settable = {f.name for f in dataclasses.fields(NpuConfig)} - {"name"}
    if key not in settable:
        known = ", ".join(["df", "dw", *sorted(settable)])
        raise BadInputError(f"unknown npu option {key!r} in {spec!r}; known: {known}")
    if key in _CHOICES:
        return text
    try:
        return float(text) if key in _POSITIVE_NUMBERS else int(text)
    except ValueError:
        raise BadInputError(f"npu option {key}={text!r} in {spec!r} is not a number") from None


def load_config(path: str | Path) -> NpuConfig:
    """An NpuConfig from a JSON (or, on Python ≥ 3.11, TOML) file, named by its path unless it has a `name`."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise BadInputError(f"cannot read npu config {p}: {e.strerror or e}") from None
    data = _parse_toml(text, p) if p.suffix == ".toml" else _parse_json(text, p)
    return NpuConfig.from_dict(data, name=str(path))


def _parse_json(text: str, path: Path):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInputError(f"npu config {path} is not valid JSON: {e}") from None


def _parse_toml(text: str, path: Path):
    try:
        import tomllib
    except ModuleNotFoundError:
        raise BadInputError(f"npu config {path}: TOML needs Python 3.11 or later; use JSON") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadInputError(f"npu config {path} is not valid TOML: {e}") from None


# ---- the cost model ----------------------------------------------------------------------------


def array_cycles(gemm: GemmShape, rows: int, cols: int, dataflow: str) -> int:
    """SCALE-Sim's compute cycles for `gemm` on a rows×cols array (its "Total Cycles" + 1 per product)."""
    p, k, n = gemm.p, gemm.k, gemm.n
    if dataflow == "ws":
        per_group = math.ceil(k / rows) * math.ceil(n / cols) * (2 * rows + cols + p - 2)
    elif dataflow == "os":
        per_group = math.ceil(p / rows) * math.ceil(n / cols) * (rows + cols + k - 2)
    else:
        per_group = math.ceil(k / rows) * math.ceil(p / cols) * (2 * rows + cols + n - 2)
    return gemm.groups * per_group


@dataclass(frozen=True)
class LaneUse:
    """How well one array kernel fills the lanes that its channel dimension is spread over."""

    kernel: str
    kind: str
    dimension: str  # what is spread over the lanes
    size: int
    lanes: int

    @property
    def folds(self) -> int:
        return math.ceil(self.size / self.lanes)

    @property
    def idle_in_last_fold(self) -> int:
        return self.folds * self.lanes - self.size

    @property
    def utilization(self) -> float:
        return self.size / (self.folds * self.lanes)

    def message(self) -> str:
        if not self.idle_in_last_fold:
            return f"{self.kind} {self.kernel}: {self.size} {self.dimension} fill {self.folds} fold(s) of {self.lanes}"
        return (
            f"{self.kind} {self.kernel}: {self.size} {self.dimension}, not a multiple of {self.lanes} → "
            f"{self.idle_in_last_fold} of {self.lanes} lanes idle in its last fold"
        )


class NpuTarget(Target):
    """A simulated R×C systolic array (see the module docstring for the cost model)."""

    simulated = True

    def __init__(self, config: NpuConfig, rules: FusionRules | None = None):
        self.config = config
        self._rules = rules if rules is not None else builtin_rules("npu")
        self.name = config.name or f"npu-{config.rows}x{config.cols}"
        self.parallelism_factor = config.cols

    @property
    def rules(self) -> FusionRules:
        return self._rules

    @classmethod
    def from_spec(cls, spec: str) -> NpuTarget:
        return cls(parse_spec(spec.strip()))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "parallelism_factor": self.parallelism_factor,
            "config": self.config.to_dict(),
            "fusion_rules": self.rules.to_dict(),
        }

    def array_shape(self, kernel: Kernel) -> GemmShape | None:
        """The product the array runs for `kernel` (None: it runs on the vector unit or is free)."""
        if kernel.gemm is None or kernel.kind == "free":
            return None
        if kernel.kind == "dwconv" and self.config.depthwise == "parallel":
            g = kernel.gemm
            return GemmShape(p=g.p, k=g.k, n=g.n * g.groups)
        return kernel.gemm

    def compute_cycles(self, kernel: Kernel) -> int:
        """Cycles on the array or the vector unit, before the memory roofline and the overhead."""
        if kernel.kind == "free":
            return 0
        gemm = self.array_shape(kernel)
        if gemm is not None:
            return array_cycles(gemm, self.config.rows, self.config.cols, self.config.dataflow)
        return max(1, math.ceil(_vector_elements(kernel) / self.config.lanes))

    def memory_cycles(self, kernel: Kernel) -> int:
        return math.ceil(kernel.bytes_moved(self.config.bytes_per_element) / self.config.dram_bytes_per_cycle)

    def kernel_cycles(self, kernel: Kernel) -> int:
        if kernel.kind == "free":
            return 0
        return max(self.compute_cycles(kernel), self.memory_cycles(kernel)) + self.config.per_op_overhead_cycles

    def cycles_to_ms(self, cycles: int) -> float:
        return cycles / (self.config.clock_ghz * 1e6)

    def lane_use(self, kernel: Kernel) -> LaneUse | None:
        """The channel dimension the dataflow spreads over lanes: N over columns (ws, os), K over rows (is)."""
        gemm = self.array_shape(kernel)
        if gemm is None:
            return None
        per_group = " per group" if gemm.groups > 1 else ""
        if self.config.dataflow == "is":
            dimension = f"reduction rows (R·S·C_in/g){per_group}"
            return LaneUse(kernel.name, kernel.kind, dimension, gemm.k, self.config.rows)
        return LaneUse(kernel.name, kernel.kind, f"output channels{per_group}", gemm.n, self.config.cols)

    def measure(self, model: onnx.ModelProto, input_shapes: Mapping[str, Shape]) -> Measurement:
        """Simulated latency; details["kernels"] lists (name, op, cycles) of every kernel that is not free."""
        kernels = [k for k in decompose(model, input_shapes, self.rules) if k.kind != "free"]
        costs = [(k, self.kernel_cycles(k)) for k in kernels]
        cycles = sum(c for _, c in costs)
        return Measurement(
            latency_ms=self.cycles_to_ms(cycles),
            cycles=cycles,
            details={"kernels": [(k.name, k.op, c) for k, c in costs], "target": self.describe()},
        )


def _vector_elements(kernel: Kernel) -> int:
    """Element operations a vector kernel performs."""
    if kernel.kind == "pool":
        return kernel.output_elements * kernel.window
    if kernel.kind in ("elementwise", "resize", "concat"):
        return kernel.output_elements
    return max(kernel.input_elements, kernel.output_elements)  # unknown op: touch every element once

"""What a pass is: a name, options, an exactness class, a matcher that explains itself, and a rewrite.

Modelled on onnx-ir's pass infrastructure and onnxscript's rewriter: `match()` lists every place the
pass looked at, each either applicable or carrying the *reason* it is not; `apply()` rewrites the chosen
sites and returns `PassResult(model, modified, stats)`. Passes never mutate weight arrays in place (a
`gs.Graph.copy()` shares them); they build new arrays. `to_graph` loads every weight read-only, so a
write into one raises instead of changing other copies.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from hwnas.errors import BadInputError
from hwnas.graph.shapes import Shape

if typing.TYPE_CHECKING:
    from hwnas.passes._reconstruct import FitCache


class Exactness(str, enum.Enum):
    EXACT = "exact"  # same function up to float re-association; ORT-verified
    RECONSTRUCTED = "reconstructed"  # new weights fitted by least squares; drift measured
    LOSSY = "lossy"  # changes the function without fitting


def weakest(classes: Iterable[Exactness]) -> Exactness:
    """The weakest of `classes` (EXACT when there are none): the class of passes run one after another."""
    return max(classes, key=list(Exactness).index, default=Exactness.EXACT)  # declared strongest first


@dataclass(frozen=True)
class Site:
    """One place a matcher looked at. `reason` is None when the pass can rewrite it."""

    nodes: tuple[str, ...]
    description: str
    reason: str | None = None
    data: Any = field(default=None, compare=False, repr=False)  # matcher's findings for apply()

    @property
    def applicable(self) -> bool:
        return self.reason is None


@dataclass
class PassResult:
    model: gs.Graph  # the rewritten graph (export with hwnas.graph.gsgraph.to_model)
    modified: bool
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may need beyond the graph: analysis shapes, calibration data, a seed, warnings out."""

    template: onnx.ModelProto  # the original model: opsets and signature for exports
    input_shapes: Mapping[str, Shape]
    calibration: Mapping[str, np.ndarray] | None = None
    seed: int = 0
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False  # `hwnas run --dry-run`: passes that need data they lack may list sites only
    # a search's fits made so far in this process (hwnas.passes._reconstruct.FitCache): candidates that share
    # a pipeline prefix reuse its refits; None (a single run): every fit is made afresh
    fit_cache: FitCache | None = None


def option(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A pass option: a dataclass field with help text and, for modes, the allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class NoOptions:
    pass


class Pass:
    """Base class. Subclasses set `name`, `summary`, `Options` and implement `match` and `apply`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    default_exactness: ClassVar[Exactness] = Exactness.EXACT

    def __init__(self, **options: Any):
        self.options = parse_options(self.name, self.Options, options)

    @property
    def exactness(self) -> Exactness:
        """May depend on the options (align-channels pad vs trim); the class default otherwise."""
        return self.default_exactness

    def match(self, graph: gs.Graph, ctx: PassContext) -> list[Site]:
        raise NotImplementedError

    def apply(self, graph: gs.Graph, sites: list[Site], ctx: PassContext) -> PassResult:
        raise NotImplementedError

    @classmethod
    def option_docs(cls) -> list[dict]:
        return [
            {"name": f.name, "default": f.default, "choices": f.metadata.get("choices"), "help": f.metadata.get("help", "")}
            for f in dataclasses.fields(cls.Options)
        ]

    @classmethod
    def exactness_doc(cls) -> str:
        return cls.default_exactness.value


def parse_options(pass_name: str, options_cls: type, raw: Mapping[str, Any]) -> Any:
    """Build the Options dataclass from text or Python values, with one-line errors."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise BadInputError(f"pass {pass_name!r} has no option {key!r} (options: {known})")
        values[key] = _coerce(pass_name, key, value, hints[key], fields[key].metadata.get("choices"))
    return options_cls(**values)


def _coerce(pass_name: str, key: str, value: Any, hint: Any, choices: tuple | None) -> Any:
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    try:
        if base is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            value = value.lower() in ("true", "1")
        elif base in (int, float) and not isinstance(value, bool):
            value = base(value)
            if base is int and isinstance(value, float):
                raise ValueError(value)
    except ValueError:
        raise BadInputError(f"pass {pass_name!r}: option {key}={value!r} is not a valid {base.__name__}") from None
    if choices and value not in choices:
        raise BadInputError(f"pass {pass_name!r}: option {key}={value!r}; choose one of {', '.join(map(str, choices))}")
    return value

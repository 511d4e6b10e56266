"""Textual pipelines, MLIR style: `fold-bn,replace-conv{mode=grouped,group_size=16},align-channels{multiple=32}`.

Grammar::

    pipeline := step ("," step)*
    step     := NAME ["{" KEY "=" VALUE ("," KEY "=" VALUE)* "}"]

Every pass also accepts `sites=SELECTOR`, which restricts it to some of the applicable sites its
matcher lists, by index: `sites=3`, `sites=0:5` (0..4), `sites=0;2;7:9`, or by a node the site
is anchored at: `sites=@block3/dw/conv;@block4/dw/conv`. Options keep the order and
spelling they were written in, so `str(parse_pipeline(text)) == text` for any valid text without
spaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hwnas.errors import BadInputError
from hwnas.passes.base import Pass, Site
from hwnas.passes.registry import get_pass

_NAME = re.compile(r"[a-z][a-z0-9-]*")
_VALUE = re.compile(r"[^,{}=\s]+")


@dataclass(frozen=True)
class SiteSelector:
    """Which applicable sites a pass may touch: indices (half-open ranges) and/or node names.

    Indices count the applicable sites in the order the matcher lists them (what `--dry-run` shows);
    `@name` picks the site anchored at that node (the first node a site lists: the conv a rewrite
    starts from), which stays valid when earlier passes change how many sites there are (the search
    compiles its candidates this way).
    """

    ranges: tuple[tuple[int, int | None], ...] = ()
    names: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str) -> SiteSelector:
        ranges, names = [], set()
        for part in text.split(";"):
            if part.startswith("@") and len(part) > 1:
                names.add(part[1:])
                continue
            m = re.fullmatch(r"(\d*):(\d*)|(\d+)", part)
            if not m:
                raise BadInputError(f"bad site selector {text!r}: use N, A:B, @node_name, joined by ';'")
            if m[3] is not None:
                ranges.append((int(m[3]), int(m[3]) + 1))
            else:
                ranges.append((int(m[1] or 0), int(m[2]) if m[2] else None))
        return cls(tuple(ranges), frozenset(names))

    def selects(self, index: int, node_names: tuple[str, ...]) -> bool:
        in_range = any(lo <= index and (hi is None or index < hi) for lo, hi in self.ranges)
        return in_range or (bool(node_names) and node_names[0] in self.names)

    def unmatched(self, sites: list[Site]) -> str | None:
        """Why part of this selector picks nothing among `sites` (None when every part picks a site).

        A user's `sites=` that matches nothing would otherwise run the pass as a silent no-op."""
        applicable = [s for s in sites if s.applicable]
        for lo, hi in self.ranges:
            if lo >= len(applicable) or (hi is not None and hi <= lo):
                span = f"{lo}" if hi == lo + 1 else f"{lo}:{'' if hi is None else hi}"
                return f"site index {span} is out of range: the pass has {len(applicable)} applicable site(s)"
        anchors = {s.nodes[0]: s for s in sites if s.nodes}
        for name in sorted(self.names):
            site = anchors.get(name)
            if site is None:
                return f"no site of this pass is anchored at node {name!r}"
            if not site.applicable:
                return f"the site at node {name!r} is not applicable: {site.reason}"
        return None


@dataclass(frozen=True)
class PassSpec:
    """One pipeline step: a pass name and its options as written."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def sites(self) -> SiteSelector | None:
        value = dict(self.options).get("sites")
        return SiteSelector.parse(value) if value is not None else None

    def instantiate(self) -> Pass:
        pass_options = {k: v for k, v in self.options if k != "sites"}
        return get_pass(self.name)(**pass_options)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.options) + "}"


@dataclass(frozen=True)
class Pipeline:
    steps: tuple[PassSpec, ...]

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.steps)

    def without(self, disabled: set[str]) -> Pipeline:
        return Pipeline(tuple(s for s in self.steps if s.name not in disabled))


def parse_pipeline(text: str) -> Pipeline:
    """Parse and validate (pass names, option names and values) a pipeline string."""
    pos, steps = 0, []
    text = text.strip()
    if not text:
        raise BadInputError("empty pipeline")

    def fail(msg: str) -> BadInputError:
        return BadInputError(f"bad pipeline {text!r} at column {pos + 1}: {msg}")

    while True:
        m = _NAME.match(text, pos)
        if not m:
            raise fail("expected a pass name")
        name, pos = m.group(), m.end()
        options: list[tuple[str, str]] = []
        if pos < len(text) and text[pos] == "{":
            pos += 1
            while True:
                km = re.compile(r"[a-z_][a-z0-9_]*").match(text, pos)
                if not km:
                    raise fail("expected an option name")
                pos = km.end()
                if pos >= len(text) or text[pos] != "=":
                    raise fail("expected '='")
                vm = _VALUE.match(text, pos + 1)
                if not vm:
                    raise fail("expected an option value")
                if any(k == km.group() for k, _ in options):
                    raise fail(f"option {km.group()!r} given twice")
                options.append((km.group(), vm.group()))
                pos = vm.end()
                if pos < len(text) and text[pos] == ",":
                    pos += 1
                    continue
                if pos < len(text) and text[pos] == "}":
                    pos += 1
                    break
                raise fail("expected ',' or '}'")
        spec = PassSpec(name, tuple(options))
        spec.instantiate()  # unknown pass or bad option: fail now, not halfway through a run
        _ = spec.sites
        steps.append(spec)
        if pos == len(text):
            return Pipeline(tuple(steps))
        if text[pos] != ",":
            raise fail("expected ','")
        pos += 1

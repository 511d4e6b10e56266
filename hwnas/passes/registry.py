"""The pass registry: `@register_pass` on a Pass subclass makes it available by name."""

from __future__ import annotations

from hwnas.errors import BadInputError
from hwnas.passes.base import Pass

_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two passes named {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    _load_builtin_passes()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BadInputError(f"unknown pass {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None


def all_passes() -> dict[str, type[Pass]]:
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def _load_builtin_passes() -> None:
    import hwnas.passes.builtin  # noqa: F401  (importing registers every built-in pass)

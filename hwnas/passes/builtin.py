"""Imports every pass module in this package so that their @register_pass decorators run.

A new pass is a new file here; nothing else needs editing.
"""

import importlib
import pkgutil

import hwnas.passes as _package

_INFRASTRUCTURE = {"base", "builtin", "manager", "pipeline", "registry"}

for _module in pkgutil.iter_modules(_package.__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"{_package.__name__}.{_module.name}")

"""Imports every pass module in this package so that their @register_pass decorators run.

A new pass is a new file here; nothing else needs editing. The package is found from this file, not
by importing `hwnas.passes` (whose __init__ imports the registry, which imports this module).
"""

import importlib
import pkgutil
from pathlib import Path

_INFRASTRUCTURE = {"base", "builtin", "manager", "pipeline", "registry"}

for _module in pkgutil.iter_modules([str(Path(__file__).parent)]):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"{__package__}.{_module.name}")

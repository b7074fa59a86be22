"""Model families, one module each; every module in this package registers itself on import.

Adding a family is adding a module here (plus its presets, docs and tests): see ``base.Family``
for what it provides. Nothing else in flashvaed names a family.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import FAMILIES, LAYOUTS, Family, Match, detect, get, names, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FAMILIES", "LAYOUTS", "Family", "Match", "detect", "get", "names", "register"]

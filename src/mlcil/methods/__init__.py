"""Continual-learning methods, one file each, registered by name.

Importing this package imports every module in this folder (in name order), so the registry is
complete and a new method is one new file here: nothing else has to list it.
"""

from __future__ import annotations

import importlib
import pkgutil

from mlcil.methods.base import Batch, Method, Optimization, SessionContext, StepOutput
from mlcil.methods.registry import METHODS, get_method, register_method

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "METHODS",
    "Batch",
    "Method",
    "Optimization",
    "SessionContext",
    "StepOutput",
    "get_method",
    "register_method",
]

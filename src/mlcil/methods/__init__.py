"""Continual-learning methods, one file each, registered by name.

Importing this package imports every method module explicitly, so the registry is complete.
"""

from __future__ import annotations

from mlcil.methods import finetune, joint, krt, lwf, podnet, replay  # noqa: F401  (registration)
from mlcil.methods.base import Batch, Method, Optimization, SessionContext, StepOutput
from mlcil.methods.registry import METHODS, get_method, register_method

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

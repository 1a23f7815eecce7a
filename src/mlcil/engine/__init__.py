"""The training engine: one loop for every method, run state, checkpoints, evaluation."""

from __future__ import annotations

from mlcil.engine.loop import Trainer, evaluate_run, load_run, plan_sessions
from mlcil.engine.runtime import Runtime, derive_seed, seed_everything

__all__ = [
    "Runtime",
    "Trainer",
    "derive_seed",
    "evaluate_run",
    "load_run",
    "plan_sessions",
    "seed_everything",
]

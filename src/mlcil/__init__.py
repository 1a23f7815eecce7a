"""mlcil: multi-label class-incremental learning of images (KRT and baselines).

``mlcil.load(run_dir)`` returns a trained run ready to predict (see :mod:`mlcil.api`); it is
imported on first use, so ``import mlcil`` stays light.
"""

from __future__ import annotations

from typing import Any

from mlcil.version import __version__

__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from mlcil.api import load

        return load
    raise AttributeError(f"module 'mlcil' has no attribute {name!r}")

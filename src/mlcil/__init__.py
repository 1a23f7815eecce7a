"""mlcil: multi-label class-incremental learning of images (KRT and baselines).

The Python API (imported on first use, so ``import mlcil`` stays light):

- ``mlcil.train(config, overrides=..., run_dir=..., observers=...)`` trains a run and returns it;
  ``mlcil.resume(run_dir)`` continues one (see :mod:`mlcil.api`).
- ``mlcil.load(run_dir)`` returns a trained run ready to predict.
- ``mlcil.register_dataset(name, load)`` makes ``data.dataset: <name>`` load the user's own
  ``ImageSource`` (see :mod:`mlcil.data.catalog`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlcil.version import __version__

if TYPE_CHECKING:
    from mlcil.api import load, resume, train
    from mlcil.data.catalog import register_dataset

__all__ = ["__version__", "load", "register_dataset", "resume", "train"]

_LAZY = {
    "load": "mlcil.api",
    "train": "mlcil.api",
    "resume": "mlcil.api",
    "register_dataset": "mlcil.data.catalog",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlcil' has no attribute {name!r}")

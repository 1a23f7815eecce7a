"""mlcil: multi-label class-incremental learning of images (KRT and baselines)."""

from __future__ import annotations

from mlcil.version import __version__

__all__ = ["__version__"]

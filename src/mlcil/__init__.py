"""mlcil: multi-label class-incremental learning of images (KRT and baselines)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

"""The embedded benchmark (``data.dataset: digits``): scenes of real handwritten digits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlcil.data.base import ImageSource
from mlcil.data.dataset_spec import DatasetSpec, add_dataset

if TYPE_CHECKING:
    from mlcil.config.schema import DataConfig


def load(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.embedded import load_digits

    return load_digits(split)


add_dataset(DatasetSpec("digits", load, None, ("B0-C2", "B4-C2")))

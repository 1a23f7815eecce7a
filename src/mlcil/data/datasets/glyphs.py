"""Scenes of letters and symbols, never digits (``data.dataset: glyphs``): the leak-free
pretraining source of the digits benchmark's backbone (``mlcil pretrain``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlcil.data.base import ImageSource
from mlcil.data.dataset_spec import DatasetSpec, add_dataset

if TYPE_CHECKING:
    from mlcil.config.schema import DataConfig


def load(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.glyphs import load_glyphs

    return load_glyphs(split, image_size=config.image_size)


add_dataset(DatasetSpec("glyphs", load, None, ()))

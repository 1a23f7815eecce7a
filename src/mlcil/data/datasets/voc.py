"""PASCAL VOC 2007 (``data.dataset: voc``): the XML annotations of trainval and test."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlcil.data.base import ImageSource
from mlcil.data.dataset_spec import DatasetSpec, add_dataset, required_root

if TYPE_CHECKING:
    from mlcil.config.schema import DataConfig


def load(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.annotation_cache import annotation_cache_root
    from mlcil.data.voc import load_voc

    return load_voc(required_root(config), split, cache=annotation_cache_root(config))


add_dataset(DatasetSpec("voc", load, "datasets/voc2007", ("B0-C4", "B10-C2", "B4-C2", "B5-C3")))

"""MS-COCO 2014 (``data.dataset: coco``): the instances files parsed with pycocotools."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlcil.data.base import ImageSource
from mlcil.data.dataset_spec import DatasetSpec, add_dataset, required_root

if TYPE_CHECKING:
    from mlcil.config.schema import DataConfig


def load(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.annotation_cache import annotation_cache_root
    from mlcil.data.coco import load_coco

    return load_coco(required_root(config), split, cache=annotation_cache_root(config))


add_dataset(
    DatasetSpec("coco", load, "datasets/coco2014", ("B0-C10", "B40-C10", "B0-C5", "B20-C4"))
)

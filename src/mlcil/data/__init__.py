"""Datasets: the catalog of dataset names, class tables, format loaders, the embedded benchmark,
session splits, transforms and the caches of decoded images and parsed annotations.

Importing this package loads only the light modules (catalog, class tables, the source types);
format loaders are imported when a dataset is built.
"""

from __future__ import annotations

from mlcil.data.base import ArrayImageSource, FileImageSource, ImageSource, training_label_density
from mlcil.data.catalog import (
    DATASETS,
    DatasetSpec,
    build_image_cache,
    build_sources,
    dataset_spec,
    resolved_root,
)
from mlcil.data.classes import COCO_CATEGORIES, DIGIT_CLASSES, VOC_CLASSES, class_names

__all__ = [
    "COCO_CATEGORIES",
    "DATASETS",
    "DIGIT_CLASSES",
    "VOC_CLASSES",
    "ArrayImageSource",
    "DatasetSpec",
    "FileImageSource",
    "ImageSource",
    "build_image_cache",
    "build_sources",
    "class_names",
    "dataset_spec",
    "resolved_root",
    "training_label_density",
]

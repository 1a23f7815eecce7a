"""Datasets: format loaders, the embedded benchmark, session splits and transforms."""

from __future__ import annotations

from collections.abc import Callable

from mlcil.config import DataConfig
from mlcil.data.base import ArrayImageSource, FileImageSource, ImageSource, training_label_density
from mlcil.errors import DataError


def _coco(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.coco import load_coco

    return load_coco(config.resolved_root, split)


def _voc(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.voc import load_voc

    return load_voc(config.resolved_root, split)


def _digits(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.embedded import load_digits

    return load_digits(split)


def _manifest(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.manifest import infer_class_names, load_manifest, read_class_file

    manifests = [config.train_manifest, config.test_manifest]
    if config.class_list:
        names = read_class_file(config.class_list)
    else:
        names = infer_class_names([m for m in manifests if m])
    path = config.train_manifest if split == "train" else config.test_manifest
    return load_manifest(path, split, names, root=config.root)


# Registry of dataset loaders: a new format is one function here plus its module.
DATASET_LOADERS: dict[str, Callable[[DataConfig, str], ImageSource]] = {
    "coco": _coco,
    "voc": _voc,
    "digits": _digits,
    "manifest": _manifest,
}


def build_sources(config: DataConfig) -> tuple[ImageSource, ImageSource]:
    """Load the training and test splits named by a data config."""
    try:
        loader = DATASET_LOADERS[config.dataset]
    except KeyError:
        raise DataError(f"data.dataset: unknown dataset {config.dataset!r}") from None
    train, test = loader(config, "train"), loader(config, "test")
    if train.class_names != test.class_names:
        raise DataError(f"{config.dataset}: the train and test splits disagree on the class list")
    return train, test


def label_density(config: DataConfig, train: ImageSource) -> float:
    """DPL's prior: the config's value, else the dataset's published one, else computed."""
    if config.label_density is not None:
        return config.label_density
    if train.label_density is not None:
        return train.label_density
    return training_label_density(train.labels)


__all__ = [
    "DATASET_LOADERS",
    "ArrayImageSource",
    "FileImageSource",
    "ImageSource",
    "build_sources",
    "label_density",
]

"""A dataset of the user's files listed in CSV/JSON manifests (``data.dataset: manifest``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlcil.data.base import ImageSource
from mlcil.data.dataset_spec import DatasetSpec, add_dataset

if TYPE_CHECKING:
    from mlcil.config.schema import DataConfig


def load(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.manifest import infer_class_names, load_manifest, read_class_file

    manifests = [config.train_manifest, config.test_manifest]
    if config.class_list:
        names = read_class_file(config.class_list)
    else:
        names = infer_class_names([m for m in manifests if m])
    path = config.train_manifest if split == "train" else config.test_manifest
    assert path is not None  # the schema requires both manifests
    return load_manifest(path, split, names, root=config.root)


add_dataset(DatasetSpec("manifest", load, None, (), needs_manifests=True))

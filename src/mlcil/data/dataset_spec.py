"""What a dataset is to the toolkit (:class:`DatasetSpec`) and the registry of datasets.

The built-in datasets register themselves, one file each in :mod:`mlcil.data.datasets`
(discovered when the catalog is imported); a user's own dataset is registered with
:func:`mlcil.register_dataset`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from mlcil.data.base import ImageSource
from mlcil.errors import DataError
from mlcil.registry import Entries

if TYPE_CHECKING:  # the schema imports the catalog; the loaders only read the config's fields
    from mlcil.config.schema import DataConfig

ImageSourceFactory = Callable[["DataConfig", str], ImageSource]
"""``(data config, "train" | "test") -> ImageSource``: how a dataset's split is loaded."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the toolkit knows about one dataset.

    Attributes:
        name: the ``data.dataset`` value.
        load: ``(data config, "train" | "test") -> ImageSource``.
        default_root: folder used when ``data.root`` is not set (None: the dataset needs none).
        protocols: the published B{b}-C{c} settings (listed by ``mlcil list``).
        needs_manifests: the config must name ``data.train_manifest`` and ``data.test_manifest``.
    """

    name: str
    load: ImageSourceFactory
    default_root: str | None = None
    protocols: tuple[str, ...] = ()
    needs_manifests: bool = False


DATASETS: Entries[DatasetSpec] = Entries("dataset")
"""``data.dataset`` name -> its entry."""


def add_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register a built-in dataset's entry (what each file of :mod:`mlcil.data.datasets` does)."""
    return DATASETS.add(spec.name, spec)


def dataset_spec(name: str) -> DatasetSpec:
    """The entry of ``name``; an unknown name is an error listing the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(map(repr, DATASETS))
        raise DataError(f"data.dataset: {name!r} is not one of {known}") from None


def resolved_root(config: DataConfig) -> str | None:
    """``data.root``, or the dataset's default root when it is not set."""
    return config.root if config.root is not None else dataset_spec(config.dataset).default_root


def required_root(config: DataConfig) -> str:
    """:func:`resolved_root`, which the dataset needs (a DataError when there is none)."""
    root = resolved_root(config)
    if root is None:
        raise DataError(f"data.root: dataset {config.dataset!r} needs a root folder")
    return root

"""The dataset catalog: every dataset name a config may use, its default root, its published
protocols and how its splits are loaded; the config schema validates ``data.dataset`` against it.

The built-in datasets are discovered: each is one file in :mod:`mlcil.data.datasets` that
registers its :class:`~mlcil.data.dataset_spec.DatasetSpec`, so a new one is one new file there.
A dataset of the user's own is registered from Python, without editing the package:
:func:`register_dataset` (in a script, a notebook, or a plugin module imported with
``--plugin``, see :mod:`mlcil.plugins`).
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

import mlcil.data.datasets  # noqa: F401  (registers the built-in datasets)
from mlcil.data.base import FileImageSource, ImageSource
from mlcil.data.dataset_spec import (
    DATASETS,
    DatasetSpec,
    ImageSourceFactory,
    dataset_spec,
    resolved_root,
)
from mlcil.errors import DataError

if TYPE_CHECKING:  # the schema imports this module; the loaders only read its fields
    from mlcil.config.schema import DataConfig

logger = logging.getLogger(__name__)

BUILT_IN = frozenset(DATASETS)
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def register_dataset(
    name: str,
    load: ImageSourceFactory,
    *,
    default_root: str | None = None,
    protocols: tuple[str, ...] = (),
    replace: bool = False,
) -> DatasetSpec:
    """Make ``data.dataset: <name>`` load the splits ``load`` returns.

    Args:
        name: the ``data.dataset`` value (letters, digits, ``_ . -``; it becomes part of run
            folder names).
        load: ``load(data_config, split)`` returns the ``ImageSource`` of ``split`` (``"train"``
            or ``"test"``); both splits must list the same classes. ``data_config.root`` is
            ``default_root`` unless the config sets ``data.root``.
        default_root: the root folder when the config sets none.
        protocols: the dataset's usual ``B{b}-C{c}`` settings (listed by ``mlcil list``).
        replace: replace a dataset registered earlier under ``name`` by another function.
            Registering the same function again (a notebook cell run twice) needs no flag.

    Returns:
        The catalog entry.

    Raises:
        DataError: for an invalid name, a built-in dataset's name, or a name registered by
            another function (without ``replace``).
    """
    if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name):
        raise DataError(
            f"register_dataset: {name!r} is not a dataset name (letters, digits, '_', '.', '-')"
        )
    if name in BUILT_IN:
        raise DataError(f"register_dataset: {name!r} is a built-in dataset; choose another name")
    if not callable(load):
        raise DataError(f"register_dataset({name!r}): load must be callable, got {load!r}")
    earlier = DATASETS.get(name)
    if earlier is not None and not replace and not _same_function(earlier.load, load):
        raise DataError(
            f"register_dataset: {name!r} is registered already (by {_describe(earlier.load)}); "
            "choose another name or pass replace=True"
        )
    spec = DATASETS.add(name, DatasetSpec(name, load, default_root, tuple(protocols)), replace=True)
    logger.debug("dataset %r registered: %s", name, _describe(load))
    return spec


def _same_function(old: ImageSourceFactory, new: ImageSourceFactory) -> bool:
    """The same definition, possibly executed again (a re-run notebook cell, a reimport)."""
    return old is new or _describe(old) == _describe(new)


def _describe(load: ImageSourceFactory) -> str:
    module = getattr(load, "__module__", None) or "?"
    return f"{module}.{getattr(load, '__qualname__', type(load).__name__)}"


def build_sources(config: DataConfig) -> tuple[ImageSource, ImageSource]:
    """Load the training and test splits named by a data config.

    With ``data.image_cache`` the splits whose images are files are read through the image
    cache (built on first use, see ``mlcil.data.image_cache``); the class order is applied after
    that, as it only permutes label columns.
    """
    spec = dataset_spec(config.dataset)
    train, test = spec.load(config, "train"), spec.load(config, "test")
    for split, source in (("train", train), ("test", test)):
        if not isinstance(source, ImageSource):  # a registered function's mistake
            raise DataError(
                f"{config.dataset}: the {split} split is a {type(source).__name__}, not an "
                f"ImageSource (returned by {_describe(spec.load)})"
            )
    if train.class_names != test.class_names:
        raise DataError(f"{config.dataset}: the train and test splits disagree on the class list")
    if config.image_cache:
        from mlcil.data.image_cache import cached_source

        train, test = cached_source(train, config), cached_source(test, config)
    if config.class_order is not None:
        for source in (train, test):
            source.reorder_classes(config.class_order)
    return train, test


def build_image_cache(config: DataConfig) -> dict[str, Any]:
    """Build (or check and reuse) the image cache of both splits: ``mlcil data cache``.

    It runs whatever ``data.image_cache`` says (that key decides whether runs *read* the cache).

    Returns:
        ``{"images", "bytes", "seconds", "path", "splits"}``: totals over both splits, the
        cache root folder, and per split (``"train"``, ``"test"``) the same figures with the
        split's own folder and ``"built"`` (False: a valid cache was found and reused).

    Raises:
        DataError: for a dataset held in memory (nothing to cache), or naming an image that is
            missing or does not decode.
    """
    from mlcil.data.image_cache import ensure_image_cache, image_cache_root

    spec = dataset_spec(config.dataset)
    started = time.perf_counter()
    splits: dict[str, dict[str, Any]] = {}
    for split in ("train", "test"):
        source = spec.load(config, split)
        if not isinstance(source, FileImageSource):
            raise DataError(
                f"data.dataset: {config.dataset!r} is held in memory; it has no image files to "
                "cache"
            )
        cached = ensure_image_cache(
            source, config.image_size, image_cache_root(config), config.num_workers
        )
        splits[split] = cached.summary()
    return {
        "images": sum(entry["images"] for entry in splits.values()),
        "bytes": sum(entry["bytes"] for entry in splits.values()),
        "seconds": time.perf_counter() - started,
        "path": str(image_cache_root(config)),
        "splits": splits,
    }


__all__ = [
    "BUILT_IN",
    "DATASETS",
    "DatasetSpec",
    "ImageSourceFactory",
    "build_image_cache",
    "build_sources",
    "dataset_spec",
    "register_dataset",
    "resolved_root",
]

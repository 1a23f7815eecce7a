"""The dataset catalog: every dataset name a config may use, its default root, its published
protocols and how its splits are loaded. This is the one place that knows which datasets exist;
the config schema validates ``data.dataset`` against it.

A new format is one loader module plus one ``DatasetSpec`` entry here. A dataset of the user's own
is registered from Python, without editing the package: :func:`register_dataset` (in a script, a
notebook, or a plugin module imported with ``--plugin``, see :mod:`mlcil.plugins`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mlcil.data.base import FileImageSource, ImageSource
from mlcil.errors import DataError

if TYPE_CHECKING:  # the schema imports this module; the loaders only read its fields
    from mlcil.config.schema import DataConfig

logger = logging.getLogger(__name__)

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


def _root(config: DataConfig) -> str:
    root = resolved_root(config)
    if root is None:
        raise DataError(f"data.root: dataset {config.dataset!r} needs a root folder")
    return root


def _coco(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.annotation_cache import annotation_cache_root
    from mlcil.data.coco import load_coco

    return load_coco(_root(config), split, cache=annotation_cache_root(config))


def _voc(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.annotation_cache import annotation_cache_root
    from mlcil.data.voc import load_voc

    return load_voc(_root(config), split, cache=annotation_cache_root(config))


def _digits(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.embedded import load_digits

    return load_digits(split)


def _glyphs(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.glyphs import load_glyphs

    return load_glyphs(split, image_size=config.image_size)


def _manifest(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.manifest import infer_class_names, load_manifest, read_class_file

    manifests = [config.train_manifest, config.test_manifest]
    if config.class_list:
        names = read_class_file(config.class_list)
    else:
        names = infer_class_names([m for m in manifests if m])
    path = config.train_manifest if split == "train" else config.test_manifest
    assert path is not None  # the schema requires both manifests
    return load_manifest(path, split, names, root=config.root)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("coco", _coco, "datasets/coco2014", ("B0-C10", "B40-C10", "B0-C5", "B20-C4")),
        DatasetSpec("voc", _voc, "datasets/voc2007", ("B0-C4", "B10-C2", "B4-C2", "B5-C3")),
        DatasetSpec("digits", _digits, None, ("B0-C2", "B4-C2")),
        # Letters and symbols, never digits: the leak-free pretraining source of the digits
        # benchmark's backbone (``mlcil pretrain``).
        DatasetSpec("glyphs", _glyphs, None, ()),
        DatasetSpec("manifest", _manifest, None, (), needs_manifests=True),
    )
}


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
    spec = DatasetSpec(name, load, default_root, tuple(protocols))
    DATASETS[name] = spec
    logger.debug("dataset %r registered: %s", name, _describe(load))
    return spec


def _same_function(old: ImageSourceFactory, new: ImageSourceFactory) -> bool:
    """The same definition, possibly executed again (a re-run notebook cell, a reimport)."""
    return old is new or _describe(old) == _describe(new)


def _describe(load: ImageSourceFactory) -> str:
    module = getattr(load, "__module__", None) or "?"
    return f"{module}.{getattr(load, '__qualname__', type(load).__name__)}"


def dataset_spec(name: str) -> DatasetSpec:
    """The catalog entry of ``name``; an unknown name is an error listing the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(map(repr, DATASETS))
        raise DataError(f"data.dataset: {name!r} is not one of {known}") from None


def resolved_root(config: DataConfig) -> str | None:
    """``data.root``, or the dataset's default root when it is not set."""
    return config.root if config.root is not None else dataset_spec(config.dataset).default_root


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

"""The dataset catalog: every dataset name a config may use, its default root, its published
protocols and how its splits are loaded. This is the one place that knows which datasets exist;
the config schema validates ``data.dataset`` against it.

A new format is one loader module plus one ``DatasetSpec`` entry here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mlcil.data.base import FileImageSource, ImageSource
from mlcil.errors import DataError

if TYPE_CHECKING:  # the schema imports this module; the loaders only read its fields
    from mlcil.config.schema import DataConfig


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
    load: Callable[[DataConfig, str], ImageSource]
    default_root: str | None = None
    protocols: tuple[str, ...] = ()
    needs_manifests: bool = False


def _root(config: DataConfig) -> str:
    root = resolved_root(config)
    if root is None:
        raise DataError(f"data.root: dataset {config.dataset!r} needs a root folder")
    return root


def _coco(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.coco import load_coco
    from mlcil.data.image_cache import annotation_cache_root

    return load_coco(_root(config), split, cache=annotation_cache_root(config))


def _voc(config: DataConfig, split: str) -> ImageSource:
    from mlcil.data.image_cache import annotation_cache_root
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

"""The annotation cache (``data.annotation_cache: true``, the default): parsed label matrices.

COCO's instances JSON (175 MB for train2014) and VOC's XML files are parsed into a label matrix
and image refs once; the result is kept as ``<dataset>-<split>-<key>.npy`` (the uint8 labels) and
``.json`` (refs, class names, the annotation files' paths, sizes and mtimes, the labels' SHA-256)
under ``cache_root() / "annotations"``. ``key`` hashes the dataset, split, resolved root, class
list and loader version (:func:`mlcil.cache.provenance_key`); an entry is reused only while every
annotation file keeps its size and mtime, else the files are parsed again and the entry replaced.
A file modified less than ``RACY_SECONDS`` before it was read is parsed but not cached: a file
system with coarse timestamps could give a later edit of the same size the same mtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlcil.cache import cache_root, provenance_key, save_array_atomic, stamped
from mlcil.data.base import FileImageSource
from mlcil.errors import DataError
from mlcil.fileio import write_text_atomic

if TYPE_CHECKING:  # the schema imports the catalog, which imports this module lazily
    from mlcil.config.schema import DataConfig

logger = logging.getLogger(__name__)

RACY_SECONDS = 2.0


def annotation_cache_root(config: DataConfig) -> Path | None:
    """``cache_root() / "annotations"``, or None when ``data.annotation_cache`` is off."""
    return cache_root() / "annotations" if config.annotation_cache else None


def file_stats(paths: Sequence[Path]) -> np.ndarray:
    """``(N, 2)`` int64 of each file's size and mtime in ns; ``(-1, -1)`` for a missing one."""
    stats = np.full((len(paths), 2), -1, dtype=np.int64)
    for row, path in enumerate(paths):
        try:
            status = os.stat(path)
        except OSError:
            continue
        stats[row] = (status.st_size, status.st_mtime_ns)
    return stats


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; OSError/ValueError when it is unreadable or not an object."""
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict):
        raise ValueError(f"it holds a {type(record).__name__}, not an object")
    return record


def _annotation_files(paths: Sequence[Path]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of each annotation file (``-1`` for a missing one)."""
    stats = file_stats(paths)
    return [[str(p), int(s), int(m)] for p, (s, m) in zip(paths, stats, strict=True)]


def _read_annotation_entry(
    stem: Path, identity: Mapping[str, Any], files: list[list[Any]], root: Path
) -> FileImageSource | str:
    """The cached source under ``stem``, or why it cannot be used (``"missing"`` when absent)."""
    json_path, labels_path = stem.with_suffix(".json"), stem.with_suffix(".npy")
    if not json_path.exists():
        return "missing"
    try:
        record = read_json_object(json_path)
        labels = np.load(labels_path, allow_pickle=False)
    except (OSError, ValueError) as error:
        return f"the cache entry {json_path} or {labels_path} is unreadable ({error})"
    if record.get("identity") != dict(identity):
        return f"{json_path} records another dataset or loader version"
    if record.get("files") != files:
        changed = [f[0] for f, g in zip(files, record.get("files") or [], strict=False) if f != g]
        return f"annotation file(s) changed since they were cached, e.g. {(changed or ['?'])[0]}"
    if hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest() != record.get(
        "labels_sha256"
    ):
        return f"{labels_path} does not match the checksum {json_path} records"
    try:
        return FileImageSource(
            dataset=str(identity["dataset"]),
            split=str(identity["split"]),
            root=root,
            class_names=record["class_names"],
            image_refs=record["image_refs"],
            labels=labels,
            label_density=record["label_density"],
        )
    except (KeyError, TypeError, DataError) as error:
        return f"{json_path} is not a complete cache entry ({error})"


def _store_annotation_entry(
    stem: Path, identity: Mapping[str, Any], files: list[list[Any]], source: FileImageSource
) -> None:
    """Write the labels, then the JSON that vouches for them (both atomically)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").unlink(missing_ok=True)  # never pair new labels with an old JSON
    labels = np.ascontiguousarray(source.labels, dtype=np.uint8)
    save_array_atomic(stem.with_suffix(".npy"), labels)
    record = {
        "identity": dict(identity),
        "files": files,
        "class_names": source.class_names,
        "image_refs": source.image_refs,
        "label_density": source.label_density,
        "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
    }
    write_text_atomic(stem.with_suffix(".json"), json.dumps(stamped(record)) + "\n")


def cached_annotations(
    folder: Path | None,
    identity: Mapping[str, Any],
    annotation_files: Sequence[Path],
    root: Path,
    parse: Callable[[], FileImageSource],
) -> FileImageSource:
    """``parse()``'s source, reused from ``folder`` while the annotation files are unchanged.

    Args:
        folder: the annotation cache folder; None: always parse.
        identity: what the parse depends on besides the files: ``dataset``, ``split``, the
            resolved root, the class list and the loader's version.
        annotation_files: every file ``parse`` reads; their sizes and mtimes guard the entry.
        root: the ``root`` of the returned source (as the caller named it).
        parse: the loader's parse, called on a miss; its errors propagate unchanged.

    Returns:
        The source, from the cache or freshly parsed (and then stored, unless a file is newer
        than ``RACY_SECONDS`` or the folder cannot be written: a WARNING says so).
    """
    if folder is None:
        return parse()
    key = provenance_key(dict(identity))
    stem = Path(folder) / f"{identity['dataset']}-{identity['split']}-{key}"
    read_at = time.time_ns()
    files = _annotation_files(annotation_files)
    cached = _read_annotation_entry(stem, identity, files, root)
    if isinstance(cached, FileImageSource):
        logger.info(
            "%s/%s: labels from the annotation cache %s", cached.dataset, cached.split, stem
        )
        return cached
    if cached != "missing":
        logger.info("%s: parsing the annotations again: %s", stem.name, cached)
    source = parse()
    if any(mtime < 0 or mtime > read_at - RACY_SECONDS * 1e9 for _, _, mtime in files):
        logger.info("not caching %s: an annotation file was modified just now", stem.name)
        return source
    try:
        _store_annotation_entry(stem, identity, files, source)
    except OSError as error:
        logger.warning("could not write the annotation cache %s: %s", stem, error)
    return source

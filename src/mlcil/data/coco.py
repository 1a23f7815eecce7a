"""MS-COCO 2014 instances files parsed into a ``FileImageSource``.

Expected layout below ``root``::

    annotations/instances_train2014.json   (split "train")
    annotations/instances_val2014.json     (split "test")
    train2014/COCO_train2014_000000000009.jpg ...
    val2014/COCO_val2014_000000000042.jpg ...

Class indices come from category *names* (``protocol.class_names("coco")``), never from the
category ids or from the order the file lists the categories in, so a file that lists the 80
categories in another order yields the same label matrix. Crowd annotations give no label, and an
image without any labelled object keeps an all-zero row (session splitting drops it later).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlcil.data.base import FileImageSource
from mlcil.data.classes import class_names
from mlcil.data.image_cache import cached_annotations
from mlcil.errors import DataError
from mlcil.plugins import require

logger = logging.getLogger(__name__)

# Published prior of labels per image per class used by dynamic pseudo-labels.
COCO_LABEL_DENSITY = 2.9 / 80

# Bump when the parse changes what it returns: label matrices cached by an older loader are then
# parsed again instead of being reused.
LOADER_VERSION = 1

# split -> (annotation file name, image folder name)
_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("instances_train2014.json", "train2014"),
    "test": ("instances_val2014.json", "val2014"),
}


def load_coco(root: str | Path, split: str, cache: str | Path | None = None) -> FileImageSource:
    """Load one split of MS-COCO 2014 as multi-hot labels over the 80 categories.

    Args:
        root: folder holding ``annotations/`` and the image folders ``train2014/``, ``val2014/``.
        split: ``"train"`` (``instances_train2014.json``) or ``"test"`` (the 2014 val set,
            ``instances_val2014.json``).
        cache: the annotation cache folder (``mlcil.data.image_cache``): the parsed label
            matrix is kept there and reused while the instances file keeps its size and mtime.
            None: parse the file every time.

    Returns:
        A source with one row per entry of the file's ``images`` list, in file order, and
        ``image_refs`` like ``"train2014/COCO_train2014_000000000009.jpg"`` relative to ``root``.

    Raises:
        DataError: when the layout is incomplete, the file is not valid JSON, a category name is
            not one of the 80 COCO 2014 names, or an annotation refers to an unknown image or
            category id; the message names the file and the entry at fault.
    """
    if split not in _SPLITS:
        raise DataError(f"coco: unknown split {split!r}; expected 'train' or 'test'")
    json_name, image_dir = _SPLITS[split]
    root = Path(root)
    layout = (
        f"expected the layout <root>/annotations/{json_name} with images under <root>/{image_dir}/"
    )
    if not root.is_dir():
        raise DataError(f"coco: dataset root folder not found: {root} ({layout})")
    ann_path = root / "annotations" / json_name
    if not ann_path.is_file():
        raise DataError(f"coco: annotation file not found: {ann_path} ({layout})")
    if not (root / image_dir).is_dir():
        raise DataError(f"coco: image folder not found: {root / image_dir} ({layout})")

    identity = {
        "dataset": "coco",
        "split": split,
        "root": str(root.resolve()),
        "class_names": class_names("coco"),
        "loader": LOADER_VERSION,
    }
    source = cached_annotations(
        Path(cache) if cache is not None else None,
        identity,
        [ann_path],
        root,
        lambda: _parse(root, split, ann_path, image_dir),
    )
    logger.info("%s from %s", source.describe(), ann_path)
    return source


def _parse(root: Path, split: str, ann_path: Path, image_dir: str) -> FileImageSource:
    """Parse one instances file into a source (the work the annotation cache saves)."""
    dataset = _read_with_pycocotools(ann_path)
    names = class_names("coco")
    image_ids, file_names = _images(dataset, ann_path)
    category_ids, category_classes = _categories(dataset, ann_path, names)
    rows, cols = _label_pairs(dataset, ann_path, image_ids, category_ids, category_classes)

    labels = np.zeros((len(image_ids), len(names)), dtype=np.uint8)
    # Fancy-index assignment: repeated (row, col) pairs simply set the same cell to 1 again.
    labels[rows, cols] = 1
    return FileImageSource(
        dataset="coco",
        split=split,
        root=root,
        class_names=names,
        image_refs=[f"{image_dir}/{name}" for name in file_names],
        labels=labels,
        label_density=COCO_LABEL_DENSITY,
    )


def COCO(annotation_file: str) -> Any:  # noqa: N802 - stands in for pycocotools' class
    """pycocotools' ``COCO`` index of an instances file. pycocotools is an optional dependency
    (``pip install 'mlcil[coco]'``), imported here on first use only."""
    module = require("pycocotools.coco", extra="coco", purpose="data.dataset: coco")
    return module.COCO(annotation_file)


def _read_with_pycocotools(path: Path) -> dict[str, Any]:
    """Parse ``path`` with pycocotools, routing its progress prints to the DEBUG log."""
    captured = io.StringIO()
    gc_was_enabled = gc.isenabled()
    # Full COCO parses into millions of small dicts and lists; cyclic-GC passes triggered by those
    # allocations rescan them again and again for nothing (JSON cannot form cycles), which makes
    # parsing about 1.5-2x slower.
    gc.disable()
    try:
        with contextlib.redirect_stdout(captured):
            coco = COCO(str(path))
    except json.JSONDecodeError as error:
        raise DataError(
            f"coco: {path} is not valid JSON (line {error.lineno}, column {error.colno}: "
            f"{error.msg})"
        ) from error
    except UnicodeDecodeError as error:
        raise DataError(f"coco: {path} is not UTF-8 text: {error}") from error
    except RecursionError:
        raise DataError(
            f"coco: {path} holds arrays or objects nested too deeply to read (not a COCO "
            "instances file)"
        ) from None
    except AssertionError as error:
        # pycocotools asserts that the top-level JSON value is an object.
        raise DataError(
            f"coco: {path} does not hold a JSON object at the top level (not a COCO instances file)"
        ) from error
    except (KeyError, TypeError, AttributeError) as error:
        # pycocotools' index building failed on a malformed entry; parse again (error path only)
        # so the message can name the entry instead of a bare KeyError.
        raise _describe_malformed(path) from error
    except OSError as error:
        raise DataError(f"coco: cannot read {path}: {error}") from error
    finally:
        if gc_was_enabled:
            gc.enable()
        for line in captured.getvalue().splitlines():
            logger.debug("pycocotools: %s", line)
    return coco.dataset


def _describe_malformed(path: Path) -> DataError:
    """Build the most precise error for a file pycocotools could not index."""
    with path.open(encoding="utf-8") as handle:
        dataset = json.load(handle)
    try:
        image_ids, _ = _images(dataset, path)
        category_ids, category_classes = _categories(dataset, path, class_names("coco"))
        _label_pairs(dataset, path, image_ids, category_ids, category_classes)
    except DataError as error:
        return error
    return DataError(f"coco: {path} is not a COCO instances file (pycocotools cannot index it)")


def _section(dataset: Any, key: str, path: Path) -> list[Any]:
    value = dataset.get(key) if isinstance(dataset, dict) else None
    if not isinstance(value, list):
        raise DataError(f"coco: {path} has no list under the key {key!r} (not an instances file)")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_column(values: list[Any]) -> np.ndarray | None:
    """``values`` as an int64 array, or None when any of them is not an integer."""
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        return None
    return array.astype(np.int64, copy=False)


def _images(dataset: dict[str, Any], path: Path) -> tuple[np.ndarray, list[str]]:
    """Image ids (file order) and file names, validated."""
    images = _section(dataset, "images", path)
    try:
        ids = _int_column([image["id"] for image in images])
        file_names = [image["file_name"] for image in images]
    except (KeyError, TypeError):
        ids = None
        file_names = []
    if ids is None or not all(isinstance(name, str) and name for name in file_names):
        for position, image in enumerate(images):
            where = f"coco: {path}: images[{position}]"
            if not isinstance(image, dict):
                raise DataError(f"{where} is not a JSON object")
            if not _is_int(image.get("id")):
                raise DataError(f"{where} has no integer 'id' (got {image.get('id')!r})")
            name = image.get("file_name")
            if not isinstance(name, str) or not name:
                raise DataError(f"{where} (id {image['id']}) has no 'file_name' (got {name!r})")
        raise DataError(f"coco: {path}: malformed 'images' list")
    unique, counts = np.unique(ids, return_counts=True)
    if unique.size != ids.size:
        duplicate = int(unique[np.argmax(counts > 1)])
        raise DataError(f"coco: {path}: image id {duplicate} appears more than once in 'images'")
    return ids, file_names


def _categories(
    dataset: dict[str, Any], path: Path, names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted category ids and, aligned with them, the class index of each category's name."""
    index = {name: position for position, name in enumerate(names)}
    by_id: dict[int, int] = {}
    seen_names: dict[str, int] = {}
    for position, category in enumerate(_section(dataset, "categories", path)):
        where = f"coco: {path}: categories[{position}]"
        if not isinstance(category, dict):
            raise DataError(f"{where} is not a JSON object")
        category_id: Any = category.get("id")
        name = category.get("name")
        if not _is_int(category_id):
            raise DataError(f"{where} has no integer 'id' (got {category_id!r})")
        if not isinstance(name, str) or name not in index:
            raise DataError(
                f"coco: {path}: category {name!r} (id {category_id}) is not one of the 80 COCO "
                "2014 category names"
            )
        if category_id in by_id:
            raise DataError(f"coco: {path}: category id {category_id} is listed more than once")
        if name in seen_names:
            raise DataError(
                f"coco: {path}: category name {name!r} is listed twice (ids {seen_names[name]} "
                f"and {category_id})"
            )
        by_id[int(category_id)] = index[name]
        seen_names[name] = int(category_id)
    ids = np.array(sorted(by_id), dtype=np.int64)
    classes = np.array([by_id[int(i)] for i in ids], dtype=np.int64)
    return ids, classes


def _label_pairs(
    dataset: dict[str, Any],
    path: Path,
    image_ids: np.ndarray,
    category_ids: np.ndarray,
    category_classes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(image row, class index) of every non-crowd annotation, computed column-wise.

    Full COCO has ~600k annotations, so ids are mapped to rows and classes with sorted-array
    searches over whole columns rather than a dict lookup per annotation.
    """
    annotations = _section(dataset, "annotations", path)
    try:
        ann_images = _int_column([ann["image_id"] for ann in annotations])
        ann_categories = _int_column([ann["category_id"] for ann in annotations])
        crowd_values = [ann.get("iscrowd", 0) for ann in annotations]
    except (KeyError, TypeError, AttributeError):
        ann_images = ann_categories = None
        crowd_values = []
    crowd = np.asarray(crowd_values)
    if ann_images is None or ann_categories is None or crowd.dtype.kind not in "biu":
        raise _bad_annotation(annotations, path)
    crowd = crowd.astype(bool)

    image_order = np.argsort(image_ids, kind="stable")
    sorted_images = image_ids[image_order]
    rows = _lookup(sorted_images, ann_images)
    if (rows < 0).any():
        bad = int(np.argmax(rows < 0))
        raise DataError(
            f"coco: {path}: annotation id {_ann_id(annotations[bad])} refers to image id "
            f"{int(ann_images[bad])}, which is not in 'images'"
        )
    cols = _lookup(category_ids, ann_categories)
    if (cols < 0).any():
        bad = int(np.argmax(cols < 0))
        raise DataError(
            f"coco: {path}: annotation id {_ann_id(annotations[bad])} refers to category id "
            f"{int(ann_categories[bad])}, which is not in 'categories'"
        )
    keep = ~crowd
    return image_order[rows[keep]], category_classes[cols[keep]]


def _lookup(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Position of each query in ``sorted_keys``, or -1 where it is absent."""
    if sorted_keys.size == 0:
        return np.full(queries.shape, -1, dtype=np.int64)
    positions = np.searchsorted(sorted_keys, queries)
    clipped = np.minimum(positions, sorted_keys.size - 1)
    return np.where(sorted_keys[clipped] == queries, clipped, -1)


def _ann_id(annotation: dict[str, Any]) -> Any:
    return annotation.get("id", "<no id>")


def _bad_annotation(annotations: list[Any], path: Path) -> DataError:
    """Find the first malformed annotation (error path only) and describe it."""
    for position, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            return DataError(f"coco: {path}: annotations[{position}] is not a JSON object")
        where = f"coco: {path}: annotation id {_ann_id(ann)} (annotations[{position}])"
        for key in ("image_id", "category_id"):
            if not _is_int(ann.get(key)):
                return DataError(f"{where} has no integer {key!r} (got {ann.get(key)!r})")
        crowd = ann.get("iscrowd", 0)
        if not isinstance(crowd, int):
            return DataError(f"{where} has a non-integer 'iscrowd' {crowd!r}")
    return DataError(f"coco: {path}: malformed 'annotations' list")

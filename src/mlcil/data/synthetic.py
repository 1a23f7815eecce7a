"""Synthetic MS-COCO 2014 and PASCAL VOC 2007 trees at published scale, without the download.

``write_synthetic_coco`` and ``write_synthetic_voc`` write folders in the exact layouts that
:func:`mlcil.data.coco.load_coco` and :func:`mlcil.data.voc.load_voc` read, with JPEG images of
drawn content and annotation files in the real formats, so that the whole pipeline (loading,
session splits, training, evaluation) can run at the real datasets' size and label statistics.
What the images show (label statistics, objects, pictures) is :mod:`mlcil.data.synthetic_scenes`.

Determinism and scale
    Everything is drawn from NumPy generators seeded with ``[seed, stream]``, and each image is
    rendered from its own seed, so the same seed gives byte-identical annotation files and the
    same image bytes for any ``jobs`` (on one Pillow/libjpeg install). Annotations are planned
    as NumPy columns (a few bytes per object), the JSON files are written entry by entry and the
    images are rendered in blocks, so memory stays small at the full 82,783 + 40,504 images.
    ``jobs > 1`` renders in a multiprocessing pool; it uses the ``fork`` start method where the
    platform has it, so a plain script without an ``if __name__ == "__main__":`` guard can call
    these functions (elsewhere the pool spawns and the calling script needs the guard).

    Measured on the 2-core development machine while other work shared it: 2,000 COCO images
    at 640 x 480 took 13 s with ``jobs=1`` (about 150 images/s, 190/s for the rendering alone)
    and 9.6 s with ``jobs=2`` (about 210 images/s), 82 kB per image. Full train2014 planning
    gives about 609,000 annotations (the real file has 604,907) and 702 unannotated images; its
    175 MB instances file is written in about 10 s with a peak memory under 150 MB.

The tree is written into a hidden staging folder inside ``root`` and moved into place at the
end; a failure removes what was written. A ``root`` that exists and is not empty is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from mlcil.data.classes import COCO_CATEGORIES, class_names
from mlcil.data.synthetic_scenes import (
    COCO_TRAIN_IMAGES,
    COCO_VAL_IMAGES,
    JPEG_QUALITY,
    PALETTE,
    SHAPE_AREAS,
    SHAPE_NAMES,
    VOC_TEST_IMAGES,
    VOC_TRAINVAL_IMAGES,
    Renderer,
    SplitPlan,
    class_style,
    coco_model,
    plan_split,
    polygon,
    render_tasks,
    split_summary,
    voc_model,
)
from mlcil.errors import ConfigError, DataError, shown
from mlcil.safety import MAX_JOBS, MAX_SEED, MAX_SYNTHETIC_IMAGES, check_bounded

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Target folder and arguments


def _check_arguments(
    dataset: str, counts: dict[str, Any], seed: Any, image_size: Any, jobs: Any
) -> tuple[int, int]:
    def is_int(value: Any) -> bool:
        return isinstance(value, int | np.integer) and not isinstance(value, bool)

    def bounded(value: Any, low: int, high: int, what: str) -> None:
        if isinstance(value, np.integer) and low <= value <= high:
            value = int(value)  # a NumPy integer in range is welcome
        check_bounded(value, low, high, f"synthetic {dataset}: {what}")

    # Bounded before anything is planned or allocated (the plan takes bytes per image).
    for name, value in counts.items():
        bounded(value, 1, MAX_SYNTHETIC_IMAGES, name)
    bounded(seed, 0, MAX_SEED, "seed")
    bounded(jobs, 1, MAX_JOBS, "jobs")
    try:
        width, height = image_size
    except (TypeError, ValueError):
        width = height = None
    if not (is_int(width) and is_int(height) and 32 <= width <= 8192 and 32 <= height <= 8192):
        raise ConfigError(
            f"synthetic {dataset}: image_size must be (width, height) with both between 32 and "
            f"8192 pixels, got {shown(image_size)}"
        )
    return int(width), int(height)


@contextlib.contextmanager
def _staging(root: Path, dataset: str) -> Iterator[Path]:
    """A hidden folder inside ``root`` to write into; its entries move into ``root`` on success.

    Writing aside means an interrupted run never leaves a tree that looks complete; staging
    inside ``root`` (not next to it) keeps the final renames on one file system.
    """
    if root.exists() and not root.is_dir():
        raise DataError(f"synthetic {dataset}: target {root} exists and is not a folder")
    if root.is_dir() and (entries := sorted(p.name for p in root.iterdir())):
        raise DataError(
            f"synthetic {dataset}: target folder {root} is not empty ({len(entries)} entries, "
            f"e.g. {entries[0]!r}); refusing to write into it so that no existing data is "
            "overwritten: pass a new or empty folder"
        )
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".partial-{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
        for entry in sorted(staging.iterdir()):
            os.replace(entry, root / entry.name)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                root.rmdir()
        raise


def _json_array(out: TextIO, items: Iterable[Any]) -> None:
    """Write ``items`` as a JSON array, one entry at a time."""
    out.write("[")
    for position, item in enumerate(items):
        out.write(", " if position else "")
        out.write(json.dumps(item))
    out.write("]")


# ---------------------------------------------------------------------------------------------
# COCO 2014

_COCO_SPLITS = (
    # (summary split name = loader split, rng stream, image folder, annotation file)
    ("train", 1, "train2014", "instances_train2014.json"),
    ("test", 2, "val2014", "instances_val2014.json"),
)
# Real COCO crowd annotations have ids from 900100000000 on; the same offset keeps them apart.
_CROWD_ID_OFFSET = 900_100_000_000
_DATE = "2014-01-01 00:00:00"


def _coco_image_ids(seed: int, counts: Sequence[int]) -> list[np.ndarray]:
    """Sorted, sparse image ids per split, disjoint across splits like the real ones."""
    total = sum(counts)
    pool = max(581_929, 2 * total)  # the largest real COCO 2014 image id
    ids = np.random.default_rng([seed, 0]).choice(pool, size=total, replace=False) + 1
    bounds = np.cumsum([0, *counts])
    return [np.sort(ids[bounds[i] : bounds[i + 1]]) for i in range(len(counts))]


def _crowd_rle(box: Sequence[int], size: tuple[int, int]) -> dict[str, Any]:
    """Uncompressed RLE of a filled box: column-major runs, starting with background."""
    x, y, w, h = box
    width, height = size
    counts = [x * height + y]
    for column in range(w):
        counts += [h, height - h] if column < w - 1 else [h]
    counts.append(width * height - sum(counts))
    return {"counts": counts, "size": [height, width]}


def _coco_annotations(
    plan: SplitPlan, image_ids: np.ndarray, first_id: int
) -> Iterator[dict[str, Any]]:
    """The ``annotations`` entries of one split; ids run from ``first_id`` (crowds offset)."""
    category_of = {name: category_id for category_id, name, _ in COCO_CATEGORIES}
    category = [category_of[name] for name in class_names("coco")]
    shape = [SHAPE_NAMES.index(class_style(k)[0]) for k in range(len(category))]
    for k in range(plan.row.size):
        x, y, w, h = (int(v) for v in plan.box[k])
        cls, crowd = int(plan.cls[k]), bool(plan.flag[k])
        if crowd:
            segmentation: Any = _crowd_rle((x, y, w, h), plan.size)
            area = float(w * h)
        else:
            points = polygon(shape[cls], x, y, w, h)
            segmentation = [[round(value, 2) for point in points for value in point]]
            area = round(SHAPE_AREAS[shape[cls]] * w * h, 2)
        yield {
            "segmentation": segmentation,
            "area": area,
            "iscrowd": int(crowd),
            "image_id": int(image_ids[plan.row[k]]),
            "bbox": [float(x), float(y), float(w), float(h)],
            "category_id": category[cls],
            "id": first_id + k + (_CROWD_ID_OFFSET if crowd else 0),
        }


def _write_coco_json(
    path: Path, plan: SplitPlan, image_ids: np.ndarray, file_names: Sequence[str], first_id: int
) -> None:
    width, height = plan.size
    info = {
        "description": "Synthetic stand-in for COCO 2014 (mlcil.data.synthetic)",
        "url": "",
        "version": "1.0",
        "year": 2014,
        "contributor": "mlcil",
        "date_created": _DATE,
    }
    images = (
        {"license": 1, "file_name": name, "coco_url": "", "height": height, "width": width,
         "date_captured": _DATE, "flickr_url": "", "id": int(image_id)}
        for image_id, name in zip(image_ids, file_names, strict=True)
    )  # fmt: skip
    licenses = [{"url": "", "id": 1, "name": "Synthetic image, no copyright (mlcil)"}]
    categories = [
        {"supercategory": supercategory, "id": category_id, "name": name}
        for category_id, name, supercategory in COCO_CATEGORIES
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        out.write('{"info": ' + json.dumps(info) + ', "images": ')
        _json_array(out, images)
        out.write(', "licenses": ' + json.dumps(licenses) + ', "annotations": ')
        _json_array(out, _coco_annotations(plan, image_ids, first_id))
        out.write(', "categories": ' + json.dumps(categories) + "}")


def write_synthetic_coco(
    root: str | Path,
    train_images: int = COCO_TRAIN_IMAGES,
    val_images: int = COCO_VAL_IMAGES,
    seed: int = 0,
    image_size: tuple[int, int] = (640, 480),
    jobs: int = 1,
) -> dict[str, Any]:
    """Write a synthetic MS-COCO 2014 tree that :func:`mlcil.data.coco.load_coco` reads.

    Layout: ``annotations/instances_{train,val}2014.json`` (COCO instances format, the 80 real
    category ids, names and supercategories) and ``train2014/COCO_train2014_<id>.jpg``,
    ``val2014/COCO_val2014_<id>.jpg``. Label statistics follow the module docstring.

    Args:
        root: target folder; it must not exist or be empty.
        train_images: images of the train split (real: 82,783).
        val_images: images of the val split, the loader's ``"test"`` split (real: 40,504).
        seed: the same seed writes the same bytes.
        image_size: (width, height) of every image.
        jobs: processes encoding JPEGs.

    Returns:
        ``{"dataset", "root", "seed", "image_size", "jobs", "splits", "images",
        "labels_per_image", "person_fraction", "crowd_annotations", "megabytes", "seconds",
        "images_per_second"}``; ``splits`` maps the loader's split names ``"train"`` and
        ``"test"`` to ``{"images", "labels_per_image", "person_fraction", "unlabelled_images",
        "objects", "crowd_annotations"}``, all about the labels the loader will produce.

    Raises:
        ConfigError: a count, the seed, ``image_size`` or ``jobs`` is out of range.
        DataError: ``root`` exists and is not an empty folder.
    """
    counts = {"train_images": train_images, "val_images": val_images}
    size = _check_arguments("coco", counts, seed, image_size, jobs)
    root, start, model = Path(root), time.perf_counter(), coco_model()
    splits: dict[str, dict[str, Any]] = {}
    with _staging(root, "coco") as staging, Renderer(jobs) as renderer:
        all_ids = _coco_image_ids(seed, [train_images, val_images])
        first_id = 1
        for (split, stream, folder, json_name), ids in zip(_COCO_SPLITS, all_ids, strict=True):
            rng = np.random.default_rng([seed, stream])
            plan = plan_split(rng, ids.size, model, size)
            names = [f"COCO_{folder}_{int(image_id):012d}.jpg" for image_id in ids]
            _write_coco_json(staging / "annotations" / json_name, plan, ids, names, first_id)
            first_id += plan.row.size
            (staging / folder).mkdir()
            paths = [staging / folder / name for name in names]
            renderer.render(render_tasks(plan, paths, True), ids.size, f"coco/{folder}")
            splits[split] = split_summary(plan, model, "crowd_annotations")
    return _summary("coco", root, seed, size, jobs, splits, "crowd_annotations", start, renderer)


def _summary(
    dataset: str,
    root: Path,
    seed: int,
    size: tuple[int, int],
    jobs: int,
    splits: dict[str, dict[str, Any]],
    flag_name: str,
    start: float,
    renderer: Renderer,
) -> dict[str, Any]:
    images = sum(split["images"] for split in splits.values())

    def mean(key: str) -> float:
        return sum(split[key] * split["images"] for split in splits.values()) / images

    seconds = time.perf_counter() - start
    summary = {
        "dataset": dataset,
        "root": str(root),
        "seed": seed,
        "image_size": list(size),
        "jobs": jobs,
        "splits": splits,
        "images": images,
        "labels_per_image": mean("labels_per_image"),
        "person_fraction": mean("person_fraction"),
        flag_name: sum(split[flag_name] for split in splits.values()),
        "megabytes": renderer.bytes / 1e6,
        "seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 else float("inf"),
    }
    logger.info(
        "synthetic %s: %d images (%.2f labels/image, person in %.1f%%) written to %s in %.1f s",
        dataset,
        images,
        summary["labels_per_image"],
        100 * summary["person_fraction"],
        root,
        seconds,
    )
    return summary


# ---------------------------------------------------------------------------------------------
# PASCAL VOC 2007

_VOC_SPLITS = (("train", 1, "trainval"), ("test", 2, "test"))


def _voc_ids(seed: int, counts: Sequence[int]) -> list[list[str]]:
    """Ids ``000001`` upwards, shared out at random between the splits (as in VOC 2007, whose
    trainval and test ids interleave over 000001-009963), each split in ascending order."""
    total = sum(counts)
    owner = np.random.default_rng([seed, 0]).permutation(np.repeat(np.arange(len(counts)), counts))
    width = max(6, len(str(total)))
    return [
        [f"{number + 1:0{width}d}" for number in np.flatnonzero(owner == split)]
        for split in range(len(counts))
    ]


_VOC_XML_HEAD = """<annotation>
\t<folder>VOC2007</folder>
\t<filename>{image_id}.jpg</filename>
\t<source>
\t\t<database>The VOC2007 Database</database>
\t\t<annotation>mlcil synthetic VOC2007</annotation>
\t\t<image>synthetic</image>
\t</source>
\t<owner>
\t\t<name>mlcil</name>
\t</owner>
\t<size>
\t\t<width>{width}</width>
\t\t<height>{height}</height>
\t\t<depth>3</depth>
\t</size>
\t<segmented>0</segmented>
"""
_VOC_XML_OBJECT = """\t<object>
\t\t<name>{name}</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>{truncated}</truncated>
\t\t<difficult>{difficult}</difficult>
\t\t<bndbox>
\t\t\t<xmin>{xmin}</xmin>
\t\t\t<ymin>{ymin}</ymin>
\t\t\t<xmax>{xmax}</xmax>
\t\t\t<ymax>{ymax}</ymax>
\t\t</bndbox>
\t</object>
"""


def _write_voc_annotations(folder: Path, plan: SplitPlan, ids: Sequence[str]) -> None:
    names = class_names("voc")
    width, height = plan.size
    starts = plan.starts()
    for row, image_id in enumerate(ids):
        parts = [_VOC_XML_HEAD.format(image_id=image_id, width=width, height=height)]
        for k in range(starts[row], starts[row + 1]):
            x, y, w, h = (int(v) for v in plan.box[k])
            parts.append(
                _VOC_XML_OBJECT.format(
                    name=names[plan.cls[k]],
                    truncated=int(x == 0 or y == 0 or x + w == width or y + h == height),
                    difficult=int(plan.flag[k]),
                    # VOC boxes are 1-based and inclusive.
                    xmin=x + 1,
                    ymin=y + 1,
                    xmax=x + w,
                    ymax=y + h,
                )
            )
        parts.append("</annotation>\n")
        (folder / f"{image_id}.xml").write_text("".join(parts), encoding="utf-8")


def _voc_class_flags(plan: SplitPlan) -> np.ndarray:
    """Per image and class the devkit's flag: 1 labelled, 0 only difficult objects, -1 none."""
    flags = np.where(plan.labels, 1, -1).astype(np.int8)
    difficult = np.zeros_like(plan.labels)
    difficult[plan.row[plan.flag], plan.cls[plan.flag]] = True
    flags[difficult & ~plan.labels] = 0
    return flags


def _write_voc_image_sets(
    folder: Path, seed: int, ids: dict[str, list[str]], flags: dict[str, np.ndarray]
) -> None:
    """``trainval``/``test`` lists (what the loader reads) plus the devkit's ``train``/``val``
    halves and the per-class ``<class>_<set>.txt`` files."""
    halves = np.random.default_rng([seed, 3]).permutation(len(ids["train"])) % 2
    sets = {
        "trainval": np.arange(len(ids["train"])),
        "train": np.flatnonzero(halves == 0),
        "val": np.flatnonzero(halves == 1),
    }
    members = {name: ("train", rows) for name, rows in sets.items()}
    members["test"] = ("test", np.arange(len(ids["test"])))
    for set_name, (split, rows) in members.items():
        listed = [ids[split][row] for row in rows]
        (folder / f"{set_name}.txt").write_text("".join(f"{i}\n" for i in listed))
        for column, name in enumerate(class_names("voc")):
            lines = [
                f"{i} {int(flags[split][row, column]):2d}\n"
                for i, row in zip(listed, rows, strict=True)
            ]
            (folder / f"{name}_{set_name}.txt").write_text("".join(lines))


def write_synthetic_voc(
    root: str | Path,
    trainval_images: int = VOC_TRAINVAL_IMAGES,
    test_images: int = VOC_TEST_IMAGES,
    seed: int = 0,
    image_size: tuple[int, int] = (500, 375),
    jobs: int = 1,
) -> dict[str, Any]:
    """Write a synthetic PASCAL VOC 2007 tree that :func:`mlcil.data.voc.load_voc` reads.

    Layout below ``root`` (the trainval and test sets share one folder, as the two VOC 2007
    archives do when unpacked together)::

        VOCdevkit/VOC2007/Annotations/000001.xml ...
        VOCdevkit/VOC2007/ImageSets/Main/{trainval,train,val,test}.txt, <class>_<set>.txt
        VOCdevkit/VOC2007/JPEGImages/000001.jpg ...

    Args:
        root: target folder; it must not exist or be empty. ``load_voc(root, ...)`` finds
            ``VOCdevkit/VOC2007`` below it.
        trainval_images: images of the loader's ``"train"`` split (real: 5,011).
        test_images: images of the ``"test"`` split (real: 4,952).
        seed: the same seed writes the same bytes.
        image_size: (width, height) of every image (real VOC images are about 500 x 375).
        jobs: processes encoding JPEGs.

    Returns:
        As :func:`write_synthetic_coco`, with ``difficult_objects`` in place of
        ``crowd_annotations``.

    Raises:
        ConfigError: a count, the seed, ``image_size`` or ``jobs`` is out of range.
        DataError: ``root`` exists and is not an empty folder.
    """
    counts = {"trainval_images": trainval_images, "test_images": test_images}
    size = _check_arguments("voc", counts, seed, image_size, jobs)
    root, start, model = Path(root), time.perf_counter(), voc_model()
    splits: dict[str, dict[str, Any]] = {}
    with _staging(root, "voc") as staging, Renderer(jobs) as renderer:
        voc = staging / "VOCdevkit" / "VOC2007"
        for name in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (voc / name).mkdir(parents=True)
        all_ids = _voc_ids(seed, [trainval_images, test_images])
        ids = {
            split: split_ids for (split, _, _), split_ids in zip(_VOC_SPLITS, all_ids, strict=True)
        }
        flags: dict[str, np.ndarray] = {}
        for split, stream, set_name in _VOC_SPLITS:
            plan = plan_split(np.random.default_rng([seed, stream]), len(ids[split]), model, size)
            _write_voc_annotations(voc / "Annotations", plan, ids[split])
            flags[split] = _voc_class_flags(plan)
            paths = [voc / "JPEGImages" / f"{image_id}.jpg" for image_id in ids[split]]
            renderer.render(render_tasks(plan, paths, False), len(paths), f"voc/{set_name}")
            splits[split] = split_summary(plan, model, "difficult_objects")
        _write_voc_image_sets(voc / "ImageSets" / "Main", seed, ids, flags)
    return _summary("voc", root, seed, size, jobs, splits, "difficult_objects", start, renderer)


__all__ = [
    "COCO_TRAIN_IMAGES",
    "COCO_VAL_IMAGES",
    "JPEG_QUALITY",
    "PALETTE",
    "SHAPE_NAMES",
    "VOC_TEST_IMAGES",
    "VOC_TRAINVAL_IMAGES",
    "class_style",
    "write_synthetic_coco",
    "write_synthetic_voc",
]

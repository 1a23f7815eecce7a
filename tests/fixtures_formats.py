"""Writers of tiny, format-exact dataset trees for tests (COCO 2014, PASCAL VOC 2007, manifests).

Each ``write_*_fixture(root)`` fills ``root`` with annotation files in the dataset's real format
plus small real JPEG files, and returns a dict describing what it wrote so that tests can compare
a loader's output with the truth. In every dict, ``info["train"]`` and ``info["test"]`` map an
image ref (the path relative to the dataset root that the loader reports) to the frozenset of
class names the image must be labelled with, and ``info["sizes"]`` maps every ref to its
``(width, height)``. Treat the dicts as read-only: pytest shares them across tests.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mlcil.data.classes import COCO_CATEGORIES, VOC_CLASSES

# A few small sizes, so that a loader mixing up images would return a wrong size.
_SIZES: tuple[tuple[int, int], ...] = ((40, 32), (48, 32), (40, 36), (36, 40))


def _write_jpeg(path: Path, size: tuple[int, int], rng: np.random.Generator) -> None:
    """A noisy solid-colour RGB JPEG of ``size`` = (width, height)."""
    width, height = size
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = rng.integers(0, 256, size=3)
    noise = rng.integers(-24, 25, size=(height, width, 3))
    pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def _box(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A random box (x, y, w, h) inside an image of ``size``."""
    width, height = size
    x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    w, h = int(rng.integers(4, width - x + 1)), int(rng.integers(4, height - y + 1))
    return x, y, w, h


def _chunks(items: list[str], sizes: list[int]) -> list[list[str]]:
    out, start = [], 0
    for size in sizes:
        out.append(items[start : start + size])
        start += size
    return out


# ---------------------------------------------------------------------------------------------
# COCO 2014


class _CocoSplit:
    """Accumulates the images and annotations of one COCO instances file."""

    def __init__(self, root: Path, folder: str, rng: np.random.Generator, first_ann_id: int):
        self.root, self.folder, self.rng = root, folder, rng
        self.category_id = {name: cid for cid, name, _ in COCO_CATEGORIES}
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.expected: dict[str, frozenset[str]] = {}
        self.sizes: dict[str, tuple[int, int]] = {}
        self.next_image_id = int(rng.integers(5, 20))
        self.next_ann_id = first_ann_id

    def add(self, objects: list[tuple[str, bool]]) -> str:
        """Write one image with ``objects`` = [(category name, iscrowd)]; return its ref."""
        image_id = self.next_image_id
        # Real ids are sparse: leave random gaps.
        self.next_image_id += int(self.rng.integers(1, 40))
        size = _SIZES[len(self.images) % len(_SIZES)]
        file_name = f"COCO_{self.folder}_{image_id:012d}.jpg"
        _write_jpeg(self.root / self.folder / file_name, size, self.rng)
        self.images.append(
            {
                "license": int(self.rng.integers(1, 9)),
                "file_name": file_name,
                "coco_url": f"http://images.cocodataset.org/{self.folder}/{file_name}",
                "height": size[1],
                "width": size[0],
                "date_captured": "2013-11-14 16:28:13",
                "flickr_url": f"http://farm4.staticflickr.com/{image_id}.jpg",
                "id": image_id,
            }
        )
        for name, iscrowd in objects:
            x, y, w, h = _box(self.rng, size)
            if iscrowd:
                # Crowd regions are stored as uncompressed RLE over the whole image.
                pixels = size[0] * size[1]
                run = w * h
                before = x * size[1]
                segmentation: Any = {
                    "counts": [before, run, pixels - before - run],
                    "size": [size[1], size[0]],
                }
            else:
                segmentation = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            self.annotations.append(
                {
                    "segmentation": segmentation,
                    "area": float(w * h),
                    "iscrowd": int(iscrowd),
                    "image_id": image_id,
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "category_id": self.category_id[name],
                    "id": self.next_ann_id,
                }
            )
            self.next_ann_id += int(self.rng.integers(1, 7))
        ref = f"{self.folder}/{file_name}"
        self.expected[ref] = frozenset(name for name, iscrowd in objects if not iscrowd)
        self.sizes[ref] = size
        return ref

    def write_json(self, path: Path, year_label: str) -> None:
        categories = [
            {"supercategory": supercategory, "id": cid, "name": name}
            for cid, name, supercategory in COCO_CATEGORIES
        ]
        document = {
            "info": {
                "description": f"Tiny stand-in for COCO 2014 {year_label}",
                "url": "http://mscoco.org",
                "version": "1.0",
                "year": 2014,
                "contributor": "mlcil tests",
                "date_created": "2015-01-27 09:11:52.357475",
            },
            "images": self.images,
            "licenses": [
                {"url": f"http://creativecommons.org/licenses/{i}/2.0/", "id": i, "name": f"L{i}"}
                for i in range(1, 9)
            ],
            "annotations": self.annotations,
            "categories": categories,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document), encoding="utf-8")


def write_coco_fixture(root: Path) -> dict[str, Any]:
    """Write a tiny COCO 2014 tree: instances files, ``train2014/`` and ``val2014/`` JPEGs.

    Both instances files list all 80 categories with their real ids, in COCO's own order
    (``person`` first, ``zebra`` = id 24 at position 22). Train: 36 random images whose objects
    walk through every category, plus hand-made ones; val: 18 random images plus one with a
    person only.

    Returns:
        ``{"train", "test", "sizes"}`` as described in the module docstring, plus
        ``"special"`` (refs of the hand-made images: ``person_zebra``, ``crowd_only``,
        ``crowd_and_normal``, ``unannotated``, ``val_person``), ``"crowd_and_normal_classes"``
        (crowd name, normal name), ``"category_order"`` (names in file order) and
        ``"annotation_files"`` (split -> path).
    """
    rng = np.random.default_rng(2014)
    names = [name for _, name, _ in COCO_CATEGORIES]
    train = _CocoSplit(root, "train2014", rng, first_ann_id=1000)
    val = _CocoSplit(root, "val2014", rng, first_ann_id=500000)

    # Every category once (shuffled), then 10 random extras: 90 objects over 36 images of 2-3.
    walk = [names[i] for i in rng.permutation(len(names))]
    walk += [names[i] for i in rng.integers(0, len(names), size=10)]
    sizes = [3] * 18 + [2] * 18
    rng.shuffle(sizes)
    special: dict[str, str] = {}
    for position, chunk in enumerate(_chunks(walk, sizes)):
        train.add([(name, False) for name in chunk])
        if position == 11:
            # Hand-made images sit among the random ones, not only at the end of the file.
            special["person_zebra"] = train.add([("person", False), ("zebra", False)])
            special["crowd_only"] = train.add([("person", True)])
    special["crowd_and_normal"] = train.add([("person", True), ("kite", False), ("kite", False)])
    special["unannotated"] = train.add([])

    val_walk = [names[i] for i in rng.permutation(len(names))]
    val_sizes = [int(rng.choice([1, 2, 3, 3, 3])) for _ in range(18)]
    for chunk in _chunks(val_walk, val_sizes):
        val.add([(name, False) for name in chunk])
    special["val_person"] = val.add([("person", False)])

    files = {
        "train": root / "annotations" / "instances_train2014.json",
        "test": root / "annotations" / "instances_val2014.json",
    }
    train.write_json(files["train"], "train")
    val.write_json(files["test"], "val")
    return {
        "train": train.expected,
        "test": val.expected,
        "sizes": {**train.sizes, **val.sizes},
        "special": special,
        "crowd_and_normal_classes": ("person", "kite"),
        "category_order": names,
        "annotation_files": files,
    }


# ---------------------------------------------------------------------------------------------
# PASCAL VOC 2007

_VOC_POSES = ("Frontal", "Left", "Right", "Rear", "Unspecified")


def _voc_xml(
    image_id: str,
    size: tuple[int, int],
    objects: list[tuple[str, int | None]],
    rng: np.random.Generator,
) -> ET.ElementTree:
    """An annotation tree as in VOC2007/Annotations; difficult None = tag left out."""

    def child(parent: ET.Element, tag: str, text: object = None) -> ET.Element:
        element = ET.SubElement(parent, tag)
        if text is not None:
            element.text = str(text)
        return element

    annotation = ET.Element("annotation")
    child(annotation, "folder", "VOC2007")
    child(annotation, "filename", f"{image_id}.jpg")
    source = child(annotation, "source")
    child(source, "database", "The VOC2007 Database")
    child(source, "annotation", "PASCAL VOC2007")
    child(source, "image", "flickr")
    child(source, "flickrid", int(rng.integers(10**8, 10**9)))
    owner = child(annotation, "owner")
    child(owner, "flickrid", "mlcil")
    child(owner, "name", "mlcil tests")
    size_element = child(annotation, "size")
    child(size_element, "width", size[0])
    child(size_element, "height", size[1])
    child(size_element, "depth", 3)
    child(annotation, "segmented", 0)
    for name, difficult in objects:
        obj = child(annotation, "object")
        child(obj, "name", name)
        child(obj, "pose", _VOC_POSES[int(rng.integers(len(_VOC_POSES)))])
        child(obj, "truncated", int(rng.integers(0, 2)))
        if difficult is not None:
            child(obj, "difficult", difficult)
        x, y, w, h = _box(rng, size)
        box = child(obj, "bndbox")
        # VOC boxes are 1-based and inclusive.
        child(box, "xmin", x + 1)
        child(box, "ymin", y + 1)
        child(box, "xmax", x + w)
        child(box, "ymax", y + h)
    tree = ET.ElementTree(annotation)
    ET.indent(tree, space="\t")
    return tree


def write_voc_fixture(root: Path) -> dict[str, Any]:
    """Write a tiny VOC2007 folder at ``root`` (ImageSets/Main, Annotations, JPEGImages).

    trainval: 28 random images (1-2 objects) that together hold all 20 classes, plus hand-made
    ones; test: 13 random images plus a difficult-only one and a difficult-next-to-normal one.

    Returns:
        ``{"train", "test", "sizes"}`` as described in the module docstring (refs
        ``JPEGImages/<id>.jpg``), plus ``"ids"`` (split -> ids in file order), and ``"special"``
        (refs: ``difficult_with_normal``, ``difficult_only_train``, ``difficult_only_test``,
        ``same_class_twice``, ``no_difficult_tag``, ``difficult_with_normal_test``).
    """
    rng = np.random.default_rng(2007)
    classes = list(VOC_CLASSES)
    numbers = np.sort(rng.choice(np.arange(1, 10000), size=47, replace=False))
    id_pool = [f"{int(number):06d}" for number in rng.permutation(numbers)]

    entries: dict[str, list[tuple[str, list[tuple[str, int | None]]]]] = {"train": [], "test": []}
    special: dict[str, str] = {}

    def add(split: str, objects: list[tuple[str, int | None]]) -> str:
        image_id = id_pool.pop()
        entries[split].append((image_id, objects))
        return f"JPEGImages/{image_id}.jpg"

    # All 20 classes once plus 16 extras: 36 objects over 28 images of 1-2 (VOC has ~1.4/image).
    walk = [classes[i] for i in rng.permutation(len(classes))]
    walk += [classes[i] for i in rng.integers(0, len(classes), size=16)]
    sizes = [2] * 8 + [1] * 20
    rng.shuffle(sizes)
    for chunk in _chunks(walk, sizes):
        add("train", [(name, 0) for name in chunk])
    special["difficult_with_normal"] = add("train", [("person", 0), ("bottle", 1)])
    special["difficult_only_train"] = add("train", [("chair", 1)])
    special["same_class_twice"] = add("train", [("sheep", 0), ("sheep", 0)])
    special["no_difficult_tag"] = add("train", [("dog", None)])

    for _ in range(13):
        count = int(rng.integers(1, 3))
        add("test", [(classes[int(i)], 0) for i in rng.integers(0, len(classes), size=count)])
    special["difficult_only_test"] = add("test", [("pottedplant", 1)])
    special["difficult_with_normal_test"] = add("test", [("cat", 1), ("sofa", 0)])

    info: dict[str, Any] = {"train": {}, "test": {}, "sizes": {}, "ids": {}, "special": special}
    for split, set_name in (("train", "trainval"), ("test", "test")):
        # The real ImageSets files list ids in ascending order.
        ordered = sorted(entries[split])
        for position, (image_id, objects) in enumerate(ordered):
            size = _SIZES[position % len(_SIZES)]
            ref = f"JPEGImages/{image_id}.jpg"
            _write_jpeg(root / ref, size, rng)
            tree = _voc_xml(image_id, size, objects, rng)
            xml_path = root / "Annotations" / f"{image_id}.xml"
            xml_path.parent.mkdir(parents=True, exist_ok=True)
            tree.write(xml_path, encoding="utf-8")
            info[split][ref] = frozenset(name for name, difficult in objects if not difficult)
            info["sizes"][ref] = size
        info["ids"][split] = [image_id for image_id, _ in ordered]
        set_path = root / "ImageSets" / "Main" / f"{set_name}.txt"
        set_path.parent.mkdir(parents=True, exist_ok=True)
        set_path.write_text("".join(f"{image_id}\n" for image_id in info["ids"][split]))
    return info


# ---------------------------------------------------------------------------------------------
# Manifests

_MANIFEST_CLASS_ORDER = ("dog", "cat", "zebra", "traffic light", "car", "Bicycle")


def write_manifest_fixture(root: Path) -> dict[str, Any]:
    """Write ``images/`` JPEGs, ``train.csv``, ``test.jsonl`` and ``classes.txt`` into ``root``.

    ``classes.txt`` lists the classes in a non-sorted order (with a comment and a blank line);
    ``train.csv`` has an extra ``source`` column, a cell with spaces around the labels, a label
    repeated on one row, an empty labels cell and an image in a subfolder; ``test.jsonl`` has an
    empty label list and a repeated label.

    Returns:
        ``{"train", "test", "sizes"}`` as described in the module docstring (refs as written in
        the manifests, relative to ``root``), plus ``"class_order"`` (the class file's order),
        ``"label_names"`` (sorted union of all labels used), ``"empty_label_refs"`` and
        ``"files"`` (``"train"``, ``"test"``, ``"classes"`` -> path).
    """
    rng = np.random.default_rng(7)
    train_rows = [
        ("images/0001.jpg", "dog;cat", ["dog", "cat"]),
        ("images/0002.jpg", " car ; Bicycle ", ["car", "Bicycle"]),
        ("images/0003.jpg", "", []),
        ("images/0004.jpg", "dog;dog", ["dog"]),
        ("images/street/0005.jpg", "traffic light;car", ["traffic light", "car"]),
        ("images/0006.jpg", "zebra", ["zebra"]),
    ]
    test_rows = [
        ("images/0007.jpg", ["cat", "zebra"]),
        ("images/0008.jpg", []),
        ("images/0009.jpg", ["Bicycle", "dog", "Bicycle"]),
    ]
    info: dict[str, Any] = {"train": {}, "test": {}, "sizes": {}}
    refs = [ref for ref, _, _ in train_rows] + [ref for ref, _ in test_rows]
    for position, ref in enumerate(refs):
        size = _SIZES[position % len(_SIZES)]
        _write_jpeg(root / ref, size, rng)
        info["sizes"][ref] = size

    csv_lines = ["image,labels,source"]
    for position, (ref, cell, labels) in enumerate(train_rows):
        csv_lines.append(f"{ref},{cell},camera-{position % 2}")
        info["train"][ref] = frozenset(labels)
    files = {
        "train": root / "train.csv",
        "test": root / "test.jsonl",
        "classes": root / "classes.txt",
    }
    files["train"].write_text("\n".join(csv_lines) + "\n", encoding="utf-8")
    jsonl_lines = []
    for ref, labels in test_rows:
        jsonl_lines.append(json.dumps({"image": ref, "labels": labels}))
        info["test"][ref] = frozenset(labels)
    files["test"].write_text("\n".join(jsonl_lines) + "\n", encoding="utf-8")
    # A comment line and a blank line, which read_class_file must skip.
    class_lines = ["# classes in order of arrival", *_MANIFEST_CLASS_ORDER[:3], ""]
    class_lines += _MANIFEST_CLASS_ORDER[3:]
    files["classes"].write_text("\n".join(class_lines) + "\n", encoding="utf-8")
    used = set().union(*info["train"].values(), *info["test"].values())
    info.update(
        class_order=list(_MANIFEST_CLASS_ORDER),
        label_names=sorted(used),
        empty_label_refs=[
            ref for split in ("train", "test") for ref, labels in info[split].items() if not labels
        ],
        files=files,
    )
    return info

"""Synthetic COCO 2014 / VOC 2007 trees: read back by the real loaders, with the published label
statistics, the real formats, deterministic bytes and a refusal to write into a used folder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from mlcil.data import synthetic
from mlcil.data.base import FileImageSource
from mlcil.data.classes import COCO_CATEGORIES, class_names
from mlcil.data.coco import load_coco
from mlcil.data.synthetic import (
    PALETTE,
    class_style,
    write_synthetic_coco,
    write_synthetic_voc,
)
from mlcil.data.voc import load_voc
from mlcil.errors import ConfigError, DataError

COCO_NAMES = class_names("coco")
VOC_NAMES = class_names("voc")
SMALL = (64, 48)


@pytest.fixture(scope="module")
def coco_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("synthetic") / "coco"
    return root, write_synthetic_coco(root, 300, 120, seed=3, image_size=SMALL)


@pytest.fixture(scope="module")
def voc_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("synthetic") / "voc"
    return root, write_synthetic_voc(root, 300, 150, seed=3, image_size=SMALL)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def names_of(source: FileImageSource, row: int) -> set[str]:
    return {source.class_names[i] for i in np.flatnonzero(source.labels[row])}


def assert_summary_matches(summary: dict[str, Any], source: FileImageSource) -> None:
    """The summary describes exactly the labels the loader produced."""
    labels, person = source.labels, source.class_names.index("person")
    assert summary["images"] == len(source)
    assert summary["labels_per_image"] == pytest.approx(labels.sum(axis=1).mean())
    assert summary["person_fraction"] == pytest.approx(labels[:, person].mean())
    assert summary["unlabelled_images"] == int((labels.sum(axis=1) == 0).sum())


# ---------------------------------------------------------------------------------------------
# COCO


def test_coco_tree_loads_with_the_published_label_statistics(coco_tree):
    root, summary = coco_tree
    train, test = load_coco(root, "train"), load_coco(root, "test")
    assert train.labels.shape == (300, 80) and test.labels.shape == (120, 80)
    assert_summary_matches(summary["splits"]["train"], train)
    assert_summary_matches(summary["splits"]["test"], test)
    labels = np.concatenate([train.labels, test.labels])
    # 420 images: the mean's standard error is about 0.08, the person share's about 0.025.
    assert labels.sum(axis=1).mean() == pytest.approx(2.9, abs=0.3)
    assert labels[:, COCO_NAMES.index("person")].mean() == pytest.approx(0.54, abs=0.1)
    assert summary["labels_per_image"] == pytest.approx(labels.sum(axis=1).mean())
    # A few images without any label, as in real COCO (~0.85%).
    assert 1 <= (labels.sum(axis=1) == 0).sum() <= 10
    assert summary["images"] == 420 and summary["seconds"] > 0


def test_coco_class_frequencies_follow_coco(tmp_path):
    # Tiny images and a larger sample, so that frequency differences are far beyond noise.
    write_synthetic_coco(tmp_path / "coco", 1500, 1, seed=11, image_size=(32, 32))
    labels = load_coco(tmp_path / "coco", "train").labels
    share = dict(zip(COCO_NAMES, labels.mean(axis=0), strict=True))
    assert max(share, key=share.__getitem__) == "person"
    assert share["person"] == pytest.approx(0.54, abs=0.045)
    assert labels.sum(axis=1).mean() == pytest.approx(2.9, abs=0.15)
    # Real COCO: car, chair and dining table are each in about 10% of the images; toaster and
    # hair drier in about 0.2%.
    for common in ("car", "chair", "dining table"):
        assert share[common] > 0.05, common
    for rare in ("toaster", "hair drier"):
        assert share[rare] < 0.01, rare
    assert (labels.sum(axis=0) > 0).sum() >= 75  # a long tail, not a handful of classes


def test_coco_files_use_the_real_format_and_category_ids(coco_tree):
    root, _ = coco_tree
    documents = {
        folder: read_json(root / "annotations" / f"instances_{folder}.json")
        for folder in ("train2014", "val2014")
    }
    for folder, document in documents.items():
        assert list(document) == ["info", "images", "licenses", "annotations", "categories"]
        assert [(c["id"], c["name"], c["supercategory"]) for c in document["categories"]] == [
            *COCO_CATEGORIES
        ]
        for image in document["images"]:
            assert image["file_name"] == f"COCO_{folder}_{image['id']:012d}.jpg"
            assert (image["width"], image["height"]) == SMALL
        with Image.open(root / folder / document["images"][0]["file_name"]) as first:
            assert (first.format, first.size, first.mode) == ("JPEG", SMALL, "RGB")
        for ann in document["annotations"]:
            assert set(ann) == {"segmentation", "area", "iscrowd", "image_id", "bbox",
                                "category_id", "id"}  # fmt: skip
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and x + w <= SMALL[0] and y + h <= SMALL[1]
            assert 0 < ann["area"] <= w * h
            if not ann["iscrowd"]:
                (polygon,) = ann["segmentation"]
                xs, ys = polygon[0::2], polygon[1::2]
                assert (min(xs), min(ys), max(xs), max(ys)) == pytest.approx((x, y, x + w, y + h))
    used = {ann["category_id"] for d in documents.values() for ann in d["annotations"]}
    assert used <= {cid for cid, _, _ in COCO_CATEGORIES} and max(used) > 80  # real, gapped ids
    image_ids = [[image["id"] for image in d["images"]] for d in documents.values()]
    assert not set(image_ids[0]) & set(image_ids[1])
    ann_ids = [ann["id"] for d in documents.values() for ann in d["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)


def test_coco_labels_are_the_non_crowd_categories(coco_tree):
    root, summary = coco_tree
    document = read_json(root / "annotations" / "instances_train2014.json")
    source = load_coco(root, "train")
    name_of = {cid: name for cid, name, _ in COCO_CATEGORIES}
    normal: dict[int, set[str]] = defaultdict(set)
    crowd: dict[int, set[str]] = defaultdict(set)
    for ann in document["annotations"]:
        (crowd if ann["iscrowd"] else normal)[ann["image_id"]].add(name_of[ann["category_id"]])
    for row, image in enumerate(document["images"]):
        assert names_of(source, row) == normal.get(image["id"], set())
    # Crowds are about 1% of the annotations, and some classes appear only as a crowd.
    crowds = sum(ann["iscrowd"] for ann in document["annotations"])
    assert crowds == summary["splits"]["train"]["crowd_annotations"]
    assert 0.003 <= crowds / len(document["annotations"]) <= 0.025
    assert any(crowd[i] - normal[i] for i in crowd), "no crowd-only class"
    # Instances: a few per label (real COCO: about 7.3 annotations per image).
    assert 5 <= len(document["annotations"]) / len(document["images"]) <= 10
    unannotated = {image["id"] for image in document["images"]} - set(normal) - set(crowd)
    assert unannotated


def test_coco_crowd_regions_decode_to_their_box(coco_tree):
    root, _ = coco_tree
    document = read_json(root / "annotations" / "instances_val2014.json")
    crowds = [ann for ann in document["annotations"] if ann["iscrowd"]]
    assert crowds
    for ann in crowds:
        rle = mask_utils.frPyObjects(ann["segmentation"], SMALL[1], SMALL[0])
        assert float(mask_utils.area(rle)) == ann["area"]
        assert mask_utils.toBbox(rle).tolist() == ann["bbox"]


def test_default_size_images_draw_each_class_in_its_style(tmp_path):
    root = tmp_path / "coco"
    write_synthetic_coco(root, 6, 1, seed=5)
    document = read_json(root / "annotations" / "instances_train2014.json")
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in document["annotations"]:
        by_image[ann["image_id"]].append(ann)
    class_of = {cid: COCO_NAMES.index(name) for cid, name, _ in COCO_CATEGORIES}
    checked = set()
    for image in document["images"]:
        assert (image["width"], image["height"]) == (640, 480)
        with Image.open(root / "train2014" / image["file_name"]) as opened:
            assert (opened.format, opened.size) == ("JPEG", (640, 480))
            pixels = np.asarray(opened.convert("RGB"), dtype=np.float64)
        # Objects are drawn largest first; check the centre of those nothing covers later.
        anns = sorted(by_image[image["id"]], key=lambda a: -a["bbox"][2] * a["bbox"][3])
        for position, ann in enumerate(anns):
            x, y, w, h = ann["bbox"]
            cx, cy = int(x + w / 2), int(y + h / 2)
            later = [a["bbox"] for a in anns[position + 1 :]]
            covered = any(
                bx - 3 <= cx <= bx + bw + 3 and by - 3 <= cy <= by + bh + 3
                for bx, by, bw, bh in later
            )
            if ann["iscrowd"] or covered or min(w, h) < 24:
                continue
            seen = pixels[cy - 2 : cy + 3, cx - 2 : cx + 3].reshape(-1, 3).mean(axis=0)
            nearest = PALETTE[int(np.argmin(np.linalg.norm(np.array(PALETTE) - seen, axis=1)))]
            assert nearest == class_style(class_of[ann["category_id"]])[1], ann
            checked.add(ann["id"])
    assert len(checked) >= 5


def test_class_styles_are_distinct():
    assert len({class_style(k) for k in range(80)}) == 80
    assert len({class_style(k)[1] for k in range(20)}) == len(PALETTE)


# ---------------------------------------------------------------------------------------------
# VOC


def voc_objects(root: Path, image_id: str) -> list[tuple[str, bool]]:
    tree = ET.parse(root / "VOCdevkit" / "VOC2007" / "Annotations" / f"{image_id}.xml")
    return [
        (obj.findtext("name") or "", obj.findtext("difficult") == "1")
        for obj in tree.getroot().iter("object")
    ]


def test_voc_tree_loads_with_the_published_label_statistics(voc_tree):
    root, summary = voc_tree
    train, test = load_voc(root, "train"), load_voc(root, "test")
    assert train.root == root / "VOCdevkit" / "VOC2007"
    assert train.labels.shape == (300, 20) and test.labels.shape == (150, 20)
    assert_summary_matches(summary["splits"]["train"], train)
    assert_summary_matches(summary["splits"]["test"], test)
    labels = np.concatenate([train.labels, test.labels])
    # 450 images: standard errors about 0.03 (mean) and 0.023 (person share).
    assert labels.sum(axis=1).mean() == pytest.approx(1.45, abs=0.15)
    assert labels[:, VOC_NAMES.index("person")].mean() == pytest.approx(0.40, abs=0.1)
    with Image.open(train.root / train.image_refs[0]) as first:
        assert (first.format, first.size) == ("JPEG", SMALL)


def test_voc_difficult_objects_give_no_label(voc_tree):
    root, summary = voc_tree
    objects = difficult = 0
    difficult_only_rows = 0
    for split in ("train", "test"):
        source = load_voc(root, split)
        for row, ref in enumerate(source.image_refs):
            found = voc_objects(root, Path(ref).stem)
            assert found, ref  # every VOC image has an object
            assert names_of(source, row) == {name for name, hard in found if not hard}
            objects += len(found)
            difficult += sum(hard for _, hard in found)
            difficult_only_rows += all(hard for _, hard in found)
    assert difficult == summary["difficult_objects"]
    assert 0.05 <= difficult / objects <= 0.16
    assert difficult_only_rows >= 1


def test_voc_image_sets_follow_the_devkit(voc_tree):
    root, _ = voc_tree
    main = root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    sets = {name: main.joinpath(f"{name}.txt").read_text().split() for name in
            ("trainval", "train", "val", "test")}  # fmt: skip
    assert sets["trainval"] == sorted(sets["trainval"]) and len(sets["trainval"]) == 300
    assert sorted(sets["train"] + sets["val"]) == sets["trainval"]
    assert not set(sets["trainval"]) & set(sets["test"])
    # Ids run from 000001 over both sets together, as in VOC 2007.
    assert sorted(sets["trainval"] + sets["test"]) == [f"{i:06d}" for i in range(1, 451)]
    source = load_voc(root, "test")
    for column, name in enumerate(VOC_NAMES):
        rows = [line.split() for line in main.joinpath(f"{name}_test.txt").read_text().splitlines()]
        assert [image_id for image_id, _ in rows] == sets["test"]
        for (image_id, flag), labelled in zip(rows, source.labels[:, column], strict=True):
            present = {n for n, _ in voc_objects(root, image_id)}
            assert flag == ("1" if labelled else "0" if name in present else "-1")


# ---------------------------------------------------------------------------------------------
# Determinism, refusal, arguments, pool


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_writes_the_same_bytes_with_any_jobs(tmp_path):
    one = write_synthetic_voc(tmp_path / "a", 40, 20, seed=9, image_size=SMALL, jobs=1)
    two = write_synthetic_voc(tmp_path / "b", 40, 20, seed=9, image_size=SMALL, jobs=2)
    assert one["splits"] == two["splits"]
    first, second = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert len(first) > 60 + 60 and first == second
    write_synthetic_coco(tmp_path / "c", 60, 20, seed=9, image_size=SMALL, jobs=2)
    write_synthetic_coco(tmp_path / "d", 60, 20, seed=9, image_size=SMALL, jobs=1)
    write_synthetic_coco(tmp_path / "e", 60, 20, seed=10, image_size=SMALL, jobs=1)
    assert tree_bytes(tmp_path / "c") == tree_bytes(tmp_path / "d")
    json_path = Path("annotations") / "instances_train2014.json"
    assert (tmp_path / "d" / json_path).read_bytes() != (tmp_path / "e" / json_path).read_bytes()


@pytest.mark.parametrize("writer", [write_synthetic_coco, write_synthetic_voc])
def test_refuses_a_folder_that_is_not_empty(tmp_path, writer):
    root = tmp_path / "data"
    root.mkdir()
    (root / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match=r"not empty.*'keep\.txt'") as caught:
        writer(root, 5, 5, image_size=SMALL)
    assert str(root) in str(caught.value)
    assert [p.name for p in root.iterdir()] == ["keep.txt"]
    assert (root / "keep.txt").read_text() == "user data"
    with pytest.raises(DataError, match="not a folder"):
        writer(root / "keep.txt", 5, 5, image_size=SMALL)


def test_writes_into_an_existing_empty_folder(tmp_path):
    write_synthetic_voc(tmp_path, 3, 2, image_size=SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VOCdevkit"]
    assert len(load_voc(tmp_path, "test")) == 2


def test_a_failure_leaves_no_partial_tree(tmp_path, monkeypatch):
    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "_write_voc_image_sets", fail)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_voc(tmp_path / "new", 5, 5, image_size=SMALL)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_voc(tmp_path / "empty", 5, 5, image_size=SMALL)
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "fault"),
    [
        ({"train_images": 0}, "train_images"),
        ({"val_images": 2.5}, "val_images"),
        ({"image_size": (16, 480)}, r"image_size.*\(16, 480\)"),
        ({"jobs": 0}, "jobs"),
        ({"seed": -1}, "seed"),
    ],
)
def test_rejects_bad_arguments(tmp_path, kwargs, fault):
    arguments = {"train_images": 5, "val_images": 5, **kwargs}
    with pytest.raises(ConfigError, match=fault):
        write_synthetic_coco(tmp_path / "coco", **arguments)
    assert not (tmp_path / "coco").exists()


def test_the_pool_works_from_a_script_without_a_main_guard(tmp_path):
    script = tmp_path / "make.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from mlcil.data.synthetic import write_synthetic_voc
            summary = write_synthetic_voc({str(tmp_path / "voc")!r}, 12, 6, image_size=(48, 32),
                                          jobs=2)
            print(summary["images"])
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["18"]
    assert len(load_voc(tmp_path / "voc", "train")) == 12

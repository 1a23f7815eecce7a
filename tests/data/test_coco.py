"""load_coco on a tiny tree in the real COCO 2014 instances format."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlcil.data.base import FileImageSource
from mlcil.data.classes import class_names
from mlcil.data.coco import load_coco
from mlcil.errors import DataError

NAMES = class_names("coco")


def label_sets(source: FileImageSource) -> dict[str, frozenset[str]]:
    return {
        ref: frozenset(source.class_names[i] for i in np.flatnonzero(row))
        for ref, row in zip(source.image_refs, source.labels, strict=True)
    }


def copy_with_json(
    tmp_path: Path, root: Path, mutate: Callable[[dict[str, Any]], None], split: str = "train"
) -> tuple[Path, Path]:
    """Copy the fixture tree and rewrite one instances file through ``mutate``."""
    copy = tmp_path / "coco"
    shutil.copytree(root, copy)
    name = "instances_train2014.json" if split == "train" else "instances_val2014.json"
    path = copy / "annotations" / name
    document = json.loads(path.read_text(encoding="utf-8"))
    mutate(document)
    path.write_text(json.dumps(document), encoding="utf-8")
    return copy, path


def test_class_index_follows_the_name_not_the_file_order(coco_fixture):
    root, info = coco_fixture
    document = json.loads(info["annotation_files"]["train"].read_text(encoding="utf-8"))
    listed = [category["name"] for category in document["categories"]]
    # The file lists person first and zebra far later, with COCO's real ids...
    assert len(listed) == 80
    assert listed.index("person") == 0
    assert listed.index("zebra") == 22
    ids = {category["name"]: category["id"] for category in document["categories"]}
    assert (ids["person"], ids["zebra"]) == (1, 24)
    # ...yet the class index is the name's alphabetical rank.
    source = load_coco(root, "train")
    assert source.class_names == NAMES
    assert (source.class_names.index("person"), source.class_names.index("zebra")) == (49, 79)
    row = source.labels[source.image_refs.index(info["special"]["person_zebra"])]
    assert np.flatnonzero(row).tolist() == [49, 79]


@pytest.mark.parametrize("split", ["train", "test"])
def test_label_matrix_equals_the_written_labels(coco_fixture, split):
    root, info = coco_fixture
    source = load_coco(root, split)
    assert source.dataset == "coco"
    assert source.split == split
    assert source.labels.dtype == np.uint8
    assert source.labels.shape == (len(info[split]), 80)
    assert set(np.unique(source.labels)) <= {0, 1}
    assert label_sets(source) == info[split]
    assert source.label_density == pytest.approx(2.9 / 80)


def test_every_class_has_a_train_image(coco_fixture):
    root, _ = coco_fixture
    assert (load_coco(root, "train").labels.sum(axis=0) > 0).all()


def test_crowd_annotations_give_no_label(coco_fixture):
    root, info = coco_fixture
    source = load_coco(root, "train")
    special = info["special"]
    crowd_only = source.labels[source.image_refs.index(special["crowd_only"])]
    assert not crowd_only.any()
    crowd_name, normal_name = info["crowd_and_normal_classes"]
    mixed = source.labels[source.image_refs.index(special["crowd_and_normal"])]
    assert np.flatnonzero(mixed).tolist() == [NAMES.index(normal_name)]
    assert mixed[NAMES.index(crowd_name)] == 0
    # An image without any annotation stays in the source with an all-zero row.
    assert not source.labels[source.image_refs.index(special["unannotated"])].any()


def test_images_resolve_and_decode(coco_fixture):
    root, info = coco_fixture
    for split, folder in (("train", "train2014"), ("test", "val2014")):
        source = load_coco(root, split)
        for index, ref in enumerate(source.image_refs):
            assert ref.startswith(f"{folder}/COCO_{folder}_")
            assert source.image_path(index) == root / ref
            assert source.image_path(index).is_file()
            image = source.load_image(index)
            assert image.mode == "RGB"
            assert image.size == info["sizes"][ref]


def test_val_split_reads_val2014(coco_fixture):
    root, info = coco_fixture
    source = load_coco(root, "test")
    assert all(ref.startswith("val2014/") for ref in source.image_refs)
    row = source.labels[source.image_refs.index(info["special"]["val_person"])]
    assert np.flatnonzero(row).tolist() == [NAMES.index("person")]
    assert set(source.image_refs).isdisjoint(load_coco(root, "train").image_refs)


def test_shuffled_categories_give_the_same_matrix(coco_fixture, tmp_path):
    root, _ = coco_fixture

    def shuffle(document: dict[str, Any]) -> None:
        before = [category["name"] for category in document["categories"]]
        random.Random(3).shuffle(document["categories"])
        assert [category["name"] for category in document["categories"]] != before

    copy, _ = copy_with_json(tmp_path, root, shuffle)
    original, shuffled = load_coco(root, "train"), load_coco(copy, "train")
    assert shuffled.image_refs == original.image_refs
    np.testing.assert_array_equal(shuffled.labels, original.labels)


def test_pycocotools_output_goes_to_the_debug_log(coco_fixture, capsys, caplog):
    root, _ = coco_fixture
    with caplog.at_level(logging.DEBUG, logger="mlcil.data.coco"):
        load_coco(root, "train")
    assert capsys.readouterr().out == ""
    assert any("pycocotools" in record.getMessage() for record in caplog.records)


def test_unknown_category_name_is_named(coco_fixture, tmp_path):
    root, _ = coco_fixture

    def rename(document: dict[str, Any]) -> None:
        document["categories"][5]["name"] = "hovercraft"

    _, path = copy_with_json(tmp_path, root, rename)
    with pytest.raises(DataError, match="'hovercraft'") as caught:
        load_coco(path.parent.parent, "train")
    assert str(path) in str(caught.value)


def test_missing_annotation_file_names_the_path_and_layout(coco_fixture, tmp_path):
    root, _ = coco_fixture
    copy = tmp_path / "coco"
    shutil.copytree(root, copy)
    missing = copy / "annotations" / "instances_val2014.json"
    missing.unlink()
    with pytest.raises(DataError, match=re.escape(str(missing))) as caught:
        load_coco(copy, "test")
    assert "<root>/annotations/instances_val2014.json" in str(caught.value)
    # The train split is unaffected.
    assert len(load_coco(copy, "train")) > 0


def test_missing_root_names_the_path_and_layout(tmp_path):
    absent = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(str(absent))) as caught:
        load_coco(absent, "train")
    message = str(caught.value)
    assert "<root>/annotations/instances_train2014.json" in message
    assert "<root>/train2014/" in message


def test_unknown_split_is_rejected(coco_fixture):
    root, _ = coco_fixture
    with pytest.raises(DataError, match="'val'"):
        load_coco(root, "val")


def test_annotation_with_unknown_image_id_is_named(coco_fixture, tmp_path):
    root, _ = coco_fixture

    def orphan(document: dict[str, Any]) -> None:
        document["annotations"][4]["image_id"] = 987654321
        document["annotations"][4]["id"] = 424242

    _, path = copy_with_json(tmp_path, root, orphan)
    with pytest.raises(DataError, match=r"annotation id 424242.*image id 987654321") as caught:
        load_coco(path.parent.parent, "train")
    assert str(path) in str(caught.value)


def test_annotation_with_unknown_category_id_is_named(coco_fixture, tmp_path):
    root, _ = coco_fixture

    def orphan(document: dict[str, Any]) -> None:
        # 12 is one of the gaps in COCO's category ids.
        document["annotations"][2]["category_id"] = 12
        document["annotations"][2]["id"] = 777

    _, path = copy_with_json(tmp_path, root, orphan, split="test")
    with pytest.raises(DataError, match=r"annotation id 777.*category id 12"):
        load_coco(path.parent.parent, "test")


def test_annotation_without_image_id_is_named(coco_fixture, tmp_path):
    root, _ = coco_fixture

    def drop(document: dict[str, Any]) -> None:
        del document["annotations"][3]["image_id"]
        document["annotations"][3]["id"] = 31337

    _, path = copy_with_json(tmp_path, root, drop)
    with pytest.raises(DataError, match=r"annotation id 31337.*'image_id'"):
        load_coco(path.parent.parent, "train")


def test_invalid_json_names_the_file(coco_fixture, tmp_path):
    root, _ = coco_fixture
    copy = tmp_path / "coco"
    shutil.copytree(root, copy)
    path = copy / "annotations" / "instances_train2014.json"
    path.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*not valid JSON"):
        load_coco(copy, "train")

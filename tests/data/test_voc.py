"""load_voc on a tiny tree in the real PASCAL VOC 2007 format."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlcil.data.base import FileImageSource
from mlcil.data.classes import VOC_CLASSES
from mlcil.data.voc import load_voc
from mlcil.errors import DataError

NAMES = sorted(VOC_CLASSES)


def label_sets(source: FileImageSource) -> dict[str, frozenset[str]]:
    return {
        ref: frozenset(source.class_names[i] for i in np.flatnonzero(row))
        for ref, row in zip(source.image_refs, source.labels, strict=True)
    }


def copy_tree(root: Path, destination: Path) -> Path:
    shutil.copytree(root, destination)
    return destination


def row_of(source: FileImageSource, ref: str) -> np.ndarray:
    return source.labels[source.image_refs.index(ref)]


@pytest.mark.parametrize("split", ["train", "test"])
def test_label_matrix_equals_the_written_labels(voc_fixture, split):
    root, info = voc_fixture
    source = load_voc(root, split)
    assert (source.dataset, source.split) == ("voc", split)
    assert source.labels.dtype == np.uint8
    assert source.labels.shape == (len(info[split]), 20)
    assert set(np.unique(source.labels)) <= {0, 1}
    assert label_sets(source) == info[split]
    assert source.label_density == pytest.approx(1.4 / 20)


def test_class_indices_are_alphabetical(voc_fixture):
    root, info = voc_fixture
    source = load_voc(root, "train")
    assert source.class_names == NAMES
    assert source.class_names[0] == "aeroplane"
    assert source.class_names[14] == "person"
    assert source.class_names[19] == "tvmonitor"
    # VOC_CLASSES happens to be alphabetical already; the loader's order must not depend on that.
    row = row_of(source, info["special"]["difficult_with_normal"])
    assert np.flatnonzero(row).tolist() == [14]
    assert (source.labels.sum(axis=0) > 0).all()


def test_difficult_objects_give_no_label(voc_fixture):
    root, info = voc_fixture
    special = info["special"]
    train, test = load_voc(root, "train"), load_voc(root, "test")
    assert np.flatnonzero(row_of(train, special["difficult_with_normal"])).tolist() == [
        NAMES.index("person")
    ]
    assert np.flatnonzero(row_of(test, special["difficult_with_normal_test"])).tolist() == [
        NAMES.index("sofa")
    ]
    assert not row_of(train, special["difficult_only_train"]).any()
    assert not row_of(test, special["difficult_only_test"]).any()


def test_repeated_class_and_missing_difficult_tag(voc_fixture):
    root, info = voc_fixture
    special = info["special"]
    xml = (root / "Annotations" / f"{Path(special['no_difficult_tag']).stem}.xml").read_text()
    assert "<difficult>" not in xml
    source = load_voc(root, "train")
    assert np.flatnonzero(row_of(source, special["no_difficult_tag"])).tolist() == [
        NAMES.index("dog")
    ]
    twice = row_of(source, special["same_class_twice"])
    assert twice.tolist() == [int(name == "sheep") for name in NAMES]


@pytest.mark.parametrize(("split", "set_name"), [("train", "trainval"), ("test", "test")])
def test_split_reads_its_image_set_file(voc_fixture, split, set_name):
    root, info = voc_fixture
    ids = (root / "ImageSets" / "Main" / f"{set_name}.txt").read_text().split()
    source = load_voc(root, split)
    assert source.image_refs == [f"JPEGImages/{image_id}.jpg" for image_id in ids]
    assert ids == info["ids"][split]


def test_images_resolve_and_decode(voc_fixture):
    root, info = voc_fixture
    source = load_voc(root, "test")
    for index, ref in enumerate(source.image_refs):
        image = source.load_image(index)
        assert image.mode == "RGB"
        assert image.size == info["sizes"][ref]


def test_vocdevkit_nesting_is_resolved(voc_fixture, tmp_path):
    root, info = voc_fixture
    nested = copy_tree(root, tmp_path / "VOCdevkit" / "VOC2007")
    source = load_voc(tmp_path, "train")
    assert source.root == nested
    assert label_sets(source) == info["train"]
    assert source.load_image(0).size == info["sizes"][source.image_refs[0]]


def test_blank_lines_in_the_image_set_are_ignored(voc_fixture, tmp_path):
    root, info = voc_fixture
    copy = copy_tree(root, tmp_path / "voc")
    ids = info["ids"]["test"]
    lines = ["", *ids[:3], "  ", *ids[3:], "", ""]
    (copy / "ImageSets" / "Main" / "test.txt").write_text("\n".join(lines))
    source = load_voc(copy, "test")
    assert source.image_refs == [f"JPEGImages/{image_id}.jpg" for image_id in ids]


def test_unknown_class_name_names_the_xml_file(voc_fixture, tmp_path):
    root, info = voc_fixture
    copy = copy_tree(root, tmp_path / "voc")
    xml_path = copy / "Annotations" / f"{info['ids']['train'][5]}.xml"
    text = xml_path.read_text()
    xml_path.write_text(re.sub(r"<name>[a-z]+</name>", "<name>unicorn</name>", text, count=1))
    with pytest.raises(DataError, match=re.escape(str(xml_path)) + ".*'unicorn'"):
        load_voc(copy, "train")


def test_missing_xml_names_the_path(voc_fixture, tmp_path):
    root, info = voc_fixture
    copy = copy_tree(root, tmp_path / "voc")
    xml_path = copy / "Annotations" / f"{info['ids']['test'][0]}.xml"
    xml_path.unlink()
    with pytest.raises(DataError, match=re.escape(str(xml_path))):
        load_voc(copy, "test")


def test_malformed_xml_names_the_file(voc_fixture, tmp_path):
    root, info = voc_fixture
    copy = copy_tree(root, tmp_path / "voc")
    xml_path = copy / "Annotations" / f"{info['ids']['train'][-1]}.xml"
    xml_path.write_text(xml_path.read_text()[:-40])
    with pytest.raises(DataError, match="malformed XML in " + re.escape(str(xml_path))):
        load_voc(copy, "train")


def test_missing_root_and_missing_image_set(voc_fixture, tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "absent"))):
        load_voc(tmp_path / "absent", "train")
    root, _ = voc_fixture
    copy = copy_tree(root, tmp_path / "voc")
    set_path = copy / "ImageSets" / "Main" / "trainval.txt"
    set_path.unlink()
    with pytest.raises(DataError, match=re.escape(str(set_path))):
        load_voc(copy, "train")

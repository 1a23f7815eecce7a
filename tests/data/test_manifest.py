"""Manifests (.csv / .jsonl) and class files for users' own data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlcil.data.base import FileImageSource
from mlcil.data.manifest import (
    ManifestRow,
    infer_class_names,
    load_manifest,
    new_labels_in_order,
    read_class_file,
    read_manifest_rows,
)
from mlcil.errors import DataError


def label_sets(source: FileImageSource) -> dict[str, frozenset[str]]:
    return {
        ref: frozenset(source.class_names[i] for i in np.flatnonzero(row))
        for ref, row in zip(source.image_refs, source.labels, strict=True)
    }


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (200, 10, 10)).save(path)
    return path


def where(path: Path, line: int) -> str:
    """The 'file, line N' prefix the error messages use, as a regex."""
    return re.escape(f"{path}, line {line}:")


@pytest.mark.parametrize("split", ["train", "test"])
def test_csv_and_jsonl_load(manifest_fixture, split):
    root, info = manifest_fixture
    classes = read_class_file(info["files"]["classes"])
    source = load_manifest(info["files"][split], split, classes)
    assert (source.dataset, source.split) == ("manifest", split)
    assert source.label_density is None
    assert source.root == root
    assert source.image_refs == list(info[split])
    assert label_sets(source) == info[split]
    for index, ref in enumerate(source.image_refs):
        image = source.load_image(index)
        assert image.mode == "RGB"
        assert image.size == info["sizes"][ref]


def test_class_file_order_is_the_class_order(manifest_fixture):
    _, info = manifest_fixture
    classes = read_class_file(info["files"]["classes"])
    assert classes == info["class_order"]
    assert classes != sorted(classes)
    source = load_manifest(info["files"]["train"], "train", classes)
    assert source.class_names == classes
    # "dog" is first in the class file (index 0) though it sorts fourth.
    row = source.labels[source.image_refs.index("images/0004.jpg")]
    assert np.flatnonzero(row).tolist() == [0]


def test_inferred_classes_are_sorted_by_code_point(manifest_fixture):
    _, info = manifest_fixture
    inferred = infer_class_names([info["files"]["train"], info["files"]["test"]])
    assert inferred == info["label_names"]
    assert inferred[0] == "Bicycle"  # upper case sorts before lower case
    assert inferred == sorted(inferred)
    assert infer_class_names(info["files"]["test"]) == ["Bicycle", "cat", "dog", "zebra"]


def test_empty_label_cell_and_empty_list_give_all_zero_rows(manifest_fixture):
    _, info = manifest_fixture
    classes = read_class_file(info["files"]["classes"])
    empty = set(info["empty_label_refs"])
    assert len(empty) == 2
    for split in ("train", "test"):
        source = load_manifest(info["files"][split], split, classes)
        for ref, row in zip(source.image_refs, source.labels, strict=True):
            assert (not row.any()) == (ref in empty)


def test_class_file_duplicate_names_the_line(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# header\ncat\n\ndog\n  cat  \n")
    with pytest.raises(DataError, match=where(path, 5) + ".*'cat'.*line 2"):
        read_class_file(path)


def test_missing_files_name_the_path(tmp_path):
    for call in (
        lambda p: read_class_file(p),
        lambda p: load_manifest(p, "train", ["a"]),
        lambda p: infer_class_names([p]),
    ):
        path = tmp_path / "absent.csv"
        with pytest.raises(DataError, match=re.escape(str(path))):
            call(path)


def test_unknown_label_names_file_and_line(tmp_path):
    write_image(tmp_path / "a.jpg")
    path = tmp_path / "bad.csv"
    path.write_text("image,labels\na.jpg,cat\n\na.jpg,cat;horse\n")
    with pytest.raises(DataError, match=where(path, 4) + ".*'horse'"):
        load_manifest(path, "train", ["cat", "dog"])


def test_missing_image_names_file_line_and_count(tmp_path):
    write_image(tmp_path / "a.jpg")
    path = tmp_path / "m.jsonl"
    rows = [("a.jpg", []), ("gone1.jpg", ["cat"]), ("a.jpg", []), ("gone2.jpg", [])]
    path.write_text(
        "".join(json.dumps({"image": image, "labels": labels}) + "\n" for image, labels in rows)
    )
    with pytest.raises(DataError, match=where(path, 2) + ".*gone1.jpg") as caught:
        load_manifest(path, "test", ["cat"])
    assert "2 of 4 images missing" in str(caught.value)


def test_malformed_json_line_is_named(tmp_path):
    write_image(tmp_path / "a.jpg")
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a.jpg", "labels": []}\n\n{"image": "a.jpg", "labels": [}\n')
    with pytest.raises(DataError, match=where(path, 3) + " malformed JSON"):
        load_manifest(path, "train", ["cat"])


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('{"image": "a.jpg", "labels": []}\n{"labels": ["cat"]}\n', 2, "missing key 'image'"),
        ('{"image": "  ", "labels": []}\n', 1, "empty image path"),
        ('{"image": "a.jpg"}\n', 1, "missing key 'labels'"),
        ('{"image": "a.jpg", "labels": "cat"}\n', 1, "list of strings"),
        ('["a.jpg", ["cat"]]\n', 1, "JSON object"),
    ],
)
def test_jsonl_entry_errors_name_the_line(tmp_path, text, line, message):
    write_image(tmp_path / "a.jpg")
    path = tmp_path / "m.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=where(path, line) + ".*" + re.escape(message)):
        load_manifest(path, "train", ["cat"])


def test_csv_header_and_cell_errors_name_the_line(tmp_path):
    write_image(tmp_path / "a.jpg")
    path = tmp_path / "m.csv"
    path.write_text("image,label\na.jpg,cat\n")
    with pytest.raises(DataError, match=where(path, 1) + ".*'labels'"):
        load_manifest(path, "train", ["cat"])
    path.write_text("image,labels\na.jpg,cat\n ,cat\n")
    with pytest.raises(DataError, match=where(path, 3) + " empty image path"):
        load_manifest(path, "train", ["cat"])


def test_repeated_labels_on_a_row_are_merged(tmp_path):
    write_image(tmp_path / "a.jpg")
    path = tmp_path / "m.csv"
    path.write_text('labels,image\n"dog; cat ;dog;",a.jpg\n')
    source = load_manifest(path, "train", ["cat", "dog"])
    assert source.labels.tolist() == [[1, 1]]


def test_relative_paths_resolve_against_root_or_manifest_folder(tmp_path):
    write_image(tmp_path / "data" / "pics" / "a.jpg")
    outside = write_image(tmp_path / "elsewhere" / "b.jpg")
    lists = tmp_path / "data" / "lists"
    lists.mkdir()
    manifest = lists / "train.csv"
    manifest.write_text(f"image,labels\npics/a.jpg,cat\n{outside},dog\n")

    source = load_manifest(manifest, "train", ["cat", "dog"], root=tmp_path / "data")
    assert source.root == tmp_path / "data"
    assert source.image_path(0) == tmp_path / "data" / "pics" / "a.jpg"
    # An absolute path is kept as it is.
    assert source.image_path(1) == outside
    assert source.load_image(1).size == (8, 6)

    # Without root, "pics/a.jpg" is looked up next to the manifest, where it is not.
    with pytest.raises(DataError, match=where(manifest, 2) + ".*" + re.escape(str(lists))):
        load_manifest(manifest, "train", ["cat", "dog"])
    (lists / "pics").mkdir()
    write_image(lists / "pics" / "a.jpg")
    assert load_manifest(manifest, "train", ["cat", "dog"]).image_path(0).parent == lists / "pics"


def test_unknown_extension_is_rejected(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("image,labels\n")
    with pytest.raises(DataError, match=r"\.csv or \.jsonl"):
        load_manifest(path, "train", ["cat"])


def test_same_image_twice_with_same_labels_names_both_lines(tmp_path):
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "b.jpg")
    path = tmp_path / "m.csv"
    path.write_text("image,labels\na.jpg,cat;dog\nb.jpg,cat\n\n./a.jpg,dog;cat\n")
    with pytest.raises(DataError, match=where(path, 5) + ".*already listed on line 2") as caught:
        load_manifest(path, "train", ["cat", "dog"])
    message = str(caught.value)
    assert "same labels" in message and "conflicting" not in message
    # "./a.jpg" is the same file as "a.jpg": the message shows how line 2 wrote it.
    assert "as 'a.jpg'" in message


def test_same_image_with_different_labels_is_a_conflict(tmp_path):
    write_image(tmp_path / "a.jpg")
    path = tmp_path / "m.jsonl"
    rows = [("a.jpg", ["cat"]), ("a.jpg", ["dog"]), ("a.jpg", ["cat"])]
    path.write_text(
        "".join(json.dumps({"image": image, "labels": labels}) + "\n" for image, labels in rows)
    )
    with pytest.raises(DataError, match=where(path, 2) + ".*line 1.*conflicting labels") as caught:
        load_manifest(path, "test", ["cat", "dog"])
    message = str(caught.value)
    assert "['cat'] (line 1)" in message and "['dog'] (line 2)" in message
    assert "2 repeated rows in all" in message


def test_absolute_and_relative_paths_to_one_file_are_duplicates(tmp_path):
    image = write_image(tmp_path / "pics" / "a.jpg")
    path = tmp_path / "m.csv"
    path.write_text(f"image,labels\npics/a.jpg,cat\n{image},cat\n")
    with pytest.raises(DataError, match=where(path, 3) + ".*already listed on line 2"):
        load_manifest(path, "train", ["cat"])


def test_same_name_in_different_folders_is_not_a_duplicate(tmp_path):
    write_image(tmp_path / "x" / "a.jpg")
    write_image(tmp_path / "y" / "a.jpg")
    path = tmp_path / "m.csv"
    path.write_text("image,labels\nx/a.jpg,cat\ny/a.jpg,cat\n")
    assert load_manifest(path, "train", ["cat"]).image_refs == ["x/a.jpg", "y/a.jpg"]


@pytest.mark.parametrize("ref", ["../outside.png", "pics/../../outside.png"])
def test_relative_path_leaving_the_root_is_refused(tmp_path, ref):
    # The file exists: the refusal is about where the path points, not a missing file.
    write_image(tmp_path / "outside.png")
    data = tmp_path / "data"
    write_image(data / "a.jpg")
    path = data / "m.csv"
    path.write_text(f"image,labels\na.jpg,cat\n{ref},cat\n")
    with pytest.raises(DataError, match=where(path, 3) + ".*" + re.escape(repr(ref))) as caught:
        load_manifest(path, "train", ["cat"])
    assert "leaves the image folder" in str(caught.value)
    # The same holds against an explicit root.
    with pytest.raises(DataError, match=where(path, 3) + ".*leaves the image folder"):
        load_manifest(path, "train", ["cat"], root=data)


def test_relative_path_that_comes_back_inside_the_root_is_kept(tmp_path):
    write_image(tmp_path / "pics" / "a.jpg")
    (tmp_path / "other").mkdir()
    path = tmp_path / "m.csv"
    path.write_text("image,labels\nother/../pics/a.jpg,cat\n")
    source = load_manifest(path, "train", ["cat"])
    assert source.load_image(0).size == (8, 6)


def test_a_folder_is_not_an_image_file(tmp_path):
    (tmp_path / "pics").mkdir()
    path = tmp_path / "m.csv"
    path.write_text("image,labels\npics,cat\n")
    with pytest.raises(DataError, match=where(path, 2) + " image file not found"):
        load_manifest(path, "train", ["cat"])


def test_read_manifest_rows_keeps_lines_and_label_order(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('image,labels\nb.jpg," dog ;cat;dog"\n\nmissing.jpg,\n')
    assert read_manifest_rows(path) == [
        ManifestRow(2, "b.jpg", ("dog", "cat")),
        ManifestRow(4, "missing.jpg", ()),
    ]


def test_new_labels_follow_row_then_label_order(tmp_path):
    path = tmp_path / "session.jsonl"
    rows = [
        ("a.jpg", ["zebra", "cat"]),
        ("b.jpg", []),
        ("c.jpg", ["ant", "zebra", "bee"]),
        ("d.jpg", ["cat", "ant"]),
    ]
    path.write_text(
        "".join(json.dumps({"image": image, "labels": labels}) + "\n" for image, labels in rows)
    )
    # Neither sorted nor set order: "zebra" comes first because row 1 names it first.
    assert new_labels_in_order(path, ["cat", "dog"]) == ["zebra", "ant", "bee"]
    assert new_labels_in_order(path, []) == ["zebra", "cat", "ant", "bee"]
    assert new_labels_in_order(path, ["ant", "bee", "cat", "zebra"]) == []


def test_new_labels_reports_parse_errors(tmp_path):
    path = tmp_path / "session.csv"
    path.write_text("image,label\na.jpg,cat\n")
    with pytest.raises(DataError, match=where(path, 1) + ".*'labels'"):
        new_labels_in_order(path, ["cat"])

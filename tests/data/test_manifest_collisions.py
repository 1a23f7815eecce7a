"""Manifest inputs that mislead: repeated JSON keys and label names that only look the same."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from mlcil.data.manifest import (
    infer_class_names,
    load_manifest,
    new_labels_in_order,
    read_class_file,
    read_manifest_rows,
)
from mlcil.errors import DataError

ZERO_WIDTH = ["\u200b", "\u200c", "\u200d", "\ufeff", "\u2060"]


def write_jsonl(path: Path, rows: list[tuple[str, list[str]]]) -> Path:
    lines = [json.dumps({"image": image, "labels": labels}) for image, labels in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)
    return path


def at(path: Path, line: int) -> str:
    return re.escape(f"{path}, line {line}")


# ---------------------------------------------------------------------------------------------
# repeated JSON keys


def test_a_repeated_json_key_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"image": "ok.png", "labels": ["cat"]}\n'
        '{"image": "a.png", "image": "b.png", "labels": []}\n'
    )
    with pytest.raises(DataError, match=at(path, 2) + r": key 'image' appears twice"):
        read_manifest_rows(path)


def test_a_repeated_labels_key_is_an_error_too(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a.png", "labels": ["cat"], "labels": ["dog"]}\n')
    with pytest.raises(DataError, match=at(path, 1) + r": key 'labels' appears twice"):
        infer_class_names(path)


def test_a_csv_header_with_two_image_columns_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("image,labels,image\na.png,cat,b.png\n")
    with pytest.raises(DataError, match=at(path, 1) + r": the header has more than one 'image'"):
        read_manifest_rows(path)


# ---------------------------------------------------------------------------------------------
# label names that differ only by case, whitespace or invisible characters


def test_labels_differing_by_case_in_one_manifest(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("image,labels\na.png,cat;dog\nb.png,dog\nc.png,Cat\n")
    message = at(path, 4) + r": label 'Cat' differs from 'cat' \(" + at(path, 2) + r"\) only by "
    with pytest.raises(DataError, match=message + "letter case"):
        read_manifest_rows(path)


def test_labels_differing_by_case_within_one_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [("a.png", ["DOG", "dog"])])
    with pytest.raises(DataError, match=r"label 'dog' differs from 'DOG'.*letter case"):
        infer_class_names(path)


@pytest.mark.parametrize("mark", ZERO_WIDTH)
def test_labels_differing_by_a_zero_width_character(tmp_path: Path, mark: str) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [("a.png", ["cat"]), ("b.png", ["cat" + mark])])
    spelled = re.escape(repr("cat" + mark))
    with pytest.raises(
        DataError, match=at(path, 2) + rf": label {spelled} differs from 'cat'.*zero-width"
    ):
        read_manifest_rows(path)


def test_a_zero_width_character_before_a_space(tmp_path: Path) -> None:
    # str.strip keeps " cat" after U+200B, so the names differ by both.
    path = write_jsonl(tmp_path / "m.jsonl", [("a.png", ["cat"]), ("b.png", ["\u200b cat"])])
    with pytest.raises(DataError, match=r"zero-width characters and surrounding whitespace"):
        read_manifest_rows(path)


def test_spellings_across_train_and_test_manifests(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [("a.png", ["bus"]), ("b.png", ["dog"])])
    test = write_jsonl(tmp_path / "test.jsonl", [("c.png", ["Dog"])])
    message = at(test, 1) + r": label 'Dog' differs from 'dog' \(" + at(train, 2) + r"\)"
    with pytest.raises(DataError, match=message):
        infer_class_names([train, test])


def test_distinct_names_are_kept(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "m.jsonl", [("a.png", ["cat", "cats", "Zebra"]), ("b.png", ["cat-1"])]
    )
    assert infer_class_names(path) == ["Zebra", "cat", "cat-1", "cats"]


def test_class_file_with_two_spellings_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("dog\ncat\n# comment\ncat\u2060\n", encoding="utf-8")
    message = at(path, 4) + r": class name 'cat\\u2060' differs from 'cat' \(" + at(path, 2)
    with pytest.raises(DataError, match=message):
        read_class_file(path)
    path.write_text("dog\nDOG\n")
    with pytest.raises(DataError, match=at(path, 2) + r": class name 'DOG' differs from 'dog'"):
        read_class_file(path)


@pytest.mark.parametrize("spelling", ["Cat", "cat\u200b", "\ufeffcat", "CAT\u200d"])
def test_an_added_session_cannot_respell_a_known_class(tmp_path: Path, spelling: str) -> None:
    path = write_jsonl(
        tmp_path / "session.jsonl", [("a.png", ["bird"]), ("b.png", ["bird", spelling])]
    )
    message = (
        at(path, 2)
        + rf": label {re.escape(repr(spelling))} differs from 'cat' \(the run's class list\)"
    )
    with pytest.raises(DataError, match=message):
        new_labels_in_order(path, ["cat", "dog"])


def test_an_added_session_with_correct_spellings_finds_its_new_classes(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "session.jsonl", [("a.png", ["cat", "bird"]), ("b.png", ["owl"])])
    assert new_labels_in_order(path, ["cat", "dog"]) == ["bird", "owl"]


def test_an_unknown_label_names_the_class_it_resembles(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "m.jsonl", [("a.png", ["Cat"])])
    with pytest.raises(
        DataError,
        match=at(path, 1) + r": label 'Cat' is not in the class list \(2 classes\); it differs "
        r"from the class 'cat' only by letter case",
    ):
        load_manifest(path, "train", ["cat", "dog"])

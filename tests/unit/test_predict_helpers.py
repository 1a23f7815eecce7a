"""Prediction helpers: gathering and decoding images, thresholds, and the three output formats."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlcil.data.transforms import build_transform
from mlcil.errors import ConfigError, DataError, MlcilError
from mlcil.predict import (
    Prediction,
    gather_images,
    iter_image_batches,
    load_images,
    make_predictions,
    read_thresholds,
    write_csv,
    write_jsonl,
    write_table,
)

CLASSES = ["cat", "dog", "car"]


def write_image(path: Path, color: tuple[int, int, int] = (200, 10, 10), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes())
    return path


# ---------------------------------------------------------------------------------------------
# gather_images


def test_folders_expand_recursively_in_sorted_order(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    for name in ["b.PNG", "a.jpg", "sub/z.jpeg", "sub/deeper/c.WebP", "sub/x.tiff", "a/b.gif"]:
        write_image(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub" / "labels.csv").write_text("image,labels\n")
    images, problems = gather_images([folder])
    assert images == [
        folder / "a" / "b.gif",
        folder / "a.jpg",
        folder / "b.PNG",
        folder / "sub" / "deeper" / "c.WebP",
        folder / "sub" / "x.tiff",
        folder / "sub" / "z.jpeg",
    ]
    assert problems == []


def test_inputs_keep_their_order_and_problems_are_reported(tmp_path: Path) -> None:
    single = write_image(tmp_path / "single.bmp")
    named = tmp_path / "no_extension"
    named.write_bytes(single.read_bytes())
    folder = tmp_path / "folder"
    inside = write_image(folder / "in.png")
    empty = tmp_path / "empty"
    (empty / "deep").mkdir(parents=True)
    (empty / "deep" / "readme.txt").write_text("x")
    missing = tmp_path / "absent.jpg"

    images, problems = gather_images([str(single), missing, folder, empty, named, inside])
    # A file named directly is taken whatever its extension; "in.png" given twice is listed once.
    assert images == [single, inside, named]
    assert problems[0] == (str(missing), "no such file or folder")
    assert problems[1][0] == str(empty) and problems[1][1].startswith("folder holds no image")
    assert len(problems) == 2


# ---------------------------------------------------------------------------------------------
# load_images / iter_image_batches


def test_corrupt_image_is_skipped_and_reported(tmp_path: Path) -> None:
    red = write_image(tmp_path / "red.png", (255, 0, 0), size=(10, 4))
    corrupt = write_corrupt(tmp_path / "broken.jpg")
    text = tmp_path / "text.png"
    text.write_text("hello")
    blue = write_image(tmp_path / "blue.jpg", (0, 0, 255), size=(5, 9))

    images, ok_paths, failures = load_images(
        [red, corrupt, text, blue], build_transform(4, train=False)
    )
    assert ok_paths == [red, blue]
    assert images is not None and images.shape == (2, 3, 4, 4)
    assert torch.allclose(images[0, 0], torch.ones(4, 4)) and images[0, 2].max() == 0
    assert images[1, 2].min() > 0.9 and images[1, 0].max() < 0.1  # JPEG is lossy
    assert [path for path, _ in failures] == [str(corrupt), str(text)]
    assert all(reason.startswith("cannot read image: ") for _, reason in failures)


def test_load_images_with_nothing_readable(tmp_path: Path) -> None:
    corrupt = write_corrupt(tmp_path / "x.jpg")
    assert load_images([], build_transform(4, train=False)) == (None, [], [])
    images, ok_paths, failures = load_images([corrupt], build_transform(4, train=False))
    assert images is None and ok_paths == [] and len(failures) == 1


def test_batches_are_full_and_skip_failures(tmp_path: Path) -> None:
    paths = [write_image(tmp_path / f"{i}.png", (i * 40, 0, 0)) for i in range(5)]
    paths.insert(1, write_corrupt(tmp_path / "bad.jpg"))
    failures: list[tuple[str, str]] = []
    batches = list(
        iter_image_batches(paths, build_transform(2, train=False), batch_size=2, failures=failures)
    )
    assert [batch_paths for _, batch_paths in batches] == [
        [paths[0], paths[2]],
        [paths[3], paths[4]],
        [paths[5]],
    ]
    # Each row holds its own image: the red channel is i * 40 / 255.
    reds = torch.cat([images[:, 0, 0, 0] for images, _ in batches])
    assert torch.allclose(reds, torch.tensor([0, 40, 80, 120, 160]) / 255.0)
    assert [path for path, _ in failures] == [str(paths[1])]
    with pytest.raises(ConfigError, match="batch size must be at least 1, got 0"):
        next(iter_image_batches(paths, build_transform(2, train=False), batch_size=0))


# ---------------------------------------------------------------------------------------------
# make_predictions


SCORES = np.array([[0.9, 0.5, 0.2], [0.1, 0.7, 0.6]])


def test_single_threshold_is_strict_and_keeps_class_order() -> None:
    predictions = make_predictions(["a.jpg", Path("b.jpg")], SCORES, CLASSES, 0.5)
    assert predictions == [
        Prediction("a.jpg", {"cat": 0.9, "dog": 0.5, "car": 0.2}, ["cat"]),
        Prediction("b.jpg", {"cat": 0.1, "dog": 0.7, "car": 0.6}, ["dog", "car"]),
    ]
    assert list(predictions[1].scores) == CLASSES


def test_per_class_thresholds() -> None:
    predictions = make_predictions(["a", "b"], SCORES, CLASSES, np.array([0.95, 0.4, 0.15]))
    assert [p.labels for p in predictions] == [["dog", "car"], ["dog", "car"]]


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        (1.0, "threshold 1.0 .*strictly between 0 and 1"),
        (0.0, "threshold 0.0"),
        (float("nan"), "threshold nan"),
        (np.array([0.5, 0.5]), "2 thresholds for 3 classes"),
        (np.array([0.5, 1.5, 0.5]), r"threshold 1.5 \(class index 1\)"),
    ],
)
def test_bad_thresholds_are_config_errors(thresholds, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_predictions(["a", "b"], SCORES, CLASSES, thresholds)


def test_scores_must_match_images_and_classes() -> None:
    with pytest.raises(MlcilError, match=r"shape \(2, 3\), expected \(3 images, 3 classes\)"):
        make_predictions(["a", "b", "c"], SCORES, CLASSES, 0.5)
    broken = SCORES.copy()
    broken[1, 2] = np.nan
    with pytest.raises(MlcilError, match="class 'car' for image b is nan"):
        make_predictions(["a", "b"], broken, CLASSES, 0.5)


# ---------------------------------------------------------------------------------------------
# read_thresholds


def where(path: Path, line: int) -> str:
    return re.escape(f"{path}, line {line}:")


def test_csv_and_json_thresholds_in_class_order(tmp_path: Path) -> None:
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("threshold,class\n0.3, car \n\n0.7,cat\n.25,dog\n")
    assert read_thresholds(csv_path, CLASSES).tolist() == [0.7, 0.25, 0.3]
    json_path = tmp_path / "t.JSON"
    json_path.write_text('{\n "dog": 0.4,\n "cat": 0.6, "car": 1e-1\n}\n')
    assert read_thresholds(json_path, CLASSES).tolist() == [0.6, 0.4, 0.1]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("class,threshold\ncat,0.5\nhorse,0.5\n", 3, "unknown class 'horse'"),
        ("class,threshold\ncat,0.5\ndog,0.5\n\ncat,0.6\n", 5, "'cat' is listed again.*line 2"),
        ("class,threshold\ncat,high\n", 2, "class 'cat' is not a number: 'high'"),
        ("class,threshold\ncat,0.5\ndog,1\n", 3, "class 'dog' is '1'; .*between 0 and 1"),
        ("class,threshold\ncat,0\n", 2, "class 'cat' is '0'"),
        ("class,threshold\ncat,nan\n", 2, "class 'cat' is 'nan'"),
        ("class,threshold\ncat\n", 2, "1 fields, the header has 2"),
        ("name,threshold\ncat,0.5\n", 1, "'class' and 'threshold'"),
    ],
)
def test_csv_threshold_errors_name_line_and_class(tmp_path: Path, text, line, message) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=where(path, line) + ".*" + message):
        read_thresholds(path, CLASSES)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('{"cat": 0.5,\n "dog": 0.5,\n "cat": 0.2}', 3, "'cat' is listed again.*line 1"),
        ('{"cat": 0.5,\n "dog": "0.5x"}', 2, "class 'dog' is not a number: '0.5x'"),
        ('{"cat": 0.5,\n "dog": true}', 2, "class 'dog' is not a number: True"),
        ('{"cat": 0.5,\n "dog": [0.5]}', 2, r"class 'dog' is not a number: \[0.5\]"),
        ('{"cat": 0.5,\n\n "Cat": 0.5}', 3, "unknown class 'Cat'"),
        ('{"cat": 0.5,\n "dog": 0.5\n "car": 0.5}', 3, "malformed JSON"),
    ],
)
def test_json_threshold_errors_name_line_and_class(tmp_path: Path, text, line, message) -> None:
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(DataError, match=where(path, line) + ".*" + message):
        read_thresholds(path, CLASSES)


def test_threshold_file_level_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"dog": 0.5}')
    with pytest.raises(DataError, match=re.escape(f"{path}: no threshold for class 'cat', 'car'")):
        read_thresholds(path, CLASSES)
    path.write_text("[0.5, 0.5, 0.5]")
    with pytest.raises(DataError, match=re.escape(f"{path}: expected a JSON object")):
        read_thresholds(path, CLASSES)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'absent.csv'}")):
        read_thresholds(tmp_path / "absent.csv", CLASSES)
    with pytest.raises(DataError, match=r"extension '\.txt'"):
        read_thresholds(tmp_path / "t.txt", CLASSES)


# ---------------------------------------------------------------------------------------------
# writers

PREDICTIONS = [
    Prediction("photos/a.jpg", {"cat": 0.9, "dog": 0.5, "car": 0.2}, ["cat"]),
    Prediction("b.jpg", {"cat": 0.1, "dog": 0.7, "car": 0.7}, ["dog", "car"]),
    Prediction("c.jpg", {"cat": 0.01, "dog": 0.02, "car": 0.03}, []),
]


def test_table_is_fixed_width_with_top_scores() -> None:
    stream = io.StringIO()
    write_table(PREDICTIONS, stream, max_classes=2)
    assert stream.getvalue() == (
        "image         labels    top scores\n"
        "photos/a.jpg  cat       cat 0.900  dog 0.500\n"
        "b.jpg         dog, car  dog 0.700  car 0.700\n"
        "c.jpg         -         car 0.030  dog 0.020\n"
    )
    everything = io.StringIO()
    write_table(PREDICTIONS[:1], everything, max_classes=None)
    assert everything.getvalue().splitlines()[1].endswith("cat 0.900  dog 0.500  car 0.200")
    with pytest.raises(ConfigError, match="max_classes must be at least 1"):
        write_table(PREDICTIONS, io.StringIO(), max_classes=0)


def test_jsonl_parses_back_to_the_predictions() -> None:
    stream = io.StringIO()
    write_jsonl(PREDICTIONS, stream)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert records == [
        {"image": p.image, "labels": p.labels, "scores": p.scores} for p in PREDICTIONS
    ]
    assert list(records[0]["scores"]) == CLASSES


def test_csv_parses_back_with_exact_scores() -> None:
    classes = ["cat", "dog", "car"]
    stream = io.StringIO()
    write_csv(PREDICTIONS, stream, classes)
    rows = list(csv.reader(io.StringIO(stream.getvalue())))
    assert rows[0] == ["image", "labels", "cat", "dog", "car"]
    assert rows[2] == ["b.jpg", "dog;car", "0.1", "0.7", "0.7"]
    assert rows[3][1] == ""
    for row, prediction in zip(rows[1:], PREDICTIONS, strict=True):
        assert [float(v) for v in row[2:]] == [prediction.scores[c] for c in classes]


def test_csv_quotes_awkward_class_names_and_needs_every_score() -> None:
    prediction = Prediction("x, y.jpg", {"traffic light, red": 1 / 3}, ["traffic light, red"])
    stream = io.StringIO()
    write_csv([prediction], stream, ["traffic light, red"])
    rows = list(csv.reader(io.StringIO(stream.getvalue())))
    assert rows == [
        ["image", "labels", "traffic light, red"],
        ["x, y.jpg", "traffic light, red", repr(1 / 3)],
    ]
    assert float(rows[1][2]) == 1 / 3
    partial = io.StringIO()
    with pytest.raises(MlcilError, match="photos/a.jpg has no score for class 'bus'"):
        write_csv(PREDICTIONS, partial, ["cat", "bus"])
    assert partial.getvalue() == ""

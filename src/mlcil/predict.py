"""Prediction on new images, everything that does not need a trained network.

``mlcil predict`` turns files and folders into a list of images (``gather_images``), decodes them
in batches while skipping unreadable files (``iter_image_batches`` / ``load_images``), turns the
network's sigmoid scores into per-image labels (``make_predictions``, with one threshold or one
per class from ``read_thresholds``) and writes them as a table, JSON lines or CSV.

Bad files never stop a prediction run: a path that does not exist, a folder without images, a
path that is not a regular file (a FIFO named ``x.png`` is never opened: reading it would block
forever) or a file that does not decode is reported as ``(path, reason)`` and the other images are
predicted. Images decode through ``mlcil.data.base.decode_image_file``, exactly as in training.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from PIL import Image

from mlcil.data.base import decode_image_file, file_problem
from mlcil.errors import ConfigError, DataError, MlcilError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

Problem = tuple[str, str]
"""``(path or input as given, reason)`` for an input or image that was skipped."""


@dataclass(frozen=True)
class Prediction:
    """The labels and scores of one image.

    Attributes:
        image: the image path as shown to the user.
        scores: sigmoid score of every class seen by the run, in class order.
        labels: the classes whose score is above their threshold, in class order.
    """

    image: str
    scores: dict[str, float]
    labels: list[str]


def gather_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[Problem]]:
    """Expand files and folders into the image files to predict.

    A folder is searched recursively for files whose extension is in ``IMAGE_EXTENSIONS``
    (case-insensitive), sorted by path components; links to folders are not followed, so a link
    cycle cannot loop. A file given by name is taken whatever its extension (the user chose it; a
    file that is not an image is reported when decoding). An image reached twice (a file and its
    folder) is listed once, where it is first reached. Only regular files are taken: a FIFO,
    socket or device (given, or named like an image inside a folder) is reported, never opened,
    as reading it could block forever.

    Args:
        inputs: files and folders, in the order the user gave them.

    Returns:
        The image paths (as given or below the folder given, not resolved), and the problems:
        ``(input, reason)`` for an input that does not exist, a folder with no image, or a path
        that is not a regular file (a broken link included).
    """
    images: list[Path] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found, below = _images_below(path)
            problems.extend(below)
            if not found and not below:
                extensions = " ".join(sorted(IMAGE_EXTENSIONS))
                problems.append((str(given), f"folder holds no image file ({extensions})"))
        elif not path.exists():
            problems.append((str(given), "no such file or folder"))
            continue
        elif (problem := file_problem(path)) is not None:
            problems.append((str(given), problem))
            continue
        else:
            found = [path]
        for image in found:
            # realpath identifies a file reached through two spellings or a link.
            key = os.path.realpath(image)
            if key not in seen:
                seen.add(key)
                images.append(image)
    return images, problems


def _images_below(folder: Path) -> tuple[list[Path], list[Problem]]:
    """The regular files with an image extension below ``folder``, and the other files so named
    (FIFOs, devices, broken links) as problems, both sorted."""
    found: list[Path] = []
    problems: list[Problem] = []
    for directory, _, names in os.walk(folder):
        for name in names:
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(directory, name)
            problem = file_problem(path)
            if problem is None:
                found.append(path)
            else:
                problems.append((str(path), f"not read: {problem}"))
    return sorted(found), sorted(problems, key=lambda item: Path(item[0]))


def iter_image_batches(
    paths: Sequence[str | Path],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 32,
    failures: list[Problem] | None = None,
) -> Iterator[tuple[torch.Tensor, list[Path]]]:
    """Decode images (PIL, RGB) and transform them, in batches, skipping unreadable files.

    Args:
        paths: the image files, e.g. from ``gather_images``.
        transform: PIL image -> ``(3, H, W)`` tensor, the run's evaluation transform; every
            output must have the same shape.
        batch_size: images per batch (the last batch may be smaller).
        failures: when given, ``(path, reason)`` of every file that could not be decoded is
            appended to it (each is also logged as a warning).

    Yields:
        ``(images, image_paths)``: a ``(B, 3, H, W)`` tensor with ``B >= 1`` and the paths of
        its rows.

    Raises:
        ConfigError: when ``batch_size`` is below 1.
    """
    if batch_size < 1:
        raise ConfigError(f"predict: batch size must be at least 1, got {batch_size}")
    tensors: list[torch.Tensor] = []
    batch_paths: list[Path] = []
    for given in paths:
        path = Path(given)
        try:
            image = decode_image_file(path)
        # Decoders of many formats raise many types (OSError, SyntaxError, ValueError,
        # DecompressionBombError, struct.error...) on hostile or damaged files: any of them
        # means "skip this file", never "stop the run".
        except Exception as error:
            detail = (
                str(error) if isinstance(error, DataError) else f"{type(error).__name__}: {error}"
            )
            reason = f"cannot read image: {detail}"
            logger.warning("predict: skipping %s: %s", path, reason)
            if failures is not None:
                failures.append((str(path), reason))
            continue
        tensors.append(transform(image))
        batch_paths.append(path)
        if len(tensors) == batch_size:
            yield torch.stack(tensors), batch_paths
            tensors, batch_paths = [], []
    if tensors:
        yield torch.stack(tensors), batch_paths


def load_images(
    paths: Sequence[str | Path], transform: Callable[[Image.Image], torch.Tensor]
) -> tuple[torch.Tensor | None, list[Path], list[Problem]]:
    """Decode and transform all images at once (see ``iter_image_batches`` for large sets).

    Args:
        paths: the image files.
        transform: PIL image -> ``(3, H, W)`` tensor.

    Returns:
        ``(images, ok_paths, failures)``: a ``(N, 3, H, W)`` tensor of the images that decoded
        (None when none did), their paths, and ``(path, reason)`` for each skipped file.
    """
    failures: list[Problem] = []
    batches = list(iter_image_batches(paths, transform, max(len(paths), 1), failures))
    if not batches:
        return None, [], failures
    images, ok_paths = batches[0]
    return images, ok_paths, failures


def _threshold_array(thresholds: float | np.ndarray, num_classes: int) -> np.ndarray:
    values = np.asarray(thresholds, dtype=np.float64)
    if values.ndim == 0:
        values = np.full(num_classes, float(values))
    elif values.shape != (num_classes,):
        raise ConfigError(
            f"predict: {values.shape[0] if values.ndim == 1 else values.shape} thresholds for "
            f"{num_classes} classes; give one threshold or one per class"
        )
    bad = np.flatnonzero(~(np.isfinite(values) & (values > 0.0) & (values < 1.0)))
    if bad.size:
        raise ConfigError(
            f"predict: threshold {values[bad[0]]} (class index {bad[0]}) must be a number "
            "strictly between 0 and 1"
        )
    return values


def make_predictions(
    image_names: Sequence[str | Path],
    scores: np.ndarray,
    classes: Sequence[str],
    thresholds: float | np.ndarray,
) -> list[Prediction]:
    """Turn sigmoid scores into labelled predictions.

    Args:
        image_names: one name per row of ``scores``.
        scores: ``(N, C)`` scores in [0, 1], columns in class order.
        classes: the ``C`` class names of the run, in class order.
        thresholds: one threshold for all classes, or an array of ``C`` per-class thresholds;
            a class is predicted when its score is strictly above its threshold.

    Returns:
        One ``Prediction`` per image, in the order of ``image_names``.

    Raises:
        ConfigError: when a threshold is outside (0, 1) or there are not ``C`` of them.
        MlcilError: when the shape of ``scores`` does not match the names and classes, or a
            score is NaN/inf.
    """
    names = [str(name) for name in image_names]
    classes = list(classes)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(names), len(classes)):
        raise MlcilError(
            f"predict: scores have shape {scores.shape}, expected ({len(names)} images, "
            f"{len(classes)} classes)"
        )
    bad = np.argwhere(~np.isfinite(scores))
    if bad.size:
        row, column = bad[0]
        raise MlcilError(
            f"predict: score of class {classes[column]!r} for image {names[row]} is "
            f"{scores[row, column]}; the network produced a non-finite value"
        )
    above = scores > _threshold_array(thresholds, len(classes))
    return [
        Prediction(
            image=name,
            scores={label: float(value) for label, value in zip(classes, row, strict=True)},
            labels=[classes[c] for c in np.flatnonzero(flags)],
        )
        for name, row, flags in zip(names, scores, above, strict=True)
    ]


def read_thresholds(path: str | Path, classes: Sequence[str]) -> np.ndarray:
    """Read per-class thresholds for ``classes`` from a CSV or JSON file.

    ``.csv``: a header with the columns ``class`` and ``threshold``, then one row per class.
    ``.json``: one object, ``{"class name": threshold, ...}``. Every class of the run must be
    listed exactly once, with a number strictly between 0 and 1; no other name may appear (a
    misspelt class would otherwise silently fall back to nothing).

    Args:
        path: the thresholds file.
        classes: the run's classes, in class order.

    Returns:
        The thresholds as a float64 array in class order.

    Raises:
        DataError: naming the file, and the line and class at fault: unreadable file, unknown
            extension, malformed CSV/JSON, unknown or repeated class, a value that is not a
            number in (0, 1), or classes without a threshold.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise DataError(
            f"thresholds: {path} has extension {path.suffix!r}; expected .csv (columns "
            'class,threshold) or .json ({"class": threshold})'
        )
    try:
        # utf-8-sig drops the byte-order mark spreadsheet programs put in front of CSV exports.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"thresholds: cannot read {path}: {error}") from error
    entries = _threshold_csv(text, path) if suffix == ".csv" else _threshold_json(text, path)
    return _threshold_values(entries, list(classes), path)


def _threshold_csv(text: str, path: Path) -> list[tuple[int, str, Any]]:
    """``(line, class, value text)`` of each row of a ``class,threshold`` CSV."""
    # read_text turned every line end into \n; StringIO splits on \n only.
    reader = csv.reader(io.StringIO(text))
    entries: list[tuple[int, str, str]] = []
    try:
        header = [column.strip() for column in next(reader, [])]
        if "class" not in header or "threshold" not in header:
            raise DataError(
                f"thresholds: {path}, line 1: the header must name the columns 'class' and "
                f"'threshold' (found {header})"
            )
        class_column, value_column = header.index("class"), header.index("threshold")
        for record in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            if len(record) < len(header):
                raise DataError(
                    f"thresholds: {path}, line {line}: {len(record)} fields, the header has "
                    f"{len(header)}"
                )
            entries.append((line, record[class_column].strip(), record[value_column].strip()))
    except csv.Error as error:
        raise DataError(f"thresholds: {path}, line {reader.line_num}: bad CSV: {error}") from error
    return entries


def _threshold_json(text: str, path: Path) -> list[tuple[int, str, Any]]:
    """``(line, class, value)`` of each member of a JSON object, repeated keys included."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"thresholds: {path}, line {error.lineno}: malformed JSON ({error.msg} at column "
            f"{error.colno})"
        ) from error
    if not isinstance(parsed, dict):
        raise DataError(
            f'thresholds: {path}: expected a JSON object {{"class": threshold, ...}}, got '
            f"{type(parsed).__name__}"
        )
    # json.loads keeps the last of repeated keys and forgets lines; walk the (now known valid)
    # object member by member with the standard decoder to keep both.
    decoder = json.JSONDecoder()
    entries: list[tuple[int, str, Any]] = []
    position = _skip_space(text, 0) + 1  # past "{"
    while True:
        position = _skip_space(text, position)
        if text[position] == "}":
            return entries
        line = text.count("\n", 0, position) + 1
        key, position = decoder.raw_decode(text, position)
        position = _skip_space(text, _skip_space(text, position) + 1)  # past ":"
        value, position = decoder.raw_decode(text, position)
        entries.append((line, key, value))
        position = _skip_space(text, position)
        if text[position] == ",":
            position += 1


def _skip_space(text: str, position: int) -> int:
    """The index of the first non-whitespace character at or after ``position`` (JSON rules)."""
    while position < len(text) and text[position] in " \t\n\r":
        position += 1
    return position


def _threshold_values(
    entries: Sequence[tuple[int, str, Any]], classes: list[str], path: Path
) -> np.ndarray:
    index = {name: position for position, name in enumerate(classes)}
    values = np.full(len(classes), np.nan)
    first_line: dict[str, int] = {}
    for line, name, raw in entries:
        where = f"thresholds: {path}, line {line}"
        if name not in index:
            raise DataError(
                f"{where}: unknown class {name!r}: not one of the run's {len(classes)} classes"
            )
        if name in first_line:
            raise DataError(
                f"{where}: class {name!r} is listed again (first on line {first_line[name]})"
            )
        first_line[name] = line
        value = _as_number(raw)
        if value is None:
            raise DataError(f"{where}: threshold of class {name!r} is not a number: {raw!r}")
        if not (math.isfinite(value) and 0.0 < value < 1.0):
            raise DataError(
                f"{where}: threshold of class {name!r} is {raw!r}; it must be strictly between "
                "0 and 1"
            )
        values[index[name]] = value
    missing = [name for name in classes if name not in first_line]
    if missing:
        shown = ", ".join(repr(name) for name in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(
            f"thresholds: {path}: no threshold for class {shown}{more} ({len(missing)} of "
            f"{len(classes)} classes missing; every class of the run needs one)"
        )
    return values


def _as_number(raw: Any) -> float | None:
    """A float from a CSV cell or a JSON number; None for anything else (booleans included)."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            return None
    return None


def write_table(
    predictions: Sequence[Prediction], stream: TextIO, max_classes: int | None = 5
) -> None:
    """Write a fixed-width table for people: image, predicted labels, highest scores.

    Args:
        predictions: from ``make_predictions``.
        stream: a text stream (e.g. ``sys.stdout``).
        max_classes: how many of the highest scores to show per image (None: all), highest
            first, ties in class order.

    Raises:
        ConfigError: when ``max_classes`` is below 1.
    """
    if max_classes is not None and max_classes < 1:
        raise ConfigError(f"predict: max_classes must be at least 1, got {max_classes}")
    rows = [("image", "labels", "top scores")]
    for prediction in predictions:
        # sorted is stable, so equal scores keep class order.
        ranked = sorted(prediction.scores.items(), key=lambda item: -item[1])[:max_classes]
        rows.append(
            (
                prediction.image,
                ", ".join(prediction.labels) or "-",
                "  ".join(f"{name} {score:.3f}" for name, score in ranked),
            )
        )
    image_width = max(len(row[0]) for row in rows)
    labels_width = max(len(row[1]) for row in rows)
    for image, labels, top in rows:
        stream.write(f"{image:<{image_width}}  {labels:<{labels_width}}  {top}".rstrip() + "\n")


def write_jsonl(predictions: Sequence[Prediction], stream: TextIO) -> None:
    """Write one JSON object per line: ``{"image", "labels", "scores"}`` (scores in class order).

    Args:
        predictions: from ``make_predictions``.
        stream: a text stream.
    """
    for prediction in predictions:
        record = {
            "image": prediction.image,
            "labels": prediction.labels,
            "scores": prediction.scores,
        }
        stream.write(json.dumps(record) + "\n")


def write_csv(predictions: Sequence[Prediction], stream: TextIO, classes: Sequence[str]) -> None:
    """Write CSV: header ``image,labels,<class 1>,...``, labels joined by ``;``, full-precision
    scores (the same ``;`` convention as manifests, so the file can seed a manifest).

    Args:
        predictions: from ``make_predictions``.
        stream: a text stream; open files with ``newline=""`` as for any CSV writer.
        classes: the score columns, in class order.

    Raises:
        MlcilError: when a prediction has no score for one of ``classes``.
    """
    # Checked before writing anything, so an error never leaves half a file.
    for prediction in predictions:
        missing = [name for name in classes if name not in prediction.scores]
        if missing:
            raise MlcilError(
                f"predict: the prediction for {prediction.image} has no score for class "
                f"{missing[0]!r}"
            )
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["image", "labels", *classes])
    for prediction in predictions:
        scores = [repr(prediction.scores[name]) for name in classes]
        writer.writerow([prediction.image, ";".join(prediction.labels), *scores])

"""Manifests: the format for users' own multi-label data.

A manifest lists images with their label names, in one of two file types chosen by extension:

``.csv``
    A header row with (at least) the columns ``image`` and ``labels``; labels are separated by
    ``;`` with surrounding whitespace stripped, and an empty cell means an image with no label::

        image,labels
        images/0001.jpg,dog;cat
        images/0002.jpg,

``.jsonl``
    One JSON object per line with the keys ``image`` (a string) and ``labels`` (a list of
    strings)::

        {"image": "images/0001.jpg", "labels": ["dog", "cat"]}

Relative image paths resolve against ``root`` when given, else against the manifest's folder;
absolute paths are kept. The class list comes from a class file (one name per line, in the order
the classes arrive in the incremental protocol) or, failing that, from ``infer_class_names``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlcil.data.base import FileImageSource
from mlcil.errors import DataError

logger = logging.getLogger(__name__)

_LABEL_SEPARATOR = ";"


@dataclass(frozen=True)
class _Row:
    """One image of a manifest, with the line it came from for error messages."""

    line: int
    image: str
    labels: tuple[str, ...]


def read_class_file(path: str | Path) -> list[str]:
    """Read a class file: one class name per line, in class-index order.

    The file order is kept as is (not sorted): in incremental learning the order in which classes
    arrive is the user's choice. Blank lines and lines starting with ``#`` are ignored.

    Args:
        path: the class file.

    Returns:
        The class names; position ``i`` holds the name of class ``i``.

    Raises:
        DataError: when the file is missing, lists a name twice (naming both lines) or lists none.
    """
    path = Path(path)
    names: list[str] = []
    first_line: dict[str, int] = {}
    for line_no, line in enumerate(_read_text(path, "class file").splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name in first_line:
            raise DataError(
                f"manifest: {path}, line {line_no}: duplicate class name {name!r} (first listed "
                f"on line {first_line[name]})"
            )
        first_line[name] = line_no
        names.append(name)
    if not names:
        raise DataError(f"manifest: class file {path} lists no class name")
    return names


def infer_class_names(manifest_paths: Iterable[str | Path] | str | Path) -> list[str]:
    """Collect the label names used by manifests, for data that has no class file.

    Args:
        manifest_paths: one manifest or several (typically the train and test manifests).

    Returns:
        The union of all label names, sorted by code point (so ``"Zebra"`` precedes ``"apple"``).

    Raises:
        DataError: when a manifest cannot be read or none of them uses any label.
    """
    if isinstance(manifest_paths, (str, Path)):
        manifest_paths = [manifest_paths]
    paths = [Path(path) for path in manifest_paths]
    if not paths:
        raise DataError("manifest: infer_class_names needs at least one manifest file")
    found: set[str] = set()
    for path in paths:
        for row in _read_rows(path):
            found.update(row.labels)
    if not found:
        raise DataError(
            "manifest: no label name in " + ", ".join(str(path) for path in paths) + "; "
            "cannot infer a class list"
        )
    return sorted(found)


def load_manifest(
    path: str | Path,
    split: str,
    class_names: Sequence[str],
    root: str | Path | None = None,
) -> FileImageSource:
    """Load a ``.csv`` or ``.jsonl`` manifest as multi-hot labels over ``class_names``.

    Args:
        path: the manifest file.
        split: ``"train"`` or ``"test"``.
        class_names: the class list in class-index order (e.g. from ``read_class_file``).
        root: folder that relative image paths resolve against; defaults to the manifest's
            folder.

    Returns:
        A source (dataset ``"manifest"``) with rows in manifest order and the image paths as
        written in the manifest as ``image_refs``. Its ``label_density`` is None, so it is
        computed from the training labels.

    Raises:
        DataError: naming the file and line of the first problem: a missing column or key, a
            malformed JSON line, an empty image path, a label outside ``class_names``, or an
            image file that does not exist (with the count of missing files).
    """
    path = Path(path)
    if split not in ("train", "test"):
        raise DataError(f"manifest: unknown split {split!r} for {path}; expected 'train' or 'test'")
    names = list(class_names)
    if not names:
        raise DataError(f"manifest: empty class list for {path}")
    index: dict[str, int] = {}
    for position, name in enumerate(names):
        if name in index:
            raise DataError(f"manifest: class {name!r} appears twice in the class list")
        index[name] = position

    rows = _read_rows(path)
    if not rows:
        raise DataError(f"manifest: {path} lists no image")
    labels = np.zeros((len(rows), len(names)), dtype=np.uint8)
    for row_index, row in enumerate(rows):
        for label in row.labels:
            column = index.get(label)
            if column is None:
                raise DataError(
                    f"manifest: {path}, line {row.line}: label {label!r} is not in the class "
                    f"list ({len(names)} classes); add it to the class file or fix the label"
                )
            labels[row_index, column] = 1

    base = Path(root) if root is not None else path.parent
    # os.path.join keeps an absolute image path as it is.
    missing = [row for row in rows if not os.path.exists(os.path.join(base, row.image))]
    if missing:
        first = missing[0]
        raise DataError(
            f"manifest: {path}, line {first.line}: image file not found: "
            f"{os.path.join(base, first.image)} ({len(missing)} of {len(rows)} images missing; "
            f"relative paths resolve against {base})"
        )
    logger.info(
        "manifest/%s: %d images (%d with a label) over %d classes from %s",
        split,
        len(rows),
        int(labels.any(axis=1).sum()),
        len(names),
        path,
    )
    return FileImageSource(
        dataset="manifest",
        split=split,
        root=base,
        class_names=names,
        image_refs=[row.image for row in rows],
        labels=labels,
        label_density=None,
    )


def _read_text(path: Path, what: str) -> str:
    try:
        # utf-8-sig drops the byte-order mark spreadsheet programs put in front of CSV exports.
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as error:
        raise DataError(f"manifest: {what} not found: {path}") from error
    except UnicodeDecodeError as error:
        raise DataError(f"manifest: {what} {path} is not UTF-8 text: {error}") from error
    except OSError as error:
        raise DataError(f"manifest: cannot read {what} {path}: {error}") from error


def _read_rows(path: Path) -> list[_Row]:
    """Parse a manifest by its extension."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise DataError(f"manifest: {path} has extension {path.suffix!r}; expected .csv or .jsonl")
    text = _read_text(path, "manifest file")
    return _parse_csv(text, path) if suffix == ".csv" else _parse_jsonl(text, path)


def _unique_labels(values: Iterable[str]) -> tuple[str, ...]:
    """Stripped, non-empty label names with repeats merged, first occurrence order."""
    return tuple(dict.fromkeys(name for name in (value.strip() for value in values) if name))


def _parse_csv(text: str, path: Path) -> list[_Row]:
    # read_text already turned every line end into \n; StringIO splits on \n only.
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"manifest: {path} is empty; expected a header with image,labels")
        columns = [column.strip() for column in header]
        for required in ("image", "labels"):
            if required not in columns:
                raise DataError(
                    f"manifest: {path}, line {reader.line_num}: the header has no {required!r} "
                    f"column (found {columns})"
                )
        image_column, labels_column = columns.index("image"), columns.index("labels")
        needed = max(image_column, labels_column) + 1
        rows: list[_Row] = []
        for record in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            if len(record) < needed:
                raise DataError(
                    f"manifest: {path}, line {line}: {len(record)} fields, the header needs "
                    f"{needed}"
                )
            image = record[image_column].strip()
            if not image:
                raise DataError(f"manifest: {path}, line {line}: empty image path")
            labels = _unique_labels(record[labels_column].split(_LABEL_SEPARATOR))
            rows.append(_Row(line, image, labels))
    except csv.Error as error:
        raise DataError(f"manifest: {path}, line {reader.line_num}: bad CSV: {error}") from error
    return rows


def _parse_jsonl(text: str, path: Path) -> list[_Row]:
    rows: list[_Row] = []
    # read_text turned every line end into \n. Split on it only: str.splitlines would also split
    # at characters such as U+2028 that JSON allows unescaped inside a string.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"manifest: {path}, line {line_no}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{where}: malformed JSON ({error.msg} at column {error.colno})"
            ) from error
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a JSON object with keys 'image' and 'labels'")
        if "image" not in entry:
            raise DataError(f"{where}: missing key 'image'")
        image = entry["image"]
        if not isinstance(image, str):
            raise DataError(f"{where}: 'image' must be a string, got {image!r}")
        if not image.strip():
            raise DataError(f"{where}: empty image path")
        if "labels" not in entry:
            raise DataError(f"{where}: missing key 'labels' (use [] for an image with no label)")
        labels = entry["labels"]
        if not isinstance(labels, list) or not all(isinstance(name, str) for name in labels):
            raise DataError(f"{where}: 'labels' must be a list of strings, got {labels!r}")
        rows.append(_Row(line_no, image.strip(), _unique_labels(labels)))
    return rows

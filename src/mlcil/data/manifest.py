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

Relative image paths resolve against ``root`` when given, else against the manifest's folder, and
must stay inside that folder (``../outside.png`` is an error: a manifest copied to another machine
must not reach files next to its data). Absolute paths are kept as written, wherever they point:
the user named that file on purpose. The check is on the path as written, normalised without
following symbolic links, so a data folder made of links into a shared store still works. Each image
may be listed once; a second row for the same file (``a.jpg`` and ``./a.jpg`` count as the same) is
an error naming both lines. An image that is not a regular file (a FIFO, a device) is an error
too, found without opening it. The class list comes from a class file (one name per line, in the
order the classes arrive in the incremental protocol) or, failing that, from ``infer_class_names``.

A JSON line that writes a key twice (``{"image": "a.png", "image": "b.png", ...}``) is an error:
JSON readers silently keep the last value. Label names are compared exactly, so two spellings of
one name that differ only by letter case, surrounding whitespace or invisible zero-width characters
(U+200B, U+200C, U+200D, U+2060, U+FEFF) would become two classes; such pairs are errors naming
both spellings and where each occurs: within a manifest, across the manifests ``infer_class_names``
reads, in a class file, and between a new session's manifest and the classes a run already knows
(``new_labels_in_order``).
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
from typing import Any

import numpy as np

from mlcil.data.base import FileImageSource, file_problem
from mlcil.errors import DataError

logger = logging.getLogger(__name__)

_LABEL_SEPARATOR = ";"

# Characters that print as nothing: "cat\u200b" looks exactly like "cat" on screen.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


@dataclass(frozen=True)
class ManifestRow:
    """One image of a manifest, with the line it came from for error messages.

    Attributes:
        line: 1-based line of the file the row was read from (for CSV, the line where the record
            ends).
        image: the image path as written (whitespace stripped).
        labels: the label names, stripped, repeats merged, in first-occurrence order.
    """

    line: int
    image: str
    labels: tuple[str, ...]


def spelling_key(name: str) -> str:
    """What two spellings of a label that people read as one name have in common: the name
    without zero-width characters and surrounding whitespace, case-folded."""
    return name.translate(_INVISIBLE).strip().casefold()


def _difference(first: str, second: str) -> str:
    """How two spellings with the same ``spelling_key`` differ, in words."""
    kinds = []
    visible = first.translate(_INVISIBLE), second.translate(_INVISIBLE)
    if visible != (first, second):
        kinds.append("invisible zero-width characters")
    stripped = visible[0].strip(), visible[1].strip()
    if stripped != visible:
        kinds.append("surrounding whitespace")
    if stripped[0] != stripped[1]:
        kinds.append("letter case")
    return " and ".join(kinds)


class _Spellings:
    """The first spelling of each label name and where it occurs, to refuse a second spelling."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[str, str]] = {}

    def know(self, name: str, where: str) -> None:
        """Record a name that is not checked itself (e.g. a finished run's classes)."""
        self._first.setdefault(spelling_key(name), (name, where))

    def add(self, name: str, where: str, what: str = "label") -> None:
        """Record ``name`` found at ``where``; another spelling of it seen before is an error."""
        earlier, earlier_where = self._first.setdefault(spelling_key(name), (name, where))
        if earlier != name:
            raise DataError(
                f"manifest: {where}: {what} {name!r} differs from {earlier!r} ({earlier_where}) "
                f"only by {_difference(name, earlier)}; they would become two classes, so "
                f"spell the name the same way everywhere (e.g. {earlier!r})"
            )


def read_class_file(path: str | Path) -> list[str]:
    """Read a class file: one class name per line, in class-index order.

    The file order is kept as is (not sorted): in incremental learning the order in which classes
    arrive is the user's choice. Blank lines and lines starting with ``#`` are ignored.

    Args:
        path: the class file.

    Returns:
        The class names; position ``i`` holds the name of class ``i``.

    Raises:
        DataError: when the file is missing, lists a name twice (naming both lines), lists two
            names that differ only by case, surrounding whitespace or zero-width characters
            (naming both lines), or lists none.
    """
    path = Path(path)
    names: list[str] = []
    first_line: dict[str, int] = {}
    spellings = _Spellings()
    for line_no, line in enumerate(_read_text(path, "class file").splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name in first_line:
            raise DataError(
                f"manifest: {path}, line {line_no}: duplicate class name {name!r} (first listed "
                f"on line {first_line[name]})"
            )
        spellings.add(name, f"{path}, line {line_no}", "class name")
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
        DataError: when a manifest cannot be read, none of them uses any label, or two label
            names differ only by case, surrounding whitespace or zero-width characters (naming
            both spellings with their file and line).
    """
    if isinstance(manifest_paths, (str, Path)):
        manifest_paths = [manifest_paths]
    paths = [Path(path) for path in manifest_paths]
    if not paths:
        raise DataError("manifest: infer_class_names needs at least one manifest file")
    found: set[str] = set()
    spellings = _Spellings()
    for path in paths:
        for row in _read_rows(path):
            for label in row.labels:
                if label not in found:
                    spellings.add(label, f"{path}, line {row.line}")
                    found.add(label)
    if not found:
        raise DataError(
            "manifest: no label name in " + ", ".join(str(path) for path in paths) + "; "
            "cannot infer a class list"
        )
    return sorted(found)


def read_manifest_rows(path: str | Path) -> list[ManifestRow]:
    """Parse a ``.csv`` or ``.jsonl`` manifest into rows, without looking at the image files.

    Args:
        path: the manifest file.

    Returns:
        One row per image line, in file order (blank lines skipped).

    Raises:
        DataError: naming the file and line of the first format problem (missing column or key,
            malformed JSON, empty image path). Duplicate images and paths leaving the root are
            checked by ``load_manifest``, which knows the root.
    """
    return _read_rows(Path(path))


def new_labels_in_order(path: str | Path, known_classes: Sequence[str]) -> list[str]:
    """The label names of a manifest that are not yet classes, in order of first appearance.

    Used to add a session to a finished run: the new session's classes are appended to the run's
    class list in the order the user's manifest introduces them, which keeps the result
    independent of any sorting and reproducible from the file alone.

    Args:
        path: the new session's training manifest.
        known_classes: the classes the run has already learned.

    Returns:
        The new names, ordered by row, then by position within the row; empty when the manifest
        introduces no class (the caller decides whether that is an error).

    Raises:
        DataError: when the manifest cannot be read or parsed (see ``read_manifest_rows``), or
            one of its labels differs from a known class only by case, surrounding whitespace or
            zero-width characters (``Cat`` or ``cat\\u200b`` when the run knows ``cat``): that
            is a misspelling, not a new class.
    """
    known = set(known_classes)
    spellings = _Spellings()
    for name in known_classes:
        spellings.know(name, "the run's class list")
    new: dict[str, None] = {}
    for row in _read_rows(Path(path)):
        for label in row.labels:
            if label not in known and label not in new:
                spellings.add(label, f"{path}, line {row.line}")
                new.setdefault(label)
    return list(new)


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
            malformed JSON line, an empty image path, a label outside ``class_names``, a relative
            image path that leaves the root, an image file that does not exist or is not a
            regular file such as a FIFO (with the count of such files; none is opened), or an
            image listed on two rows (naming both lines).
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
                    f"list ({len(names)} classes){_near_miss(label, names)}; add it to the class "
                    "file or fix the label"
                )
            labels[row_index, column] = 1

    base = Path(root) if root is not None else path.parent
    files = _image_files(rows, path, base)
    _check_image_files_exist(rows, path, base)
    _check_no_duplicate_images(rows, files, path)
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


def _near_miss(label: str, names: Sequence[str]) -> str:
    """A note naming the class ``label`` is another spelling of, or nothing."""
    key = spelling_key(label)
    for name in names:
        if spelling_key(name) == key:
            return f"; it differs from the class {name!r} only by {_difference(label, name)}"
    return ""


def _image_files(rows: Sequence[ManifestRow], path: Path, base: Path) -> list[str]:
    """Each row's image as a normalised absolute path; relative paths must stay inside ``base``.

    Normalised lexically (``os.path.normpath``), not resolved: following links would reject data
    folders whose images are links into a shared store, which are the user's deliberate choice.
    """
    base_abs = os.path.abspath(base)
    files = []
    for row in rows:
        if os.path.isabs(row.image):
            files.append(os.path.normpath(row.image))
            continue
        full = os.path.normpath(os.path.join(base_abs, row.image))
        if not Path(full).is_relative_to(base_abs):
            raise DataError(
                f"manifest: {path}, line {row.line}: image path {row.image!r} leaves the image "
                f"folder {base_abs} (relative paths must stay inside it; write an absolute path to "
                f"use a file elsewhere)"
            )
        files.append(full)
    return files


def _check_image_files_exist(rows: Sequence[ManifestRow], path: Path, base: Path) -> None:
    # The path as written, not the normalised one: "gone/../a.jpg" fails to open when "gone" is
    # missing, and that is what the data loader will open. os.path.join keeps absolute paths.
    # Only metadata is read: a FIFO named like an image is refused without being opened.
    bad = []
    for row in rows:
        problem = file_problem(os.path.join(base, row.image))
        if problem is not None:
            bad.append((row, problem))
    if not bad:
        return
    first, problem = bad[0]
    file = os.path.join(base, first.image)
    if problem == "no such file":
        detail = f"image file not found: {file}"
    elif problem.startswith("it is a folder"):  # no file of that name
        detail = f"image file not found: {file} ({problem})"
    else:
        detail = f"image {file} cannot be read: {problem}"
    raise DataError(
        f"manifest: {path}, line {first.line}: {detail} ({len(bad)} of {len(rows)} images "
        f"missing or not regular files; relative paths resolve against {base})"
    )


def _check_no_duplicate_images(
    rows: Sequence[ManifestRow], files: Sequence[str], path: Path
) -> None:
    """Refuse a second row for one image file: its labels would count twice, or contradict."""
    first_row: dict[str, ManifestRow] = {}
    repeats: list[tuple[ManifestRow, ManifestRow]] = []
    for row, file in zip(rows, files, strict=True):
        earlier = first_row.setdefault(file, row)
        if earlier is not row:
            repeats.append((earlier, row))
    if not repeats:
        return
    earlier, row = repeats[0]
    written = f" as {earlier.image!r}" if earlier.image != row.image else ""
    if set(earlier.labels) == set(row.labels):
        problem = "with the same labels; remove one of the rows"
    else:
        problem = (
            f"with conflicting labels {list(earlier.labels)} (line {earlier.line}) and "
            f"{list(row.labels)} (line {row.line}); keep one row with the right labels"
        )
    total = f" ({len(repeats)} repeated rows in all)" if len(repeats) > 1 else ""
    raise DataError(
        f"manifest: {path}, line {row.line}: image {row.image!r} is already listed on line "
        f"{earlier.line}{written}, {problem}{total}"
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


def _read_rows(path: Path) -> list[ManifestRow]:
    """Parse a manifest by its extension."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise DataError(f"manifest: {path} has extension {path.suffix!r}; expected .csv or .jsonl")
    text = _read_text(path, "manifest file")
    rows = _parse_csv(text, path) if suffix == ".csv" else _parse_jsonl(text, path)
    spellings = _Spellings()
    seen: set[str] = set()
    for row in rows:
        for label in row.labels:
            if label not in seen:
                spellings.add(label, f"{path}, line {row.line}")
                seen.add(label)
    return rows


def _unique_labels(values: Iterable[str]) -> tuple[str, ...]:
    """Stripped, non-empty label names with repeats merged, first occurrence order."""
    return tuple(dict.fromkeys(name for name in (value.strip() for value in values) if name))


def _parse_csv(text: str, path: Path) -> list[ManifestRow]:
    # read_text already turned every line end into \n; StringIO splits on \n only.
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"manifest: {path} is empty; expected a header with image,labels")
        columns = [column.strip() for column in header]
        for required in ("image", "labels"):
            if columns.count(required) != 1:
                problem = "no" if required not in columns else "more than one"
                raise DataError(
                    f"manifest: {path}, line {reader.line_num}: the header has {problem} "
                    f"{required!r} column (found {columns})"
                )
        image_column, labels_column = columns.index("image"), columns.index("labels")
        needed = max(image_column, labels_column) + 1
        rows: list[ManifestRow] = []
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
            rows.append(ManifestRow(line, image, labels))
    except csv.Error as error:
        raise DataError(f"manifest: {path}, line {reader.line_num}: bad CSV: {error}") from error
    return rows


def _parse_jsonl(text: str, path: Path) -> list[ManifestRow]:
    rows: list[ManifestRow] = []
    # read_text turned every line end into \n. Split on it only: str.splitlines would also split
    # at characters such as U+2028 that JSON allows unescaped inside a string.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            rows.append(_parse_json_line(line, f"manifest: {path}, line {line_no}", line_no))
    return rows


class _RepeatedKeyError(Exception):
    """A JSON object writes ``key`` twice (raised from the decoder, turned into a DataError)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses a repeated key, which ``json`` would silently drop."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _RepeatedKeyError(key)
        result[key] = value
    return result


def _parse_json_line(line: str, where: str, line_no: int) -> ManifestRow:
    try:
        entry = json.loads(line, object_pairs_hook=_object_without_repeats)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from error
    except _RepeatedKeyError as error:
        raise DataError(
            f"{where}: key {error.key!r} appears twice in one JSON object (JSON readers keep only "
            "the last value, so the other would be dropped silently); remove one"
        ) from None
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
    return ManifestRow(line_no, image.strip(), _unique_labels(labels))

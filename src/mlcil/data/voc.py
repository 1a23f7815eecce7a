"""PASCAL VOC 2007 annotations parsed into a ``FileImageSource``.

Expected layout of the VOC2007 folder (``root`` itself, or ``root/VOCdevkit/VOC2007``)::

    ImageSets/Main/trainval.txt   (split "train")
    ImageSets/Main/test.txt       (split "test")
    Annotations/000005.xml ...
    JPEGImages/000005.jpg ...

Class index = alphabetical rank of the name among the 20 VOC classes. Objects marked
``<difficult>1</difficult>`` give no label; an object without the tag counts as not difficult.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mlcil.data.base import FileImageSource
from mlcil.data.classes import class_names
from mlcil.data.image_cache import cached_annotations
from mlcil.errors import DataError

logger = logging.getLogger(__name__)

# Published prior of labels per image per class used by dynamic pseudo-labels.
VOC_LABEL_DENSITY = 1.4 / 20

# Bump when the parse changes what it returns: label matrices cached by an older loader are then
# parsed again instead of being reused.
LOADER_VERSION = 1

_SPLITS: dict[str, str] = {"train": "trainval", "test": "test"}

_LAYOUT = (
    "expected a VOC2007 folder holding ImageSets/Main/{trainval,test}.txt, Annotations/ and "
    "JPEGImages/, or a folder that contains VOCdevkit/VOC2007"
)


def load_voc(root: str | Path, split: str, cache: str | Path | None = None) -> FileImageSource:
    """Load one split of PASCAL VOC 2007 as multi-hot labels over the 20 classes.

    Args:
        root: the VOC2007 folder, or a folder containing ``VOCdevkit/VOC2007``.
        split: ``"train"`` (ids from ``trainval.txt``) or ``"test"`` (ids from ``test.txt``).
        cache: the annotation cache folder (``mlcil.data.image_cache``): the parsed label
            matrix is kept there and reused while the image-set file and every annotation XML
            keep their size and mtime. None: parse the XML files every time.

    Returns:
        A source whose rows follow the id order of the ImageSets file, with ``image_refs`` like
        ``"JPEGImages/000005.jpg"`` relative to the resolved VOC2007 folder.

    Raises:
        DataError: when the layout is incomplete, an annotation XML is missing or malformed, or
            an object has a name outside the 20 VOC classes; the message names the file.
    """
    if split not in _SPLITS:
        raise DataError(f"voc: unknown split {split!r}; expected 'train' or 'test'")
    voc_root = _resolve_root(Path(root))
    ids_path = voc_root / "ImageSets" / "Main" / f"{_SPLITS[split]}.txt"
    ids = _read_ids(ids_path)
    identity = {
        "dataset": "voc",
        "split": split,
        "root": str(voc_root.resolve()),
        "class_names": class_names("voc"),
        "loader": LOADER_VERSION,
    }
    xml_paths = [voc_root / "Annotations" / f"{image_id}.xml" for image_id in ids]
    source = cached_annotations(
        Path(cache) if cache is not None else None,
        identity,
        [ids_path, *xml_paths],
        voc_root,
        lambda: _parse(voc_root, split, ids, xml_paths),
    )
    logger.info("%s from %s", source.describe(), voc_root)
    return source


def _parse(
    voc_root: Path, split: str, ids: Sequence[str], xml_paths: Sequence[Path]
) -> FileImageSource:
    """Parse the annotation XML of every id (the work the annotation cache saves)."""
    names = class_names("voc")
    index = {name: position for position, name in enumerate(names)}
    labels = np.zeros((len(ids), len(names)), dtype=np.uint8)
    for row, xml_path in enumerate(xml_paths):
        labels[row, _labelled_classes(xml_path, index)] = 1
    return FileImageSource(
        dataset="voc",
        split=split,
        root=voc_root,
        class_names=names,
        image_refs=[f"JPEGImages/{image_id}.jpg" for image_id in ids],
        labels=labels,
        label_density=VOC_LABEL_DENSITY,
    )


def _resolve_root(root: Path) -> Path:
    """The VOC2007 folder: ``root`` itself or one of the usual parents of it."""
    for candidate in (root, root / "VOCdevkit" / "VOC2007", root / "VOC2007"):
        if (candidate / "ImageSets" / "Main").is_dir():
            if candidate != root:
                logger.debug("voc: using %s below %s", candidate, root)
            return candidate
    if not root.exists():
        raise DataError(f"voc: dataset root folder not found: {root} ({_LAYOUT})")
    raise DataError(
        f"voc: no ImageSets/Main folder in {root} or {root}/VOCdevkit/VOC2007 ({_LAYOUT})"
    )


def _read_ids(path: Path) -> list[str]:
    """Image ids of an ImageSets file, one per line, blank lines skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise DataError(f"voc: image-set file not found: {path} ({_LAYOUT})") from error
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"voc: cannot read image-set file {path}: {error}") from error
    ids: list[str] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        image_id = line.strip()
        if not image_id:
            continue
        # Main/<class>_trainval.txt has "id flag" rows; only the plain id lists are valid here.
        if len(image_id.split()) != 1:
            raise DataError(f"voc: {path}, line {line_no}: expected one image id, got {line!r}")
        ids.append(image_id)
    if not ids:
        raise DataError(f"voc: image-set file {path} lists no image id")
    return ids


def _labelled_classes(xml_path: Path, index: Mapping[str, int]) -> list[int]:
    """Class indices of the non-difficult objects of one annotation file."""
    try:
        annotation = ET.parse(xml_path).getroot()
    except FileNotFoundError as error:
        raise DataError(f"voc: annotation file not found: {xml_path}") from error
    except ET.ParseError as error:
        line, column = error.position
        raise DataError(
            f"voc: malformed XML in {xml_path} (line {line}, column {column}): {error}"
        ) from error
    except OSError as error:
        raise DataError(f"voc: cannot read annotation file {xml_path}: {error}") from error
    if annotation.tag != "annotation":
        raise DataError(
            f"voc: {xml_path} has root element <{annotation.tag}>, expected <annotation>"
        )

    classes: list[int] = []
    for position, obj in enumerate(annotation.findall("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataError(f"voc: {xml_path}: object {position} has no <name>")
        if name not in index:
            raise DataError(
                f"voc: {xml_path}: unknown object name {name!r} (object {position}); expected "
                "one of the 20 VOC classes"
            )
        if not _is_difficult(obj.findtext("difficult"), xml_path, position):
            classes.append(index[name])
    return classes


def _is_difficult(text: str | None, xml_path: Path, position: int) -> bool:
    value = (text or "").strip()
    if not value:
        return False
    try:
        return int(value) != 0
    except ValueError as error:
        raise DataError(
            f"voc: {xml_path}: object {position} has <difficult>{value}</difficult>, expected 0 "
            "or 1"
        ) from error

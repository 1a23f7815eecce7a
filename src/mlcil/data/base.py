"""The one shape every dataset split takes: image references plus a multi-hot label matrix.

A loader (COCO, VOC, manifest, the embedded digits) parses its annotation format once into an
``ImageSource``; everything downstream (session splits, exemplar memory, evaluation) works on the
label matrix and on integer positions into the source, never on format-specific objects. Images
decode lazily through ``load_image``.

Image files are decoded in one place, ``decode_image_file`` (datasets and ``mlcil predict`` alike):
only regular files are opened (a FIFO named ``x.png`` would block the reader forever), the EXIF
orientation is applied (phone photos are stored sideways), and 16-bit samples are scaled to 8 bits
(keeping their top byte) instead of being clipped to white.
"""

from __future__ import annotations

import abc
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps

from mlcil.errors import DataError

logger = logging.getLogger(__name__)

# Modes PIL gives 16-bit samples (16-bit grayscale PNG, some TIFF and PGM files). "I" holds 32-bit
# integers, but PIL uses it for 16-bit files too, so its values are read on the same 0..65535 scale.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

# Non-blocking, so that opening a FIFO returns at once (it is then refused) instead of waiting
# for a writer; it changes nothing for a regular file.
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)

_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as an image file, or None for a regular file.

    Symbolic links are followed. Only the file's metadata is read, so this never blocks on a FIFO.

    Returns:
        None, ``"no such file"``, ``"it is a link to a missing file"``, ``"it is a FIFO (named
        pipe), not a regular file"`` (or a folder, socket, device) or ``"cannot access it
        (...)"``.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "it is a link to a missing file" if os.path.islink(path) else "no such file"
    except OSError as error:
        return f"cannot access it ({error.strerror or error})"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    return f"it is {kind}, not a regular file"


def open_regular_file(path: str | Path) -> BinaryIO:
    """Open a regular file for binary reading; anything else is refused without blocking.

    The open is non-blocking and the kind of file is checked on the open descriptor, so a file
    replaced by a FIFO after an earlier check cannot hang the reader either.

    Raises:
        DataError: naming the file when it is missing, not a regular file or unreadable.
    """
    problem = file_problem(path)
    if problem is None:
        try:
            fd = os.open(path, _READ_FLAGS)
        except OSError as error:
            problem = f"cannot open it ({error.strerror or error})"
        else:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return os.fdopen(fd, "rb")
            os.close(fd)
            problem = "it is not a regular file"
    if problem == "no such file":
        raise DataError(f"image file not found: {path}")
    raise DataError(f"image file {path}: {problem}")


def decode_image_file(path: str | Path) -> Image.Image:
    """Decode an image file as an 8-bit RGB image, upright.

    Args:
        path: the image file; anything but a regular file (a FIFO, a device) is refused before
            it is opened for reading.

    Returns:
        A new RGB image (the file is closed): EXIF orientation applied, 16-bit samples scaled
        to 8 bits by keeping their top byte (``value >> 8``).

    Raises:
        DataError: naming the file when it is missing, not a regular file, or does not decode.
    """
    with open_regular_file(path) as stream:
        try:
            with Image.open(stream) as image:
                image.load()
                return _to_rgb(_upright(image, path))
        # Decoders of many formats raise many types (OSError, SyntaxError, ValueError,
        # DecompressionBombError, struct.error...) on damaged or hostile files.
        except Exception as error:
            raise DataError(
                f"cannot decode image {path}: {type(error).__name__}: {error}"
            ) from error


def _upright(image: Image.Image, path: str | Path) -> Image.Image:
    """The image turned as its EXIF orientation tag says (an unreadable tag is ignored)."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(image)
    # A damaged EXIF block must not cost the pixels: show them as stored, like most viewers.
    except Exception as error:
        logger.debug("ignoring the unreadable EXIF data of %s: %s", path, error)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert("RGB") clips 16-bit values at 255, which turns almost every pixel white.
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


class ImageSource(abc.ABC):
    """One split (train or test) of a multi-label image dataset.

    Attributes:
        dataset: short dataset name (``"coco"``, ``"voc"``, ``"digits"``, ``"manifest"``).
        split: ``"train"`` or ``"test"``.
        class_names: names in class-index order.
        labels: ``(num_images, num_classes)`` uint8 matrix, 1 where the image has a labelled
            object of the class. Objects that "give no label" (COCO crowd, VOC difficult) leave 0.
        image_refs: one string per image that identifies it for humans and for the exemplar
            memory (a path relative to the dataset root, or an id for in-memory data).
        label_density: the dataset's published prior of labels per image per class used by
            dynamic pseudo-labels (COCO 2.9/80, VOC 1.4/20), or None to compute it from the
            training labels.
    """

    dataset: str
    split: str
    class_names: list[str]
    labels: np.ndarray
    image_refs: list[str]
    label_density: float | None = None

    def __len__(self) -> int:
        return len(self.image_refs)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        """One line for logs: image, labelled-image and label counts."""
        return (
            f"{self.dataset}/{self.split}: {len(self)} images "
            f"({int(self.labels.any(axis=1).sum())} with a label), {int(self.labels.sum())} labels"
        )

    def reorder_classes(self, names: Sequence[str]) -> None:
        """Put the classes in the order ``names`` gives (the order they arrive in sessions).

        Raises:
            DataError: unless ``names`` lists every class of the source exactly once.
        """
        known = set(self.class_names)
        unknown = [n for n in names if n not in known]
        if unknown or len(set(names)) != len(names) or len(names) != len(self.class_names):
            missing = sorted(known - set(names))
            raise DataError(
                f"data.class_order must list each of the {len(known)} classes of "
                f"{self.dataset} once: unknown {unknown}, missing {missing}, "
                f"{len(names) - len(set(names))} repeated"
            )
        position = {name: i for i, name in enumerate(self.class_names)}
        self.labels = self.labels[:, [position[n] for n in names]]
        self.class_names = list(names)

    @abc.abstractmethod
    def load_image(self, index: int) -> Image.Image:
        """Decode image ``index`` as an RGB PIL image."""

    def _check(self) -> None:
        """Validate the invariants every loader must establish (called by subclasses)."""
        if self.labels.ndim != 2 or self.labels.shape != (len(self.image_refs), self.num_classes):
            raise DataError(
                f"{self.dataset}/{self.split}: label matrix has shape {self.labels.shape}, "
                f"expected ({len(self.image_refs)}, {self.num_classes})"
            )
        if self.labels.dtype != np.uint8:
            self.labels = self.labels.astype(np.uint8)


class FileImageSource(ImageSource):
    """An ``ImageSource`` whose images are files below a root folder."""

    def __init__(
        self,
        *,
        dataset: str,
        split: str,
        root: str | Path,
        class_names: Sequence[str],
        image_refs: Sequence[str],
        labels: np.ndarray,
        label_density: float | None = None,
    ) -> None:
        self.dataset = dataset
        self.split = split
        self.root = Path(root)
        self.class_names = list(class_names)
        self.image_refs = list(image_refs)
        self.labels = np.asarray(labels, dtype=np.uint8)
        self.label_density = label_density
        self._check()

    def image_path(self, index: int) -> Path:
        return self.root / self.image_refs[index]

    def load_image(self, index: int) -> Image.Image:
        """Decode image ``index`` with ``decode_image_file``.

        Raises:
            DataError: naming the dataset, split and file when it is missing, not a regular
                file (never opened, so a FIFO cannot block) or does not decode.
        """
        try:
            return decode_image_file(self.image_path(index))
        except DataError as error:
            raise DataError(f"{self.dataset}/{self.split}: {error}") from error


class ArrayImageSource(ImageSource):
    """An ``ImageSource`` held in memory as a ``(N, H, W, 3)`` uint8 array."""

    def __init__(
        self,
        *,
        dataset: str,
        split: str,
        class_names: Sequence[str],
        images: np.ndarray,
        labels: np.ndarray,
        image_refs: Sequence[str] | None = None,
        label_density: float | None = None,
    ) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{dataset}/{split}: images must be (N, H, W, 3) uint8, got "
                f"{images.shape} {images.dtype}"
            )
        self.dataset = dataset
        self.split = split
        self.class_names = list(class_names)
        self.images = images
        self.image_refs = (
            list(image_refs)
            if image_refs is not None
            else [f"{dataset}/{split}/{i:06d}" for i in range(len(images))]
        )
        self.labels = np.asarray(labels, dtype=np.uint8)
        self.label_density = label_density
        self._check()

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


def training_label_density(labels: np.ndarray) -> float:
    """Mean number of labels per image divided by the class count (DPL's prior rho).

    Images with no label at all are left out, as they never enter any session.
    """
    labelled = labels[labels.any(axis=1)]
    if labelled.size == 0:
        raise DataError("cannot compute a label density: no image carries any label")
    return float(labelled.sum(axis=1).mean() / labels.shape[1])

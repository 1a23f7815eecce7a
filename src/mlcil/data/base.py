"""The one shape every dataset split takes: image references plus a multi-hot label matrix.

A loader (COCO, VOC, manifest, the embedded digits) parses its annotation format once into an
``ImageSource``; everything downstream (session splits, exemplar memory, evaluation) works on the
label matrix and on integer positions into the source, never on format-specific objects. Images
decode lazily through ``load_image``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mlcil.errors import DataError


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
        path = self.image_path(index)
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError as error:
            raise DataError(f"{self.dataset}/{self.split}: image file not found: {path}") from error
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(
                f"{self.dataset}/{self.split}: cannot decode image {path}: {error}"
            ) from error


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

"""Per-session training and test sets (docs/method.md, sessions), as index arrays plus target rows.

All selection is vectorised over the label matrix, so splitting full COCO into sessions takes
milliseconds. Targets always span every class of the dataset; the columns of classes that are not
labelled in a session are 0, and methods read the first ``seen`` columns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mlcil.data.base import ImageSource
from mlcil.protocol import Session


def has_any(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Boolean mask of the rows of ``labels`` with at least one positive among ``classes``."""
    if len(classes) == 0:
        return np.zeros(len(labels), dtype=bool)
    return np.asarray(labels[:, list(classes)].any(axis=1), dtype=bool)


def restrict(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Copy of ``labels`` as float32 with every column outside ``classes`` set to 0."""
    targets = np.zeros(labels.shape, dtype=np.float32)
    columns = list(classes)
    targets[:, columns] = labels[:, columns]
    return targets


def session_train_indices(
    labels: np.ndarray, session: Session, all_sessions: Sequence[Session], overlap: str = "all"
) -> np.ndarray:
    """Training images of a session: every image with a labelled object of a new class.

    Args:
        labels: ``(N, C)`` training label matrix.
        session: the session.
        all_sessions: the whole protocol (needed by ``overlap="disjoint"``).
        overlap: ``"all"``, the published protocol, where an image recurs in every session whose
            classes it contains; or ``"disjoint"``, where an image belongs only to the first
            session that introduces one of its classes and never returns.
    """
    mask = has_any(labels, session.new_classes)
    if overlap == "disjoint":
        earlier = [s for s in all_sessions if s.index < session.index]
        for previous in earlier:
            mask &= ~has_any(labels, previous.new_classes)
    elif overlap != "all":
        raise ValueError(f"overlap must be 'all' or 'disjoint', got {overlap!r}")
    return np.flatnonzero(mask)


def test_indices(labels: np.ndarray, seen_classes: Sequence[int]) -> np.ndarray:
    """Test images after a session: every image with a labelled object of a seen class."""
    return np.flatnonzero(has_any(labels, seen_classes))


test_indices.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name


class TargetedImages(Dataset):
    """Images of a source at given positions, each with its own target row.

    Items are ``(image tensor, target tensor)``; the same source position may appear more than
    once with different targets (an exemplar and a new image, or protocol A's recurring images).
    """

    def __init__(
        self,
        source: ImageSource,
        indices: np.ndarray,
        targets: np.ndarray,
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        if len(indices) != len(targets):
            raise ValueError(f"{len(indices)} indices but {len(targets)} target rows")
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.float32)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.source.load_image(int(self.indices[item]))
        return self.transform(image), torch.from_numpy(self.targets[item])


def session_train_set(
    source: ImageSource,
    session: Session,
    all_sessions: Sequence[Session],
    transform: Callable[[Image.Image], torch.Tensor],
    overlap: str = "all",
    extra_indices: np.ndarray | None = None,
    extra_targets: np.ndarray | None = None,
) -> TargetedImages:
    """The session's images with targets for its classes only, plus optional extra rows
    (the exemplar memory) appended."""
    indices = session_train_indices(source.labels, session, all_sessions, overlap)
    targets = restrict(source.labels[indices], session.new_classes)
    if extra_indices is not None and len(extra_indices):
        assert extra_targets is not None
        indices = np.concatenate([indices, extra_indices])
        targets = np.concatenate([targets, extra_targets.astype(np.float32)])
    return TargetedImages(source, indices, targets, transform)


def session_test_set(
    source: ImageSource,
    seen_classes: Sequence[int],
    transform: Callable[[Image.Image], torch.Tensor],
) -> TargetedImages:
    """The test images of the classes seen so far, with targets for those classes only."""
    indices = test_indices(source.labels, seen_classes)
    return TargetedImages(
        source, indices, restrict(source.labels[indices], seen_classes), transform
    )

"""Exemplar memory: which training images are kept for rehearsal in later sessions.

Herding (iCaRL, Rebuffi et al. 2017) picks, for one class, the images whose feature mean best
approximates the class mean. ``ExemplarMemory`` keeps the picks as plain data (positions into the
training source, image references and label lists) and saves them as JSON: never pickled dataset
objects (docs/method.md, memory).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlcil.errors import DataError, MlcilError
from mlcil.protocol import Session

logger = logging.getLogger(__name__)

__all__ = ["ExemplarMemory", "herding"]


def herding(features: np.ndarray | torch.Tensor, m: int) -> list[int]:
    """iCaRL herding: greedily pick ``m`` rows whose running mean tracks the class mean.

    Rows are first L2-normalised (all-zero rows stay zero) and ``mu`` is the mean of the
    normalised rows. At step ``k`` (1-based) the row ``i`` not yet picked that minimises
    ``|| mu - (sum_picked + f_i) / k ||`` (Euclidean) is picked. Exact distance ties go to the
    smallest index, so the result is deterministic.

    Computation is in float64; each step is one matrix-vector product, ``O(N * D)``, so the
    whole selection is ``O(m * N * D)`` with no Python loop over the rows.

    Args:
        features: ``(N, D)`` features of one class's images (numpy array or torch tensor on any
            device).
        m: number of exemplars wanted.

    Returns:
        Row indices in selection order, ``min(m, N)`` of them (``[]`` when ``m <= 0``).

    Raises:
        MlcilError: when ``features`` is not 2-D or holds NaN or infinite values.
    """
    if isinstance(features, torch.Tensor):
        f = features.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise MlcilError(f"herding features must have shape (N, D), got {f.shape}")
    if not np.isfinite(f).all():
        raise MlcilError("herding features contain NaN or infinite values")
    num_rows = f.shape[0]
    count = min(m, num_rows)
    if count <= 0:
        return []

    norms = np.linalg.norm(f, axis=1, keepdims=True)  # (N, 1)
    f = np.divide(f, norms, out=np.zeros_like(f), where=norms > 0)  # (N, D)
    mu = f.mean(axis=0)  # (D,)
    sq_norms = np.einsum("nd,nd->n", f, f)  # (N,)

    picked: list[int] = []
    available = np.ones(num_rows, dtype=bool)
    running_sum = np.zeros_like(mu)  # (D,)
    for k in range(1, count + 1):
        # || a - f_i / k ||^2 with a = mu - S / k expands to ||a||^2 - 2 a.f_i / k
        # + ||f_i||^2 / k^2; dropping the constant and scaling by k leaves the same argmin and
        # avoids building an (N, D) temporary per step.
        residual = mu - running_sum / k  # (D,)
        cost = sq_norms / k - 2.0 * (f @ residual)  # (N,)
        cost[~available] = np.inf
        best = int(np.argmin(cost))  # argmin returns the first (smallest) index on ties
        picked.append(best)
        available[best] = False
        running_sum += f[best]
    logger.debug("herding picked %d of %d rows", len(picked), num_rows)
    return picked


MEMORY_FORMAT = "mlcil-exemplar-memory"


@dataclasses.dataclass
class ExemplarMemory:
    """The replay memory: herded exemplars of every class seen so far.

    Attributes:
        per_class: m, exemplars selected per class (growing memory).
        total: a fixed total budget instead; each class then keeps its first
            ``total // seen classes`` picks, re-trimmed after every session.
        label_mode: ``"strict"``: an exemplar keeps the labels known when it was stored (the
            labels of the session(s) that selected it); ``"official"``: the released code's
            behaviour, which re-reads the ground truth of every class from the exemplar's
            session up to the current one, future classes included.
        selections: class -> source positions in herding order.
        labels: source position -> class indices known when stored.
        sessions: source position -> index of the session that first stored it.
        image_refs: source position -> image reference (checked against the data on load).
    """

    per_class: int = 0
    total: int | None = None
    label_mode: str = "strict"
    selections: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    labels: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    sessions: dict[int, int] = dataclasses.field(default_factory=dict)
    image_refs: dict[int, str] = dataclasses.field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.per_class > 0 or self.total is not None

    def quota(self, num_seen_classes: int) -> int:
        """Exemplars each class may keep when ``num_seen_classes`` classes are seen."""
        if self.total is not None:
            return self.total // max(num_seen_classes, 1)
        return self.per_class

    def indices(self) -> np.ndarray:
        """Sorted source positions of the stored images (each image once)."""
        return np.array(sorted(self.labels), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def update(
        self,
        session: Session,
        session_indices: np.ndarray,
        features: np.ndarray | torch.Tensor,
        source_labels: np.ndarray,
        image_refs: Sequence[str],
    ) -> None:
        """Herd exemplars of the session's new classes from its own training images.

        Args:
            session: the session that just ended.
            session_indices: ``(n,)`` source positions of the session's training images
                (exemplars of earlier sessions excluded).
            features: ``(n, F)`` pooled backbone features of those images, without augmentation.
            source_labels: ``(N, C)`` label matrix of the training source.
            image_refs: the training source's image references.
        """
        if not self.enabled:
            return
        session_indices = np.asarray(session_indices, dtype=np.int64)
        features = (
            features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features
        )
        if len(features) != len(session_indices):
            raise MlcilError(
                f"memory update: {len(features)} feature rows for {len(session_indices)} images"
            )
        quota = self.quota(session.num_seen)
        for class_index in session.new_classes:
            rows = np.flatnonzero(source_labels[session_indices, class_index])
            picks = [int(session_indices[rows[i]]) for i in herding(features[rows], quota)]
            self.selections[class_index] = picks
            for position in picks:
                known = self.labels.setdefault(position, [])
                # An image picked again (another class, or a later session of protocol A) is
                # stored once; it also carries the labels of the session that picked it now.
                own = [c for c in session.new_classes if source_labels[position, c]]
                self.labels[position] = sorted(set(known) | set(own))
                self.sessions.setdefault(position, session.index)
                self.image_refs[position] = image_refs[position]
        self._trim(session.num_seen)
        logger.info(
            "memory after session %d: %d images (%d per class)", session.index, len(self), quota
        )

    def _trim(self, num_seen_classes: int) -> None:
        """Fixed budget: keep each class's first ``quota`` picks and drop unreferenced images."""
        if self.total is None:
            return
        quota = self.quota(num_seen_classes)
        self.selections = {c: picks[:quota] for c, picks in self.selections.items()}
        kept = {p for picks in self.selections.values() for p in picks}
        for store in (self.labels, self.sessions, self.image_refs):
            for position in [p for p in store if p not in kept]:
                del store[position]

    def targets(
        self, source_labels: np.ndarray, current: Session, all_sessions: Sequence[Session]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positions and ``(n, C)`` float32 targets of the exemplars for training ``current``."""
        positions = self.indices()
        targets = np.zeros((len(positions), source_labels.shape[1]), dtype=np.float32)
        for row, position in enumerate(positions):
            if self.label_mode == "official":
                first_class = all_sessions[self.sessions[position]].new_classes[0]
                classes = list(range(first_class, current.num_seen))
                targets[row, classes] = source_labels[position, classes]
            else:
                targets[row, self.labels[position]] = 1.0
        return positions, targets

    # --- plain-data persistence -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MEMORY_FORMAT,
            "version": 1,
            "per_class": self.per_class,
            "total": self.total,
            "label_mode": self.label_mode,
            "exemplars": [
                {
                    "index": position,
                    "image": self.image_refs[position],
                    "session": self.sessions[position],
                    "labels": self.labels[position],
                }
                for position in sorted(self.labels)
            ],
            "selections": {str(c): picks for c, picks in sorted(self.selections.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "memory") -> ExemplarMemory:
        if not isinstance(data, dict) or data.get("format") != MEMORY_FORMAT:
            raise DataError(f"{where}: not an mlcil exemplar memory file")
        try:
            memory = cls(
                per_class=int(data["per_class"]),
                total=data["total"],
                label_mode=str(data["label_mode"]),
            )
            for entry in data["exemplars"]:
                position = int(entry["index"])
                memory.labels[position] = [int(c) for c in entry["labels"]]
                memory.sessions[position] = int(entry["session"])
                memory.image_refs[position] = str(entry["image"])
            memory.selections = {
                int(c): [int(p) for p in picks] for c, picks in data["selections"].items()
            }
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{where}: malformed exemplar memory: {error!r}") from error
        return memory

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> ExemplarMemory:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise DataError(f"cannot read exemplar memory {path}: {error}") from error
        return cls.from_dict(data, where=str(path))

    def check_against(self, image_refs: Sequence[str], where: str = "memory") -> None:
        """Refuse a memory whose image references do not match the training data."""
        for position, ref in self.image_refs.items():
            if position >= len(image_refs) or image_refs[position] != ref:
                found = image_refs[position] if position < len(image_refs) else "nothing"
                raise DataError(
                    f"{where}: exemplar {position} should be {ref!r} but the training data has "
                    f"{found!r} there: the dataset changed since the memory was saved"
                )

"""Exemplar memory: which training images are kept for rehearsal in later sessions.

A memory policy (:mod:`mlcil.memory_policies`, ``memory.policy``; herding by default: iCaRL,
Rebuffi et al. 2017) picks, for each new class, the images to keep. ``ExemplarMemory`` keeps the
picks as plain data (positions into the training source, image references and label lists) and
saves them as JSON: never pickled dataset objects (docs/method.md, memory). A method may store a
row of numbers with each exemplar when it is stored (DER++'s logits): kept as float lists here,
saved as safetensors next to the JSON (:meth:`ExemplarMemory.data_tensors`).
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
from mlcil.memory_policies import Candidates, MemoryPolicy, get_policy, herding
from mlcil.protocol import Session

logger = logging.getLogger(__name__)

__all__ = ["ExemplarMemory", "herding"]  # herding: re-exported where it always was


MEMORY_FORMAT = "mlcil-exemplar-memory"


@dataclasses.dataclass
class ExemplarMemory:
    """The replay memory: the exemplars of every class seen so far (herded by default).

    Attributes:
        per_class: m, exemplars selected per class (growing memory).
        total: a fixed total budget instead; each class then keeps its first
            ``total // seen classes`` picks (its policy's share of them: PRS), re-trimmed after
            every session.
        label_mode: ``"strict"``: an exemplar keeps the labels known when it was stored (the
            labels of the session(s) that selected it); ``"official"``: the released code's
            behaviour, which re-reads the ground truth of every class from the exemplar's
            session up to the current one, future classes included.
        selections: class -> source positions in the policy's priority order.
        labels: source position -> class indices known when stored.
        sessions: source position -> index of the session that first stored it.
        image_refs: source position -> image reference (checked against the data on load).
        class_counts: class -> its images in the session that learned it (``n_c``), recorded
            for policies whose slots depend on it (PRS).
        data: source position -> the row a method stored with the exemplar (DER++'s logits
            over the classes seen when it was stored); none for most methods.
    """

    per_class: int = 0
    total: int | None = None
    label_mode: str = "strict"
    selections: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    labels: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    sessions: dict[int, int] = dataclasses.field(default_factory=dict)
    image_refs: dict[int, str] = dataclasses.field(default_factory=dict)
    class_counts: dict[int, int] = dataclasses.field(default_factory=dict)
    data: dict[int, list[float]] = dataclasses.field(default_factory=dict)

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
        features: np.ndarray | torch.Tensor | None,
        source_labels: np.ndarray,
        image_refs: Sequence[str],
        policy: MemoryPolicy | None = None,
        seed: int = 0,
    ) -> None:
        """Select exemplars of the session's new classes from its own training images.

        Args:
            session: the session that just ended.
            session_indices: ``(n,)`` source positions of the session's training images
                (exemplars of earlier sessions excluded).
            features: ``(n, F)`` pooled backbone features of those images, without augmentation
                (None for a policy that needs none).
            source_labels: ``(N, C)`` label matrix of the training source.
            image_refs: the training source's image references.
            policy: the memory policy; default herding.
            seed: the seed of the policy's randomness (random sampling, tie-breaks).
        """
        if not self.enabled:
            return
        policy = policy or get_policy("herding")
        session_indices = np.asarray(session_indices, dtype=np.int64)
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        if features is not None and len(features) != len(session_indices):
            raise MlcilError(
                f"memory update: {len(features)} feature rows for {len(session_indices)} images"
            )
        new_classes = list(session.new_classes)
        labels = source_labels[session_indices][:, new_classes]
        counts = [int(n) for n in labels.astype(bool).sum(axis=0)]
        if policy.needs_class_counts:
            self.class_counts.update(zip(new_classes, counts, strict=True))
        quota = self.quota(session.num_seen)
        slots = policy.slots(counts, quota)
        rows = policy.select(Candidates(labels, features, slots, seed))
        for class_index, class_rows in zip(new_classes, rows, strict=True):
            picks = [int(session_indices[r]) for r in class_rows]
            self.selections[class_index] = picks
            for position in picks:
                known = self.labels.setdefault(position, [])
                # An image picked again (another class, or a later session of protocol A) is
                # stored once; it also carries the labels of the session that picked it now.
                own = [c for c in session.new_classes if source_labels[position, c]]
                self.labels[position] = sorted(set(known) | set(own))
                self.sessions.setdefault(position, session.index)
                self.image_refs[position] = image_refs[position]
        self._trim(session.num_seen, policy)
        logger.info(
            "memory after session %d: %d images (%d per class, %s)",
            session.index,
            len(self),
            quota,
            policy.name,
        )

    def _trim(self, num_seen_classes: int, policy: MemoryPolicy) -> None:
        """Fixed budget: keep each class's first slots of picks and drop unreferenced images."""
        if self.total is None:
            return
        quota = self.quota(num_seen_classes)
        classes = list(self.selections)
        counts = [self.class_counts.get(c, 0) for c in classes]
        slots = dict(zip(classes, policy.slots(counts, quota), strict=True))
        self.selections = {c: picks[: slots[c]] for c, picks in self.selections.items()}
        kept = {p for picks in self.selections.values() for p in picks}
        for store in (self.labels, self.sessions, self.image_refs, self.data):
            for position in [p for p in store if p not in kept]:
                del store[position]

    # --- per-exemplar data (a method's row stored with each exemplar) -----------------------

    def positions_without_data(self) -> np.ndarray:
        """Sorted positions of the stored images that have no data row yet."""
        return np.array([p for p in sorted(self.labels) if p not in self.data], dtype=np.int64)

    def set_data(self, positions: np.ndarray, rows: np.ndarray) -> None:
        """Store one data row per position (float32 values, kept exactly)."""
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2 or len(rows) != len(positions):
            raise MlcilError(
                f"exemplar data: {rows.shape} rows for {len(positions)} exemplars, expected "
                "one row each"
            )
        for position, row in zip(positions, rows, strict=True):
            if int(position) not in self.labels:
                raise MlcilError(f"exemplar data for position {int(position)}, not in memory")
            self.data[int(position)] = [float(v) for v in row]

    def data_matrix(self, positions: np.ndarray) -> np.ndarray | None:
        """``(n, E)`` float32 rows of ``positions``, NaN where a row is shorter than the widest
        (or missing); None when no exemplar has data."""
        if not self.data:
            return None
        width = max(len(row) for row in self.data.values())
        matrix = np.full((len(positions), width), np.nan, dtype=np.float32)
        for index, position in enumerate(positions):
            row = self.data.get(int(position))
            if row is not None:
                matrix[index, : len(row)] = row
        return matrix

    def data_tensors(self) -> dict[str, torch.Tensor]:
        """The data rows as float32 tensors named by position (for a safetensors file)."""
        return {
            str(position): torch.tensor(row, dtype=torch.float32)
            for position, row in sorted(self.data.items())
        }

    def load_data_tensors(self, tensors: dict[str, torch.Tensor], where: str = "memory") -> None:
        """The inverse of :meth:`data_tensors` (every position must be a stored exemplar)."""
        data: dict[int, list[float]] = {}
        for name, tensor in tensors.items():
            if not name.isdigit() or int(name) not in self.labels or tensor.ndim != 1:
                raise DataError(f"{where}: {name!r} is no exemplar's data row of this memory")
            if tensor.dtype != torch.float32:
                raise DataError(f"{where}: row {name!r} is {tensor.dtype}, not float32")
            data[int(name)] = [float(v) for v in tensor.tolist()]
        self.data = data

    def check_data_rows(self, widths: Sequence[int], where: str = "memory") -> None:
        """Refuse data rows a method could not have stored: every exemplar must have one, of
        ``widths[s]`` finite values, ``s`` the session that stored it (DER++: the logits over
        the classes seen then).

        Raises:
            DataError: naming the first exemplar whose row is missing, of another width, or not
                finite.
        """
        for position in sorted(self.labels):
            row = self.data.get(position)
            session = self.sessions.get(position, -1)
            expected = widths[session] if 0 <= session < len(widths) else None
            if row is None:
                raise DataError(
                    f"{where}: exemplar {position} ({self.image_refs.get(position)}) has no "
                    "stored row: the file is missing or short; restore it from a copy"
                )
            if len(row) != expected or not np.isfinite(row).all():
                problem = "non-finite values" if len(row) == expected else f"{len(row)} values"
                raise DataError(
                    f"{where}: the row of exemplar {position} holds {problem}, expected "
                    f"{expected} finite values (the outputs of session {session}); the file is "
                    "damaged: restore it from a copy"
                )

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
        """The plain-data form saved as JSON (the per-exemplar data rows apart: see
        :meth:`data_tensors`)."""
        result: dict[str, Any] = {
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
        if self.class_counts:  # only where used: a herding memory's file is what it always was
            result["class_counts"] = {str(c): n for c, n in sorted(self.class_counts.items())}
        return result

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
            counts = data.get("class_counts", {})
            memory.class_counts = {int(c): int(n) for c, n in counts.items()}
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

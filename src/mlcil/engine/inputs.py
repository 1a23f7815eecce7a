"""What the engine receives: a frozen per-run data view and the entry point's runtime.

:class:`RunData` holds what a run reads (its splits, class names, sessions, seed, transforms and
batch sizes) and makes a session's training set and the loaders from them; :class:`RunInputs`
adds the run's settings, the :class:`~mlcil.runtime.Runtime` an entry point made, and how the
method is built. :class:`mlcil.experiment.Experiment`, above the engine, checks a config and
builds both; no engine function takes an experiment (tests/unit/test_architecture.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlcil.config.schema import RunConfig
from mlcil.data import ImageSource
from mlcil.data.sessions import TargetedImages, session_test_set, session_train_set
from mlcil.memory import ExemplarMemory
from mlcil.methods.base import Method, SessionContext
from mlcil.protocol import Session
from mlcil.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class RunData:
    """A run's data as the engine reads it, fixed once.

    Attributes:
        train_source: the training split (labels over ``class_names``).
        test_source: the test split.
        class_names: every class, in arrival order.
        sessions: the sessions in order.
        seed: the run's seed (every epoch's and pass's seed derives from it).
        train_transform: the training images' transform (augmentation).
        eval_transform: the un-augmented transform of evaluation and the memory's passes.
        overlap: ``data.overlap``, which images a session trains on.
        batch_size: the global batch (``train.batch_size``).
        eval_batch_size: images per evaluation batch.
    """

    train_source: ImageSource
    test_source: ImageSource
    class_names: tuple[str, ...]
    sessions: tuple[Session, ...]
    seed: int
    train_transform: Callable[..., torch.Tensor]
    eval_transform: Callable[..., torch.Tensor]
    overlap: str
    batch_size: int
    eval_batch_size: int

    def train_set(self, session: Session, memory: ExemplarMemory) -> tuple[TargetedImages, int]:
        """The session's training images followed by the exemplars, and how many are its own."""
        exemplar_indices, exemplar_targets = memory.targets(
            self.train_source.labels, session, self.sessions
        )
        train_set = session_train_set(
            self.train_source,
            session,
            self.sessions,
            self.train_transform,
            overlap=self.overlap,
            extra_indices=exemplar_indices,
            extra_targets=exemplar_targets,
        )
        return train_set, len(train_set) - len(exemplar_indices)

    def context(
        self, session: Session, train_set: TargetedImages, runtime: Runtime
    ) -> SessionContext:
        """What the method may use while ``session`` starts and ends."""
        return SessionContext(
            session=session,
            sessions=list(self.sessions),
            train_set=train_set,
            train_source=self.train_source,
            runtime=runtime,
            seed=self.seed,
            # Each process loads its share of the global batch (train.batch_size).
            batch_size=max(self.batch_size // runtime.world_size, 1),
        )

    def eval_loader(self, dataset: TargetedImages, runtime: Runtime) -> DataLoader:
        return runtime.loader(dataset, self.eval_batch_size, shuffle=False)

    def test_loader(self, session: Session, runtime: Runtime) -> DataLoader:
        """The test images of the classes seen after ``session``, un-augmented, in order."""
        test_set = session_test_set(self.test_source, session.seen_classes, self.eval_transform)
        return self.eval_loader(test_set, runtime)

    def plain_images(
        self, indices: np.ndarray, source: ImageSource | None = None
    ) -> TargetedImages:
        """Images at ``indices`` of the training split (or ``source``) with the evaluation
        transform (no augmentation) and empty targets."""
        targets = np.zeros((len(indices), 1), dtype=np.float32)
        source = source or self.train_source
        return TargetedImages(source, indices, targets, self.eval_transform)


class MethodFactory(Protocol):
    """Builds the run's method with a fresh network on the run's device."""

    def __call__(self, load_weights: bool = True) -> Method: ...


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """Everything a run's engine receives.

    Attributes:
        config: the run's settings (training, memory, names; the data is read from ``data``).
        data: the frozen data view.
        runtime: the process's runtime, made once by the entry point.
        build_method: the configured method with a fresh network (``load_weights=False``:
            the weights are left as initialised, a checkpoint is loaded next).
    """

    config: RunConfig
    data: RunData
    runtime: Runtime
    build_method: MethodFactory

    def new_memory(self) -> ExemplarMemory:
        memory = self.config.memory
        return ExemplarMemory(
            per_class=memory.per_class, total=memory.total, label_mode=memory.labels
        )

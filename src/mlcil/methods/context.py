"""What a method is given and returns while it trains: batches, session contexts, step and
epoch positions, extra phases, exemplar sets and optimisation (the data side of the surface in
:mod:`mlcil.methods.base`, which re-exports every name here)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mlcil.data.base import ImageSource
from mlcil.data.sessions import TargetedImages
from mlcil.errors import MlcilError
from mlcil.inference import infer
from mlcil.protocol import Session
from mlcil.runtime import Runtime, derive_seed

# The name of a session's main fit in ``StepInfo.phase`` and ``EpochInfo.phase``.
MAIN_PHASE = "main"


@dataclasses.dataclass
class Batch:
    """One training batch. ``targets`` cover every class of the dataset; columns of classes not
    labelled in this session are 0 (label absence), so methods slice ``[:, :seen]``.

    ``exemplar_data`` is ``(B, E)`` only for a method that ``stores_exemplar_data``, once some
    exemplar has data: each replayed exemplar's stored row, NaN-padded to the widest, and all
    NaN for the session's own images. ``exemplar`` marks the rows that are replayed exemplars
    (their labels are the stored ones, not the session's): None when unknown (a batch built by
    hand), read as "no row is an exemplar"."""

    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    targets: torch.Tensor  # (B, num_classes) 0/1 float
    exemplar_data: torch.Tensor | None = None  # (B, E) float32, NaN where none
    exemplar: torch.Tensor | None = None  # (B,) bool

    @classmethod
    def from_items(cls, items: Sequence[torch.Tensor]) -> Batch:
        """A batch from a training loader's collated items: ``(images, targets, exemplar)``
        or ``(images, targets, exemplar, exemplar data)`` (:class:`TrainingRows`)."""
        images, targets, exemplar, *data = items
        return cls(images, targets, data[0] if data else None, exemplar)

    def to(self, device: torch.device) -> Batch:
        data, exemplar = self.exemplar_data, self.exemplar
        return Batch(
            self.images.to(device, non_blocking=True),
            self.targets.to(device, non_blocking=True),
            None if data is None else data.to(device, non_blocking=True),
            None if exemplar is None else exemplar.to(device, non_blocking=True),
        )


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """Where ``Method.after_step`` is called: after optimiser step ``step`` (0-based) of
    ``steps`` in ``epoch`` of ``session``, in the main fit or the method's extra ``phase``."""

    session: Session
    phase: str
    epoch: int
    step: int
    steps: int


@dataclasses.dataclass(frozen=True)
class EpochInfo:
    """Where ``Method.after_epoch`` is called: ``epoch`` (0-based, counted on over the session's
    phases) of ``epochs`` is finished; ``means`` are its loss parts' means per step."""

    session: Session
    phase: str
    epoch: int
    epochs: int
    means: dict[str, float]


@dataclasses.dataclass(frozen=True)
class ExtraPhase:
    """A second, short fit of a session after its main one (``Method.extra_phase``).

    Attributes:
        name: what logs and ``StepInfo.phase`` call it.
        rows: rows of the session context's ``train_set``: this phase's whole training set
            (held out of the main fit unless ``holds_out`` is False).
        epochs: its epochs, numbered on after the main fit's (seeds and checkpoint names).
        trains_network: False: the network stays in eval mode (batch-norm statistics frozen)
            and only the phase's own parameters learn, their gradients averaged over processes.
        holds_out: True (BiC): the main fit never sees ``rows``; False: the main fit trains on
            every row and the phase trains on ``rows`` again afterwards (all of them allowed).
    """

    name: str
    rows: np.ndarray
    epochs: int
    trains_network: bool = False
    holds_out: bool = True


@dataclasses.dataclass
class ExemplarSet:
    """The exemplar memory after the session's update, as ``prepare_prediction`` sees it.

    Attributes:
        positions: ``(n,)`` sorted source positions of the stored images.
        targets: ``(n, seen classes)`` 0/1, the labels replay trains them with.
        compute_features: ``(n, F)`` pooled backbone features of their un-augmented images in
            eval mode; the engine runs that pass only when :meth:`features` is first called.
    """

    positions: np.ndarray
    targets: torch.Tensor
    compute_features: Callable[[], torch.Tensor]
    _features: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False)

    def features(self) -> torch.Tensor:
        if self._features is None:
            self._features = self.compute_features()
        return self._features


class TrainingRows(Dataset):
    """A training set whose items also say whether they are replayed exemplars, and carry one
    float row each when given (a method's exemplar data): ``(image, target, exemplar[, row])``."""

    def __init__(
        self, dataset: TargetedImages, own_images: int, rows: np.ndarray | None = None
    ) -> None:
        if rows is not None and len(rows) != len(dataset):
            raise MlcilError(f"{len(rows)} data rows for a training set of {len(dataset)} images")
        self.dataset = dataset
        self.own_images = own_images
        self.rows = None if rows is None else np.asarray(rows, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, ...]:
        image, target = self.dataset[item]
        exemplar = torch.tensor(item >= self.own_images)
        if self.rows is None:
            return image, target, exemplar
        return image, target, exemplar, torch.from_numpy(self.rows[item])


@dataclasses.dataclass
class StepOutput:
    """The loss to minimise and its parts (detached) for logging."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]


@dataclasses.dataclass
class Optimization:
    """What ``configure_optimization`` returns: stepped once per batch by the engine."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_clip_norm: float | None = None  # clip the global gradient norm to this; None: never


@dataclasses.dataclass
class SessionContext:
    """What a method may use while a session starts or ends.

    Attributes:
        session: the session being learned.
        sessions: the run's whole plan of sessions.
        train_set: the session's training images (its own, then the exemplars) with targets.
        train_source: the whole training split (for dataset-level statistics).
        runtime: device, precision and data loaders.
        seed: the run's seed.
        batch_size: images per forward pass of a method's own passes, per process.
        own_images: the first ``own_images`` rows of ``train_set`` are the session's own
            images, the rest replayed exemplars; None: every row is the session's own.
        exemplar_data: ``(rows, E)`` the data stored with each exemplar row (NaN elsewhere),
            for a method that ``stores_exemplar_data``; None when there is none.
    """

    session: Session
    sessions: Sequence[Session]
    train_set: TargetedImages
    train_source: ImageSource
    runtime: Runtime
    seed: int
    batch_size: int
    own_images: int | None = None
    exemplar_data: np.ndarray | None = None

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def exemplar_rows(self) -> np.ndarray:
        """Rows of ``train_set`` that are replayed exemplars."""
        own = len(self.train_set) if self.own_images is None else self.own_images
        return np.arange(own, len(self.train_set))

    def autocast(self) -> AbstractContextManager:
        return self.runtime.autocast()

    def training_data(self) -> Dataset:
        """What a fit loads: ``train_set``, its items extended with each row's exemplar flag
        and the exemplar data rows (:class:`TrainingRows`, read by :meth:`Batch.from_items`)."""
        own = len(self.train_set) if self.own_images is None else self.own_images
        return TrainingRows(self.train_set, own, self.exemplar_data)

    def restricted(self, rows: np.ndarray) -> SessionContext:
        """This context over some rows of its training set (taken in ascending order)."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) and (rows[0] < 0 or rows[-1] >= len(self.train_set)):
            raise MlcilError(f"rows {rows[0]}..{rows[-1]} outside a set of {len(self.train_set)}")
        full = self.train_set
        subset = TargetedImages(full.source, full.indices[rows], full.targets[rows], full.transform)
        own = None if self.own_images is None else int((rows < self.own_images).sum())
        data = None if self.exemplar_data is None else self.exemplar_data[rows]
        return dataclasses.replace(self, train_set=subset, own_images=own, exemplar_data=data)

    def batches(self, phase: int | str) -> Iterator[Batch]:
        """One pass over the training set with an epoch's augmentation and shuffling.

        Randomness is re-seeded from ``(run seed, session, phase)``, so a pass is reproducible on
        its own; a method names each of its passes' streams (``phase="mymethod/statistics"``,
        kept in a module-level ``*_STREAM`` constant) so that none coincides with an epoch's.
        Under data parallelism each process reads its shard: combine what a pass computes with
        ``runtime.gather_rows``.
        """
        for items in self._pass_loader(phase, self.training_data()):
            yield Batch.from_items(items).to(self.runtime.device)

    def _pass_loader(self, phase: int | str, dataset: Dataset) -> DataLoader:
        phase_seed = derive_seed(self.seed, self.session.index, phase)
        self.runtime.seed_process(phase_seed)
        return self.runtime.loader(dataset, self.batch_size, shuffle=True, seed=phase_seed)

    def score_pass(self, phase: int | str, score: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
        """``score(batch)`` rows over one :meth:`batches` pass, from every process.

        With one process the rows come in the pass's order; with several, every training image
        once, in dataset order (the sampler's padding dropped), identical on every rank.
        """
        loader = self._pass_loader(phase, self.train_set)

        def step(images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"rows": score(Batch(images, targets).to(self.runtime.device))}

        rows = infer(loader, step, self.runtime).get("rows")
        return torch.zeros(0) if rows is None else torch.from_numpy(rows)

"""The surface every method implements, and the pieces methods share.

A method owns its network (and, when it distils, a frozen copy of the previous session's one),
its optimisation and its loss; the engine owns the loop, precision, devices, data loading,
evaluation, exemplar memory and checkpoints. The whole surface, each with its default
(docs/methods-api.md walks through it):

- ``training_step(batch) -> StepOutput``: the loss of one batch and its named parts (required).
- ``build_network(model, image_size, load_weights)`` (class method): the registered
  ``model.network``.
- ``begin_session(context)``: grow the network (one head for the new classes).
- ``configure_optimization(train, session, steps)``: Adam and OneCycle (docs/method.md).
- ``after_step(step)`` / ``after_epoch(epoch)``: after every optimiser step / finished epoch
  (nothing).
- ``extra_phase(context)``: a second, short fit per session on rows held out of the first
  (None), trained by ``phase_step`` under ``configure_phase_optimization``.
- ``stores_exemplar_data`` / ``exemplar_data(images)``: a row stored with every new exemplar
  and replayed in ``Batch.exemplar_data`` (off).
- ``prepare_prediction(exemplars)``: after the memory update, before evaluation (nothing).
- ``predict(images) -> logits``: the prediction rule of evaluation and ``mlcil predict`` (the
  network's logits).
- ``end_session(context)``: keep what the next session needs (a frozen copy of the network when
  ``keeps_old_network``).
- ``restored_targets(images)``: the old-class labels the method adds, for diagnostics (None).
- ``state_dict()`` / ``load_state_dict()``: the method's plain data, JSON ({}).
- ``state_tensors()`` / ``load_state_tensors()``: the method's tensors, safetensors ({}).
- ``restore(session)`` / ``resume_session(session, teacher)``: re-enter after a checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mlcil.config.schema import LossConfig, ModelConfig, Params, TrainConfig
from mlcil.data.base import ImageSource
from mlcil.data.sessions import TargetedImages
from mlcil.errors import MlcilError
from mlcil.inference import infer
from mlcil.losses import asymmetric_loss, token_distillation_weight
from mlcil.models import IncrementalNetwork, NetworkOutput, build_network
from mlcil.optim import decay_groups, one_cycle
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
    NaN for the session's own images."""

    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    targets: torch.Tensor  # (B, num_classes) 0/1 float
    exemplar_data: torch.Tensor | None = None  # (B, E) float32, NaN where none

    def to(self, device: torch.device) -> Batch:
        data = self.exemplar_data
        return Batch(
            self.images.to(device, non_blocking=True),
            self.targets.to(device, non_blocking=True),
            None if data is None else data.to(device, non_blocking=True),
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
        rows: rows of the session context's ``train_set``: held out of the main fit, they are
            this phase's whole training set.
        epochs: its epochs, numbered on after the main fit's (seeds and checkpoint names).
        trains_network: False: the network stays in eval mode (batch-norm statistics frozen)
            and only the phase's own parameters learn, their gradients averaged over processes.
    """

    name: str
    rows: np.ndarray
    epochs: int
    trains_network: bool = False


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


class RowData(Dataset):
    """A training set whose items also carry one float row each: ``(image, target, row)``."""

    def __init__(self, dataset: TargetedImages, rows: np.ndarray) -> None:
        if len(rows) != len(dataset):
            raise MlcilError(f"{len(rows)} data rows for a training set of {len(dataset)} images")
        self.dataset = dataset
        self.rows = np.asarray(rows, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, target = self.dataset[item]
        return image, target, torch.from_numpy(self.rows[item])


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
        """What a fit loads: ``train_set``, its items extended with the exemplar data rows."""
        if self.exemplar_data is None:
            return self.train_set
        return RowData(self.train_set, self.exemplar_data)

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

    def batches(self, phase: int) -> Iterator[Batch]:
        """One pass over the training set with an epoch's augmentation and shuffling.

        Randomness is re-seeded from ``(run seed, session, phase)``, so a pass is reproducible on
        its own; a method picks a ``phase`` distinct from epoch numbers for each of its passes.
        Under data parallelism each process reads its shard: combine what a pass computes with
        ``runtime.gather_rows``.
        """
        for items in self._pass_loader(phase, self.training_data()):
            yield Batch(*items).to(self.runtime.device)

    def _pass_loader(self, phase: int, dataset: Dataset) -> DataLoader:
        phase_seed = derive_seed(self.seed, self.session.index, phase)
        self.runtime.seed_process(phase_seed)
        return self.runtime.loader(dataset, self.batch_size, shuffle=True, seed=phase_seed)

    def score_pass(self, phase: int, score: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
        """``score(batch)`` rows over one :meth:`batches` pass, from every process.

        With one process the rows come in the pass's order; with several, every training image
        once, in dataset order (the sampler's padding dropped), identical on every rank.
        """
        loader = self._pass_loader(phase, self.train_set)

        def step(images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"rows": score(Batch(images, targets).to(self.runtime.device))}

        rows = infer(loader, step, self.runtime).get("rows")
        return torch.zeros(0) if rows is None else torch.from_numpy(rows)


class Method:
    """Base class. Subclasses set ``name`` and ``Params`` and implement ``training_step``.

    Attributes:
        name: registry name used by configs.
        Params: the method's own hyperparameters (YAML ``method:`` section).
        keeps_old_network: keep a frozen copy of the network after each session.
        single_session: learn every class at once (joint training) instead of the protocol.
        needs_memory: refuse to run without exemplar memory.
        stores_exemplar_data: the engine stores ``exemplar_data`` with every new exemplar.
        loss_parts: the parts of the loss ``training_step`` reports from the second session on.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    # The named parts ``training_step`` reports once there is old knowledge (the registry
    # smoke test checks them, so a method states its own loss wiring in its own file).
    loss_parts: ClassVar[frozenset[str]] = frozenset({"asl"})
    keeps_old_network: ClassVar[bool] = False
    single_session: ClassVar[bool] = False
    needs_memory: ClassVar[bool] = False
    stores_exemplar_data: ClassVar[bool] = False

    def __init__(self, params: Any, network: IncrementalNetwork, loss: LossConfig) -> None:
        self.params = params
        self.network = network
        self.loss_config = loss
        self.old_network: IncrementalNetwork | None = None
        self.session: Session | None = None
        # Set by the experiment that builds the method (None when built by hand, e.g. in tests):
        # the teacher's precision follows it.
        self.runtime: Runtime | None = None

    # --- the surface the engine calls ---------------------------------------------------------

    @classmethod
    def build_network(
        cls, model: ModelConfig, image_size: int, load_weights: bool = True
    ) -> IncrementalNetwork:
        """The network this method trains: by default the registered ``model.network``."""
        return build_network(model, image_size, load_weights=load_weights)

    def begin_session(self, context: SessionContext) -> None:
        """Grow the network for the session's new classes."""
        self.session = context.session
        self.network.add_session(len(context.session.new_classes))

    def configure_optimization(
        self, train: TrainConfig, session: Session, total_steps: int
    ) -> Optimization:
        """Adam with coupled weight decay on 2+-d tensors and OneCycle (docs/method.md,
        optimisation)."""
        learning_rate = train.lr_for(session.index)
        groups = self.parameter_groups()
        # The fused kernel (one launch for every tensor) where all parameters live on a GPU.
        parameters = [p for group in groups for p in group["params"]]
        fused = (bool(parameters) and all(p.is_cuda for p in parameters)) or None
        optimizer = torch.optim.Adam(
            groups, lr=learning_rate, weight_decay=train.weight_decay, fused=fused
        )
        scheduler = one_cycle(optimizer, learning_rate, total_steps, train.pct_start)
        return Optimization(optimizer, scheduler, train.grad_clip_norm)

    def training_step(self, batch: Batch) -> StepOutput:
        raise NotImplementedError

    def after_step(self, step: StepInfo) -> None:
        """After every optimiser step, in the main fit and in the extra phase; default nothing.

        What this changes must be in ``state_dict``/``state_tensors`` to survive a resume: a
        mid-session checkpoint is written after the hooks of every step it covers."""

    def after_epoch(self, epoch: EpochInfo) -> None:
        """After every finished epoch, before its checkpoint; default nothing (an epoch cut by
        SIGTERM is finished, and hooked, after the resume)."""

    def extra_phase(self, context: SessionContext) -> ExtraPhase | None:
        """A second, short fit after the main one (BiC's bias correction); default None.

        Called after ``begin_session``, and again when a run resumes inside the session, so it
        must depend on ``context`` alone (draw randomness from ``context.seed``). The phase's
        rows are held out of the main fit; ``phase_step`` trains on them under
        ``configure_phase_optimization``; its epochs follow the main fit's (checkpoints, seeds).
        """
        del context
        return None

    def configure_phase_optimization(
        self, phase: ExtraPhase, train: TrainConfig, session: Session, total_steps: int
    ) -> Optimization:
        """The extra phase's optimiser and schedule (required with an extra phase)."""
        raise NotImplementedError(f"{type(self).__name__} has an extra phase {phase.name!r}")

    def phase_step(self, phase: ExtraPhase, batch: Batch) -> StepOutput:
        """The loss of one batch of the extra phase (required with an extra phase)."""
        raise NotImplementedError(f"{type(self).__name__} has an extra phase {phase.name!r}")

    @torch.no_grad()
    def exemplar_data(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, E)`` rows to store with new exemplars (``stores_exemplar_data`` only).

        Called right after the session's training (and memory selection) on the new exemplars'
        un-augmented images in eval mode; each row is kept as stored for the rest of the run and
        replayed in ``Batch.exemplar_data``."""
        raise NotImplementedError(f"{type(self).__name__} stores no exemplar data")

    def prepare_prediction(self, exemplars: ExemplarSet) -> None:
        """After the session's memory update, before its evaluation; default nothing.

        A prediction rule built from the exemplars (iCaRL's nearest mean) computes it here and
        returns it from ``state_tensors``, so that ``mlcil eval`` and ``predict`` find it."""
        del exemplars

    def end_session(self, context: SessionContext) -> None:
        """Freeze a copy of the network as the teacher of the next session, if needed."""
        if self.keeps_old_network:
            self.old_network = frozen_copy(self.network)

    @torch.no_grad()
    def restored_targets(self, images: torch.Tensor) -> torch.Tensor | None:
        """``(B, old classes)`` 0/1 old-class labels this method would add to these images'
        targets in the current session (knowledge restore), or None if it adds none.

        Diagnostics compare them with the labels the protocol hid."""
        del images
        return None

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The prediction rule: logits ``(B, seen classes)`` whose sigmoids are the scores that
        evaluation ranks and ``mlcil predict`` thresholds; default the network's logits."""
        return self.network(images).logits

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state of the method itself (not the network's weights): saved as JSON in
        every checkpoint and reported per session in ``metrics.json``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The method's own tensors (not the network's weights), saved as
        ``method.safetensors`` in every checkpoint; default none."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what ``state_tensors`` saved (loaded on the CPU)."""
        if tensors:
            raise MlcilError(
                f"the checkpoint holds method tensors ({', '.join(sorted(tensors)[:3])}, ...) "
                f"that method {self.name!r} does not keep"
            )

    def restore(self, session: Session) -> None:
        """Re-enter the state right after ``session`` ended, once its weights are loaded."""
        self.session = session
        if self.keeps_old_network:
            self.old_network = frozen_copy(self.network)

    def resume_session(self, session: Session, teacher: IncrementalNetwork | None) -> None:
        """Re-enter ``session`` mid-training (a mid-session checkpoint): the network is already
        grown and loaded, ``teacher`` is the frozen previous network, the method state loaded."""
        self.session = session
        self.old_network = teacher if self.keeps_old_network else None

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The network's trainable parameters, split for weight decay."""
        return decay_groups(self.network.parameters())

    # --- shared pieces ------------------------------------------------------------------------

    @property
    def seen(self) -> int:
        assert self.session is not None, "begin_session was not called"
        return self.session.num_seen

    @property
    def num_old(self) -> int:
        assert self.session is not None, "begin_session was not called"
        return self.session.num_old

    @property
    def num_old_sessions(self) -> int:
        return self.network.num_sessions - 1

    def classification_loss(
        self, logits: torch.Tensor, targets: torch.Tensor, images: int | None = None
    ) -> torch.Tensor:
        """The asymmetric loss with the run's settings: ``R x`` its per-image mean (over
        ``images``, default the rows given: a term over some rows of a batch passes the batch's).

        ``R`` is ``loss.reference_images``. Every term a method returns is a per-image mean over
        its micro-batch; the engine weighs each micro-batch by its share of the global step (see
        :func:`mlcil.distributed.loss_scale`), so the optimised objective is
        ``R x ASL_sum(global batch) / global batch + lambda x other_mean`` whatever the layout.
        """
        config = self.loss_config
        total = asymmetric_loss(
            logits,
            targets,
            gamma_neg=config.gamma_neg,
            gamma_pos=config.gamma_pos,
            clip=config.clip,
        )
        return self.per_reference_images(total, len(logits) if images is None else images)

    def per_reference_images(self, summed: torch.Tensor, images: int) -> torch.Tensor:
        """A loss summed over ``images`` images, as ``R x`` its per-image mean."""
        return summed * (self.loss_config.reference_images / max(images, 1))

    def teacher(
        self, images: torch.Tensor, stage_indices: Sequence[int] | None = None
    ) -> NetworkOutput | None:
        """The old network's outputs on the same images, or None in the first session."""
        if self.old_network is None:
            return None
        precision = self.runtime.teacher_autocast() if self.runtime else contextlib.nullcontext()
        with torch.no_grad(), precision:
            return self.old_network(images, stage_indices=stage_indices)

    def incremental_weight(self, base_weight: float) -> float:
        """``base_weight * sqrt(seen / new)``: the adaptive distillation weight that grows with
        the ratio of old knowledge to new."""
        assert self.session is not None
        return token_distillation_weight(base_weight, self.seen, len(self.session.new_classes))


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode (batch-norm statistics frozen, dropout off) for a method's own
    pass that needs gradients (oEWC's Fisher); its mode is put back afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def frozen_copy(network: nn.Module) -> Any:
    """A deep copy in eval mode with gradients off: the teacher for the next session."""
    teacher = copy.deepcopy(network)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher

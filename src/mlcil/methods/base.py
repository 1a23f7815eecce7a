"""The surface every method implements, and the pieces methods share.

A method owns its network (and, when it distils, a frozen copy of the previous session's one),
its optimisation and its loss; the engine owns the loop, precision, devices, data loading,
evaluation, exemplar memory and checkpoints. The whole surface, each with a default:

- ``build_network(model, image_size, load_weights)`` (class method): the network to train.
- ``begin_session(context)``: grow the network; prepare per-session state.
- ``configure_optimization(train, session, steps)``: optimiser, schedule, gradient clipping.
- ``training_step(batch) -> StepOutput``: the loss of one batch and its named parts.
- ``end_session(context)``: keep what the next session needs (the old network).
- ``predict(images) -> logits`` over the classes seen so far.
- ``state_dict()`` / ``load_state_dict()`` / ``restore(session)``: checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from mlcil.config.schema import LossConfig, ModelConfig, Params, TrainConfig
from mlcil.data.base import ImageSource
from mlcil.data.sessions import TargetedImages
from mlcil.inference import infer
from mlcil.losses import asymmetric_loss, token_distillation_weight
from mlcil.models import IncrementalNetwork, NetworkOutput, build_network
from mlcil.optim import decay_groups, one_cycle
from mlcil.protocol import Session
from mlcil.runtime import Runtime, derive_seed


@dataclasses.dataclass
class Batch:
    """One training batch. ``targets`` cover every class of the dataset; columns of classes not
    labelled in this session are 0 (label absence), so methods slice ``[:, :seen]``."""

    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    targets: torch.Tensor  # (B, num_classes) 0/1 float

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.images.to(device, non_blocking=True), self.targets.to(device, non_blocking=True)
        )


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
    """

    session: Session
    sessions: Sequence[Session]
    train_set: TargetedImages
    train_source: ImageSource
    runtime: Runtime
    seed: int
    batch_size: int

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def autocast(self) -> AbstractContextManager:
        return self.runtime.autocast()

    def batches(self, phase: int) -> Iterator[Batch]:
        """One pass over the training set with an epoch's augmentation and shuffling.

        Randomness is re-seeded from ``(run seed, session, phase)``, so a pass is reproducible on
        its own; a method picks a ``phase`` distinct from epoch numbers for each of its passes.
        Under data parallelism each process reads its shard: combine what a pass computes with
        ``runtime.gather_rows``.
        """
        for images, targets in self._pass_loader(phase):
            yield Batch(images, targets).to(self.runtime.device)

    def _pass_loader(self, phase: int) -> DataLoader:
        phase_seed = derive_seed(self.seed, self.session.index, phase)
        self.runtime.seed_process(phase_seed)
        return self.runtime.loader(self.train_set, self.batch_size, shuffle=True, seed=phase_seed)

    def score_pass(self, phase: int, score: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
        """``score(batch)`` rows over one :meth:`batches` pass, from every process.

        With one process the rows come in the pass's order; with several, every training image
        once, in dataset order (the sampler's padding dropped), identical on every rank.
        """
        loader = self._pass_loader(phase)

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
        """Logits ``(B, seen classes)``."""
        return self.network(images).logits

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state of the method itself (not the network's weights)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

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

    def classification_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The asymmetric loss with the run's settings: ``R x`` its per-image mean.

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
        return self.per_reference_images(total, len(logits))

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


def frozen_copy(network: nn.Module) -> Any:
    """A deep copy in eval mode with gradients off: the teacher for the next session."""
    teacher = copy.deepcopy(network)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher

"""The surface every method implements, and the pieces methods share.

A method owns its network (and, when it distils, a frozen copy of the previous session's one) and
returns a loss; the engine owns optimisation, precision, devices, data loading, evaluation,
exemplar memory and checkpoints. The whole surface:

- ``begin_session(context)``: grow the network; prepare per-session state (e.g. the DPL threshold).
- ``training_step(batch) -> StepOutput``: the loss of one batch and its named parts.
- ``end_session(context)``: keep what the next session needs (the old network).
- ``predict(images) -> logits`` over the classes seen so far.
- ``state_dict()`` / ``load_state_dict()``: the method's own plain-data state for checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar

import torch
from torch import nn

from mlcil.config import LossConfig
from mlcil.losses import asymmetric_loss, token_distillation_weight
from mlcil.models.base import IncrementalNetwork, NetworkOutput
from mlcil.protocol import Session


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
class SessionContext:
    """What a method may use while a session starts or ends.

    Attributes:
        session: the session being learned.
        train_batches: a callable returning an iterator over the session's training batches,
            with the same augmentation and shuffling as an epoch (KRT's DPL threshold pass).
        device: where the network lives.
        autocast: a factory for the engine's mixed-precision context.
        label_density: the dataset's labels per image per class (DPL's prior).
    """

    session: Session
    train_batches: Callable[[], Iterator[Batch]]
    device: torch.device
    autocast: Callable[[], AbstractContextManager] = nullcontext
    label_density: float = 0.0


@dataclasses.dataclass
class NoParams:
    """Hyperparameters of a method that has none of its own."""


class Method:
    """Base class. Subclasses set ``name`` and ``Params`` and implement ``training_step``.

    Attributes:
        name: registry name used by configs.
        Params: dataclass of the method's own hyperparameters (YAML ``method:`` section).
        keeps_old_network: keep a frozen copy of the network after each session.
        single_session: learn every class at once (joint training) instead of the protocol.
        needs_memory: refuse to run without exemplar memory.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    keeps_old_network: ClassVar[bool] = False
    single_session: ClassVar[bool] = False
    needs_memory: ClassVar[bool] = False

    def __init__(self, params: Any, network: IncrementalNetwork, loss: LossConfig) -> None:
        self.params = params
        self.network = network
        self.loss_config = loss
        self.old_network: IncrementalNetwork | None = None
        self.session: Session | None = None

    # --- the surface the engine calls ---------------------------------------------------------

    def begin_session(self, context: SessionContext) -> None:
        """Grow the network for the session's new classes."""
        self.session = context.session
        self.network.add_session(len(context.session.new_classes))

    def training_step(self, batch: Batch) -> StepOutput:
        raise NotImplementedError

    def end_session(self, context: SessionContext) -> None:
        """Freeze a copy of the network as the teacher of the next session, if needed."""
        if self.keeps_old_network:
            self.old_network = frozen_copy(self.network)

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

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters split for weight decay (KRT-SPEC section 8): tensors with two or
        more dimensions (weights, tokens, positional embedding) decay, 1-d ones do not. Frozen
        parameters are left out."""
        decay, no_decay = [], []
        for parameter in self.network.parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

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
        """The asymmetric loss with the run's settings (sum reduction)."""
        config = self.loss_config
        return asymmetric_loss(
            logits,
            targets,
            gamma_neg=config.gamma_neg,
            gamma_pos=config.gamma_pos,
            clip=config.clip,
        )

    def teacher(self, images: torch.Tensor, return_stages: bool = False) -> NetworkOutput | None:
        """The old network's outputs on the same images, or None in the first session."""
        if self.old_network is None:
            return None
        with torch.no_grad():
            return self.old_network(images, return_stages=return_stages)

    def incremental_weight(self, base_weight: float) -> float:
        """``base_weight * sqrt(seen / new)``: the adaptive distillation weight that KRT (and
        PODNet) grow with the ratio of old knowledge to new."""
        assert self.session is not None
        return token_distillation_weight(base_weight, self.seen, len(self.session.new_classes))


def frozen_copy(network: nn.Module) -> Any:
    """A deep copy in eval mode with gradients off: the teacher for the next session."""
    teacher = copy.deepcopy(network)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher

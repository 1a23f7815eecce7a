"""The surface every method implements, and the pieces methods share.

A method owns its network (and, when it distils, a frozen copy of the previous session's one),
its optimisation and its loss; the engine owns the loop, precision, devices, data loading,
evaluation, exemplar memory and checkpoints. The whole surface, each with its default
(docs/methods-api.md walks through it):

- ``training_step(batch) -> StepOutput``: the loss of one batch and its named parts (required).
  Its classification term follows the old-class rule (``method.old_classes``,
  :mod:`mlcil.old_classes`): ``rule_targets(batch)`` then ``classification_term(logits,
  targets, parts)``; ``begin_session`` chooses the pseudo rules' thresholds.
- ``build_network(model, image_size, load_weights)`` (class method): the registered
  ``model.network``.
- ``begin_session(context)``: grow the network (one head for the new classes).
- ``configure_optimization(train, session, steps)``: Adam and OneCycle (docs/method.md).
- ``after_step(step)`` / ``after_epoch(epoch)``: after every optimiser step / finished epoch
  (nothing).
- ``before_optimizer_step(optimizer, batches)``: after the step's backward passes (gradients
  unscaled, averaged over processes), before clipping and ``optimizer.step()``: A-GEM's
  projection, SAM's second pass (nothing).
- ``extra_phase(context)``: a second, short fit per session, on rows held out of the first or
  (``ExtraPhase.holds_out=False``) on rows the first also trained on (None), trained by
  ``phase_step`` under ``configure_phase_optimization``.
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
import logging
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, ClassVar

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from mlcil.config.schema import LossConfig, ModelConfig, Params, TrainConfig
from mlcil.data.base import training_label_density
from mlcil.errors import MlcilError
from mlcil.losses import asymmetric_loss, sigmoid_distillation, token_distillation_weight
from mlcil.methods.context import (
    MAIN_PHASE,
    Batch,
    EpochInfo,
    ExemplarSet,
    ExtraPhase,
    Optimization,
    SessionContext,
    StepInfo,
    StepOutput,
    TrainingRows,
)
from mlcil.models import IncrementalNetwork, NetworkOutput, build_network
from mlcil.old_classes import (
    RULES_WITH_TEACHER,
    RULES_WITH_THRESHOLD,
    OldClassRule,
    OldClassTargets,
    PseudoLabelParams,
    Thresholds,
    choose_thresholds,
    old_class_targets,
)
from mlcil.optim import decay_groups, one_cycle
from mlcil.protocol import Session
from mlcil.pseudo_labels import target_positives_per_image
from mlcil.runtime import Runtime

logger = logging.getLogger(__name__)

__all__ = [
    "MAIN_PHASE",
    "Batch",
    "EpochInfo",
    "ExemplarSet",
    "ExtraPhase",
    "Method",
    "MethodParams",
    "Optimization",
    "SessionContext",
    "StepInfo",
    "StepOutput",
    "TrainingRows",
    "eval_mode",
    "frozen_copy",
]

# The DPL threshold pass draws its own shuffle and augmentation, seeded apart from every epoch's.
THRESHOLD_PASS_STREAM = "old-classes/threshold-pass"


class MethodParams(Params):
    """Base of a method's own hyperparameters: the old-class rule every method honours
    (``method.old_classes``, :mod:`mlcil.old_classes`). A method's ``Params`` sets its default
    rule and lists the rules it cannot honour, with why, in ``refused_old_classes``."""

    old_classes: OldClassRule = "negative"
    # pseudo-ignore: old entries per image left above the negative threshold (restored or
    # undecided), in multiples of the DPL target; the rest are confident negatives.
    negative_margin: Annotated[float, Field(ge=1)] = 2.0

    refused_old_classes: ClassVar[dict[str, str]] = {}

    @field_validator("old_classes")
    @classmethod
    def _rule_honoured(cls, rule: str) -> str:
        reason = cls.refused_old_classes.get(rule)
        if reason is not None:
            raise ValueError(f"this method cannot honour it ({reason})")
        return rule


class Method:
    """Base class. Subclasses set ``name`` and ``Params`` and implement ``training_step``.

    Attributes:
        name: registry name used by configs.
        Params: the method's own hyperparameters (YAML ``method:`` section).
        keeps_old_network: keep a frozen copy of the network after each session (it is kept
            anyway when the old-class rule reads the previous network).
        distills_old_outputs: the method's own loss distils the old classes' outputs, so the
            ``distill`` rule only takes the old columns out of its hard-label loss.
        single_session: learn every class at once (joint training) instead of the protocol.
        needs_memory: refuse to run without exemplar memory.
        stores_exemplar_data: the engine stores ``exemplar_data`` with every new exemplar.
        loss_parts: the parts of the loss ``training_step`` reports from the second session on.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = MethodParams
    # The named parts ``training_step`` reports once there is old knowledge (the registry
    # smoke test checks them, so a method states its own loss wiring in its own file).
    loss_parts: ClassVar[frozenset[str]] = frozenset({"asl"})
    keeps_old_network: ClassVar[bool] = False
    distills_old_outputs: ClassVar[bool] = False
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
        self.thresholds: Thresholds | None = None  # the session's, for the pseudo rules

    # --- the surface the engine calls ---------------------------------------------------------

    @classmethod
    def build_network(
        cls, model: ModelConfig, image_size: int, load_weights: bool = True
    ) -> IncrementalNetwork:
        """The network this method trains: by default the registered ``model.network``."""
        return build_network(model, image_size, load_weights=load_weights)

    def begin_session(self, context: SessionContext) -> None:
        """Grow the network for the session's new classes; under a ``pseudo`` rule, choose the
        session's thresholds from the previous network's scores of its training images."""
        self.session = context.session
        self.network.add_session(len(context.session.new_classes))
        previous, self.thresholds = self.thresholds, None
        if self.old_network is not None and self.old_class_rule in RULES_WITH_THRESHOLD:
            self.thresholds = self.choose_thresholds(context, previous)

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

    def before_optimizer_step(
        self, optimizer: torch.optim.Optimizer, batches: Sequence[Batch]
    ) -> None:
        """After the backward passes of an optimiser step and before ``optimizer.step()``, in
        the main fit and in the extra phase; default nothing.

        The gradients of ``optimizer``'s parameters are final here (unscaled under fp16,
        averaged over processes): change them in place (A-GEM's projection onto a reference
        gradient), or run more passes over ``batches`` (the step's micro-batches, on the CPU as
        loaded) before the step (SAM). Gradient clipping (``Optimization.grad_clip_norm``)
        follows this hook."""
        del optimizer, batches

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
        rows are held out of the main fit unless ``ExtraPhase.holds_out`` is False;
        ``phase_step`` trains on them under ``configure_phase_optimization``; its epochs follow
        the main fit's (checkpoints, seeds).
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
        if self.keeps_teacher:
            self.old_network = frozen_copy(self.network)

    @torch.no_grad()
    def restored_targets(self, images: torch.Tensor) -> torch.Tensor | None:
        """``(B, old classes)`` 0/1 old-class labels this method would add to these images'
        targets in the current session (knowledge restore), or None if it adds none: under a
        ``pseudo`` rule, the old classes the previous network scores above the DPL threshold.

        Diagnostics compare them with the labels the protocol hid."""
        if self.old_network is None or self.thresholds is None:
            return None
        scores = self.previous_logits(images).float().sigmoid()
        return (scores > self.thresholds.positive).float()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The prediction rule: logits ``(B, seen classes)`` whose sigmoids are the scores that
        evaluation ranks and ``mlcil predict`` thresholds; default the network's logits."""
        return self.network(images).logits

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state of the method itself (not the network's weights): saved as JSON in
        every checkpoint and reported per session in ``metrics.json``. The base holds the
        session's thresholds under a ``pseudo`` rule; an override adds its own keys to it."""
        if self.old_class_rule not in RULES_WITH_THRESHOLD:
            return {}
        thresholds = self.thresholds
        state: dict[str, Any] = {"pseudo_label_threshold": thresholds and thresholds.positive}
        if self.old_class_rule == "pseudo-ignore":
            state["negative_threshold"] = thresholds and thresholds.negative
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` saved (an override calls this too)."""
        positive = state.get("pseudo_label_threshold")
        negative = state.get("negative_threshold")
        self.thresholds = None if positive is None else Thresholds(positive, negative)

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
        if self.keeps_teacher:
            self.old_network = frozen_copy(self.network)

    def resume_session(self, session: Session, teacher: IncrementalNetwork | None) -> None:
        """Re-enter ``session`` mid-training (a mid-session checkpoint): the network is already
        grown and loaded, ``teacher`` is the frozen previous network, the method state loaded."""
        self.session = session
        self.old_network = teacher if self.keeps_teacher else None

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The network's trainable parameters, split for weight decay."""
        return decay_groups(self.network.parameters())

    # --- the old-class rule (mlcil.old_classes) ----------------------------------------------

    @property
    def old_class_rule(self) -> str | None:
        """``method.old_classes``; None for a method whose ``Params`` do not derive from
        :class:`MethodParams` (a plugin written before the rule): its own step decides."""
        return getattr(self.params, "old_classes", None)

    @property
    def pseudo_label_threshold(self) -> float | None:
        """The session's DPL threshold under a ``pseudo`` rule, else None."""
        return None if self.thresholds is None else self.thresholds.positive

    @property
    def keeps_teacher(self) -> bool:
        """Whether a frozen copy of the network is kept after each session: the method's own
        need, or a rule that reads the previous network."""
        return self.keeps_old_network or self.old_class_rule in RULES_WITH_TEACHER

    def previous_logits(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, old classes)`` the previous network's logits that the rules read (a method
        whose predictions correct the logits, BiC, corrects them here)."""
        teacher = self.teacher(images)
        assert teacher is not None, "no previous network in the first session"
        return teacher.logits

    def rule_targets(self, batch: Batch, old_logits: torch.Tensor | None = None) -> OldClassTargets:
        """The batch's classification targets over the seen classes under the rule.

        ``old_logits``: the previous network's logits on the batch if the step has them
        (:meth:`previous_logits` is called otherwise, when the rule needs them)."""
        rule = self.old_class_rule or "negative"
        if old_logits is None and rule in RULES_WITH_TEACHER and self.old_network is not None:
            old_logits = self.previous_logits(batch.images)
        targets = batch.targets[:, : self.seen]
        thresholds = self.thresholds
        return old_class_targets(
            rule, targets, self.num_old, batch.exemplar, old_logits, thresholds
        )

    def classification_term(
        self,
        logits: torch.Tensor,
        targets: OldClassTargets,
        parts: dict[str, torch.Tensor],
        images: int | None = None,
    ) -> torch.Tensor:
        """The classification loss under the rule, recording its parts in ``parts``: the run's
        ASL over the entries the rule keeps (``asl``); for ``distill`` in a method without its
        own distillation of old outputs, binary cross-entropy towards the previous network's
        scores on the old columns (``kd``); under a pseudo rule, the restored positives per
        image (``pseudo_pos``). Each term is ``R x`` a per-image mean over ``images``."""
        first, mask = targets.first_column, targets.mask
        loss = self.classification_loss(
            logits[:, first:],
            targets.targets[:, first:],
            len(logits) if images is None else images,
            mask=None if mask is None else mask[:, first:],
        )
        parts["asl"] = loss.detach()
        old = self.num_old
        if self.old_class_rule in RULES_WITH_THRESHOLD and old:
            parts["pseudo_pos"] = (targets.targets[:, :old].sum() / len(logits)).detach()
        if targets.soft_logits is not None and not self.distills_old_outputs:
            summed = sigmoid_distillation(logits[:, :old], targets.soft_logits, targets.soft_mask)
            distillation = self.per_reference_images(
                summed, len(logits) if images is None else images
            )
            loss = loss + distillation
            parts["kd"] = distillation.detach()
        return loss

    def choose_thresholds(self, context: SessionContext, previous: Thresholds | None) -> Thresholds:
        """One pass of the previous network over the session's training images (its own
        seeded shuffle and augmentation, every process's shard; ``threshold_images: own``: the
        session's own images only), then the rule's thresholds."""

        def old_class_scores(batch: Batch) -> torch.Tensor:
            return self.previous_logits(batch.images).float().sigmoid()

        params = self.params
        settings = params if isinstance(params, PseudoLabelParams) else PseudoLabelParams()
        scored = context
        if settings.threshold_images == "own" and context.own_images is not None:
            scored = context.restricted(np.arange(context.own_images))
        old_scores = scored.score_pass(THRESHOLD_PASS_STREAM, old_class_scores)
        target = target_positives_per_image(self.label_density(context), self.num_old)
        margin = getattr(params, "negative_margin", 2.0)
        rule = self.old_class_rule or "pseudo"
        thresholds = choose_thresholds(rule, old_scores, target, settings, margin, previous)
        achieved = (old_scores > thresholds.positive).sum().item() / max(len(old_scores), 1)
        logger.info(
            "session %d: pseudo-label threshold %.4f gives %.3f old positives per image "
            "(target %.3f over %d images)",
            context.session.index,
            thresholds.positive,
            achieved,
            target,
            len(old_scores),
        )
        if thresholds.negative is not None:
            undecided = (old_scores > thresholds.negative).sum().item() / max(len(old_scores), 1)
            logger.info(
                "session %d: negative threshold %.4f leaves %.3f old entries per image restored "
                "or undecided",
                context.session.index,
                thresholds.negative,
                undecided,
            )
        return thresholds

    def label_density(self, context: SessionContext) -> float:
        """DPL's prior: the configured value, the dataset's published one, or the training
        split's own labels per image per class (docs/method.md, pseudo-labels)."""
        configured = getattr(self.params, "label_density", None)
        if configured is not None:
            return float(configured)
        source = context.train_source
        if source.label_density is not None:
            return source.label_density
        return training_label_density(source.labels)

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
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        images: int | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The asymmetric loss with the run's settings: ``R x`` its per-image mean (over
        ``images``, default the rows given: a term over some rows of a batch passes the batch's),
        over the entries of ``mask`` (default all).

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
            mask=mask,
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

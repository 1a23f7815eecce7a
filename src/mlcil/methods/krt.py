"""KRT: Knowledge Restore and Transfer (Dong et al., ICCV 2023), docs/method.md.

- Knowledge restore: dynamic pseudo-labels (DPL). Before a session, the frozen previous network
  scores the session's training images on the old classes and a threshold is chosen so that the
  mean number of old positives per image matches the dataset's label density; during training,
  every old class scored above it becomes a positive target (positives are only ever added).
- Knowledge transfer: the ICA network (``model.network: ica``) with one KR token and head per
  session, and a token distillation loss that keeps the old sessions' embeddings close to the
  previous network's, weighted by ``lambda * sqrt(seen / new)``.
- Replay comes from the engine's exemplar memory (``memory.per_class``).

Ablations by configuration: ``pseudo_labels: false``, ``token_loss_weight: 0``,
``model.network: linear`` (no ICA: the pooled embedding is distilled instead of tokens), and
``memory.per_class: 0``.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from mlcil.config.schema import Params
from mlcil.data.base import training_label_density
from mlcil.losses import token_distillation
from mlcil.methods.base import Batch, Method, SessionContext, StepOutput
from mlcil.methods.registry import register_method
from mlcil.pseudo_labels import (
    apply_pseudo_labels,
    dpl_threshold,
    iterative_dpl_threshold,
    target_positives_per_image,
)

logger = logging.getLogger(__name__)


# The DPL threshold pass draws its own shuffle and augmentation, seeded apart from every epoch's.
THRESHOLD_PASS_PHASE = 1_000_002


class KRTParams(Params):
    pseudo_labels: bool = True  # dynamic pseudo-labels (knowledge restore)
    threshold_search: Literal["exact", "iterative"] = "exact"  # iterative: the released search
    # Iterative search only: start each session from the previous session's threshold (0.8 in
    # the first incremental session), as the release does; False restarts at 0.8 every time.
    threshold_warm_start: bool = False
    # The iterative search's float32 rounding of the mean count: the release's formula on CPU
    # tensors ("cpu") or as its CUDA runs computed it ("cuda"); see iterative_dpl_threshold.
    threshold_arithmetic: Literal["cpu", "cuda"] = "cpu"
    token_loss_weight: Annotated[float, Field(ge=0)] = 100.0  # 100 COCO B0-C10, 300 B40, 80 VOC
    # DPL prior rho, labels per image per class; None: the dataset's published value (COCO
    # 2.9/80, VOC 1.4/20), else the training split's own label density.
    label_density: Annotated[float, Field(gt=0, le=1)] | None = None


@register_method
class KRT(Method):
    name = "krt"
    Params = KRTParams
    keeps_old_network = True
    loss_parts = frozenset({"asl", "pseudo_pos", "token"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pseudo_label_threshold: float | None = None

    def begin_session(self, context: SessionContext) -> None:
        super().begin_session(context)
        previous, self.pseudo_label_threshold = self.pseudo_label_threshold, None
        if self.old_network is not None and self.params.pseudo_labels:
            self.pseudo_label_threshold = self._choose_threshold(context, previous)

    def _choose_threshold(self, context: SessionContext, previous: float | None = None) -> float:
        assert self.old_network is not None

        def old_class_scores(batch: Batch) -> torch.Tensor:
            output = self.teacher(batch.images)
            assert output is not None
            return output.logits.float().sigmoid()

        # Every process scores its shard; the threshold comes from all of them, so all agree.
        old_scores = context.score_pass(THRESHOLD_PASS_PHASE, old_class_scores)
        target = target_positives_per_image(self.label_density(context), self.num_old)
        if self.params.threshold_search == "exact":
            threshold = dpl_threshold(old_scores, target)
        else:
            warm = self.params.threshold_warm_start and previous is not None
            start = previous if warm and previous is not None else 0.8
            arithmetic = self.params.threshold_arithmetic
            threshold = iterative_dpl_threshold(
                old_scores, target, start=start, arithmetic=arithmetic
            )
        achieved = (old_scores > threshold).sum().item() / max(len(old_scores), 1)
        logger.info(
            "session %d: pseudo-label threshold %.4f gives %.3f old positives per image "
            "(target %.3f over %d images)",
            context.session.index,
            threshold,
            achieved,
            target,
            len(old_scores),
        )
        return threshold

    def label_density(self, context: SessionContext) -> float:
        """DPL's prior: the configured value, the dataset's published one, or the training
        split's own labels per image per class (docs/method.md, pseudo-labels)."""
        if self.params.label_density is not None:
            return float(self.params.label_density)
        source = context.train_source
        if source.label_density is not None:
            return source.label_density
        return training_label_density(source.labels)

    def training_step(self, batch: Batch) -> StepOutput:
        output = self.network(batch.images)
        targets = batch.targets[:, : self.seen]
        parts: dict[str, torch.Tensor] = {}
        needs_teacher = self.pseudo_label_threshold is not None or self.params.token_loss_weight > 0
        teacher = self.teacher(batch.images) if needs_teacher else None
        if teacher is not None and self.pseudo_label_threshold is not None:
            targets = apply_pseudo_labels(
                targets, teacher.logits.float().sigmoid(), self.pseudo_label_threshold
            )
            parts["pseudo_pos"] = (targets[:, : self.num_old].sum() / len(targets)).detach()
        loss = self.classification_loss(output.logits, targets)
        parts["asl"] = loss.detach()
        if teacher is not None and self.params.token_loss_weight > 0:
            assert self.old_network is not None
            old_sessions = self.num_old_sessions
            token_loss = token_distillation(
                self.old_network.retained_embedding(teacher, old_sessions),
                self.network.retained_embedding(output, old_sessions),
            )
            loss = loss + self.incremental_weight(self.params.token_loss_weight) * token_loss
            parts["token"] = token_loss.detach()
        return StepOutput(loss, parts)

    @torch.no_grad()
    def restored_targets(self, images: torch.Tensor) -> torch.Tensor | None:
        """The old classes scored above the session's DPL threshold by the previous network."""
        if self.old_network is None or self.pseudo_label_threshold is None:
            return None
        teacher = self.teacher(images)
        assert teacher is not None
        scores = teacher.logits.float().sigmoid()
        return (scores > self.pseudo_label_threshold).float()

    def state_dict(self) -> dict[str, Any]:
        return {"pseudo_label_threshold": self.pseudo_label_threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pseudo_label_threshold = state.get("pseudo_label_threshold")

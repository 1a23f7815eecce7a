"""KRT: Knowledge Restore and Transfer (Dong et al., ICCV 2023), docs/method.md.

- Knowledge restore: dynamic pseudo-labels (DPL), the old-class rule ``pseudo`` (the default;
  mlcil.old_classes). Before a session, the frozen previous network scores the session's
  training images on the old classes and a threshold is chosen so that the mean number of old
  positives per image matches the dataset's label density; during training, every old class
  scored above it becomes a positive target (positives are only ever added), every other
  absent label a negative. Any other rule applies as well (``pseudo-ignore``: negatives only
  where the previous network is sure, docs/baselines.md).
- Knowledge transfer: the ICA network (``model.network: ica``) with one KR token and head per
  session, and a token distillation loss that keeps the old sessions' embeddings close to the
  previous network's, weighted by ``lambda * sqrt(seen / new)``.
- Replay comes from the engine's exemplar memory (``memory.per_class``).

Ablations by configuration: ``old_classes: negative`` (no DPL), ``token_loss_weight: 0``,
``model.network: linear`` (no ICA: the pooled embedding is distilled instead of tokens), and
``memory.per_class: 0``.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field, model_validator

from mlcil.losses import token_distillation
from mlcil.methods.base import Batch, Method, MethodParams, StepOutput
from mlcil.methods.registry import register_method
from mlcil.old_classes import OldClassRule, PseudoLabelParams


class KRTParams(MethodParams, PseudoLabelParams):
    old_classes: OldClassRule = "pseudo"  # dynamic pseudo-labels (knowledge restore)
    token_loss_weight: Annotated[float, Field(ge=0)] = 100.0  # 100 COCO B0-C10, 300 B40, 80 VOC

    @model_validator(mode="before")
    @classmethod
    def _pseudo_labels_switch(cls, data: Any) -> Any:
        """``pseudo_labels: true/false`` (configs written before ``old_classes``) is read as
        ``old_classes: pseudo/negative``."""
        if isinstance(data, dict) and "pseudo_labels" in data:
            data = dict(data)
            switch = data.pop("pseudo_labels")
            if not isinstance(switch, bool):
                raise ValueError(f"pseudo_labels must be true or false, got {switch!r}")
            if "old_classes" in data and data["old_classes"] != (
                "pseudo" if switch else "negative"
            ):
                raise ValueError("pseudo_labels and old_classes disagree: give old_classes only")
            data["old_classes"] = "pseudo" if switch else "negative"
        return data


@register_method
class KRT(Method):
    name = "krt"
    Params = KRTParams
    keeps_old_network = True
    loss_parts = frozenset({"asl", "pseudo_pos", "token"})

    def training_step(self, batch: Batch) -> StepOutput:
        output = self.network(batch.images)
        needs_teacher = self.keeps_teacher and (
            self.params.token_loss_weight > 0 or self.old_class_rule != "negative"
        )
        teacher = self.teacher(batch.images) if needs_teacher else None
        targets = self.rule_targets(batch, None if teacher is None else teacher.logits)
        parts: dict[str, torch.Tensor] = {}
        loss = self.classification_term(output.logits, targets, parts)
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

    def state_dict(self) -> dict[str, Any]:
        # KRT reports its threshold in every session, None where it restores no label.
        return {"pseudo_label_threshold": None, **super().state_dict()}

"""Learning without Forgetting for multi-label outputs.

On the old classes the network matches the previous network's sigmoid outputs (binary
cross-entropy with soft targets, summed over classes and taken per image times
``loss.reference_images`` like the ASL, so the weight is scale-free and batch-independent), on
every image. The asymmetric loss covers what the old-class rule gives it: by default
(``distill``, LwF's own) only the session's new classes, the only ones labelled; ``negative``
adds the old classes as negatives, as the released baselines of KRT's comparison do.
"""

from __future__ import annotations

import torch

from mlcil.losses import sigmoid_distillation
from mlcil.methods.base import Batch, Method, MethodParams, StepOutput
from mlcil.methods.registry import register_method
from mlcil.old_classes import OldClassRule


class LwFParams(MethodParams):
    old_classes: OldClassRule = "distill"
    distillation_weight: float = 1.0


@register_method
class LwF(Method):
    name = "lwf"
    Params = LwFParams
    keeps_old_network = True
    distills_old_outputs = True
    loss_parts = frozenset({"asl", "kd"})

    def training_step(self, batch: Batch) -> StepOutput:
        logits = self.network(batch.images).logits  # (B, seen)
        old = self.num_old
        teacher = self.teacher(batch.images)
        targets = self.rule_targets(batch, None if teacher is None else teacher.logits)
        parts: dict[str, torch.Tensor] = {}
        loss = self.classification_term(logits, targets, parts)
        if teacher is not None:
            summed = sigmoid_distillation(logits[:, :old], teacher.logits)
            distillation = self.per_reference_images(summed, len(logits))
            loss = loss + self.params.distillation_weight * distillation
            parts["kd"] = distillation.detach()
        return StepOutput(loss, parts)

"""Learning without Forgetting for multi-label outputs.

The asymmetric loss covers only the session's new classes (the only ones labelled); on the old
classes the network instead matches the previous network's sigmoid outputs (binary
cross-entropy with soft targets, summed over classes and taken per image times
``loss.reference_images`` like the ASL, so the weight is scale-free and batch-independent).
"""

from __future__ import annotations

from mlcil.config.schema import Params
from mlcil.losses import sigmoid_distillation
from mlcil.methods.base import Batch, Method, StepOutput
from mlcil.methods.registry import register_method


class LwFParams(Params):
    distillation_weight: float = 1.0


@register_method
class LwF(Method):
    name = "lwf"
    Params = LwFParams
    keeps_old_network = True
    loss_parts = frozenset({"asl", "kd"})

    def training_step(self, batch: Batch) -> StepOutput:
        logits = self.network(batch.images).logits  # (B, seen)
        old = self.num_old
        loss = self.classification_loss(logits[:, old:], batch.targets[:, old : self.seen])
        parts = {"asl": loss.detach()}
        teacher = self.teacher(batch.images)
        if teacher is not None:
            summed = sigmoid_distillation(logits[:, :old], teacher.logits)
            distillation = self.per_reference_images(summed, len(logits))
            loss = loss + self.params.distillation_weight * distillation
            parts["kd"] = distillation.detach()
        return StepOutput(loss, parts)

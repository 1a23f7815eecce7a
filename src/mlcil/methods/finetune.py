"""Fine-tuning: the lower bound.

Each session grows a head and trains on the session's labels alone with the asymmetric loss over
every seen class. Old classes are absent from the new images' labels, so they are pushed towards
"no", which is exactly the label-absence forgetting the other methods fight.
"""

from __future__ import annotations

from mlcil.methods.base import Batch, Method, StepOutput
from mlcil.methods.registry import register_method


@register_method
class Finetune(Method):
    name = "finetune"

    def training_step(self, batch: Batch) -> StepOutput:
        logits = self.network(batch.images).logits  # (B, seen)
        loss = self.classification_loss(logits, batch.targets[:, : self.seen])
        return StepOutput(loss, {"asl": loss.detach()})

"""Fine-tuning: the lower bound.

Each session grows a head and trains on the session's labels alone with the asymmetric loss over
every seen class (the default old-class rule, ``negative``): old classes are absent from the new
images' labels, so they are pushed towards "no", which is exactly the label-absence forgetting the
other methods fight. Any other rule of ``method.old_classes`` applies as well (mlcil.old_classes).
"""

from __future__ import annotations

import torch

from mlcil.methods.base import Batch, Method, StepOutput
from mlcil.methods.registry import register_method


@register_method
class Finetune(Method):
    name = "finetune"

    def training_step(self, batch: Batch) -> StepOutput:
        logits = self.network(batch.images).logits  # (B, seen)
        parts: dict[str, torch.Tensor] = {}
        loss = self.classification_term(logits, self.rule_targets(batch), parts)
        return StepOutput(loss, parts)

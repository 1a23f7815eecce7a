"""PODNet-style pooled-outputs distillation with replay (the KRT authors' own baseline).

POD-spatial keeps the width- and height-pooled maps of every backbone stage close to the previous
network's; POD-flat keeps the pooled embedding's direction. Both weights grow with
``sqrt(seen / new)`` as in PODNet. Exemplar replay is required.
"""

from __future__ import annotations

import dataclasses

from mlcil.losses import pod_flat, pod_spatial
from mlcil.methods.base import Batch, Method, StepOutput
from mlcil.methods.registry import register_method


@dataclasses.dataclass
class PODNetParams:
    spatial_weight: float = 30.0
    flat_weight: float = 30.0


@register_method
class PODNet(Method):
    name = "podnet"
    Params = PODNetParams
    keeps_old_network = True
    needs_memory = True

    def training_step(self, batch: Batch) -> StepOutput:
        output = self.network(batch.images, return_stages=True)
        loss = self.classification_loss(output.logits, batch.targets[:, : self.seen])
        parts = {"asl": loss.detach()}
        teacher = self.teacher(batch.images, return_stages=True)
        if teacher is not None:
            assert teacher.stages is not None and output.stages is not None
            spatial = pod_spatial(teacher.stages, output.stages)
            flat = pod_flat(teacher.pooled, output.pooled)
            loss = (
                loss
                + self.incremental_weight(self.params.spatial_weight) * spatial
                + self.incremental_weight(self.params.flat_weight) * flat
            )
            parts.update(pod_spatial=spatial.detach(), pod_flat=flat.detach())
        return StepOutput(loss, parts)

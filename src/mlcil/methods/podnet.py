"""PODNet-style pooled-outputs distillation with replay (the KRT authors' own baseline).

POD-spatial keeps the width- and height-pooled maps of every backbone stage close to the previous
network's; POD-flat keeps the pooled embedding's direction. Both weights grow with
``sqrt(seen / new)`` as in PODNet. Exemplar replay is required.
"""

from __future__ import annotations

import torch

from mlcil.losses import pod_flat, pod_spatial
from mlcil.methods.base import Batch, Method, MethodParams, StepOutput
from mlcil.methods.registry import register_method


class PODNetParams(MethodParams):
    spatial_weight: float = 30.0
    flat_weight: float = 30.0


@register_method
class PODNet(Method):
    name = "podnet"
    Params = PODNetParams
    keeps_old_network = True
    loss_parts = frozenset({"asl", "pod_spatial", "pod_flat"})
    needs_memory = True

    def distilled_stages(self) -> list[int]:
        """Backbone stages whose maps POD-spatial compares, the feature map aside: every earlier
        stage with stride >= 4 (the stem output duplicates stage 1 in many timm CNNs)."""
        reductions = self.network.backbone.stage_reductions
        return [i for i, stride in enumerate(reductions[:-1]) if stride >= 4]

    def training_step(self, batch: Batch) -> StepOutput:
        stages = self.distilled_stages()
        output = self.network(batch.images, stage_indices=stages)
        teacher = self.teacher(batch.images, stage_indices=stages)
        targets = self.rule_targets(batch, None if teacher is None else teacher.logits)
        parts: dict[str, torch.Tensor] = {}
        loss = self.classification_term(output.logits, targets, parts)
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

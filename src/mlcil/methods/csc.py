"""CSC: Confidence Self-Calibration (Du et al., ECCV 2024), docs/csc.md.

The paper: "Confidence Self-Calibration for Multi-Label Class-Incremental Learning". Written from
its text (its code was announced, not released): where the text leaves a choice open, docs/csc.md
says what mlcil chose.

- Network (``model.network: cigcn``, :mod:`mlcil.models.cigcn`): the class-incremental GCN,
  nodes read off each class's activation map, a learnable label graph that grows by one block
  of rows and columns per session, then an image-specific graph; logits are the activation
  maps' means plus the nodes' classifiers. No co-occurrence counts: nothing to gather before a
  session starts.
- Loss: the run's asymmetric loss on what the old-class rule keeps (the paper's rule,
  ``distill``: the new classes' labels; old classes are not negatives), the sigmoid
  distillation of the old classes' outputs towards the previous network's (``kd``,
  ``distillation_weight``), and, from the second session on, the max-entropy regularisation:
  minus ``entropy_weight`` times the Shannon entropy ``-p log p`` of the old classes' sigmoid
  outputs (``entropy``), which penalises over-confident old-class scores (the false positives
  of partial labels).

Every term is ``R x`` a per-image mean, summed over its classes (the run's ``loss`` section), so
``entropy_weight`` weighs one old class's entropy against one entry of the ASL.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field
from torch.nn import functional

from mlcil.config.schema import LossConfig
from mlcil.errors import ConfigError
from mlcil.losses import sigmoid_distillation
from mlcil.methods.base import Batch, Method, MethodParams, StepOutput
from mlcil.methods.registry import register_method
from mlcil.models import IncrementalNetwork
from mlcil.models.cigcn import CIGCNNetwork
from mlcil.old_classes import OldClassRule


class CSCParams(MethodParams):
    old_classes: OldClassRule = "distill"
    distillation_weight: Annotated[float, Field(ge=0)] = 1.0  # old-class output distillation
    # beta of the max-entropy regularisation (per old class, in units of one ASL entry).
    entropy_weight: Annotated[float, Field(ge=0)] = 0.1


def sigmoid_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``sum -p log p`` over every entry, ``p = sigmoid(logits)``: the paper's Shannon entropy
    of multi-label outputs (each class's confidence ``p`` as one term), float32.

    Largest (``1/e`` per entry) at ``p = 1/e``; 0 at ``p`` = 0 or 1: maximising it pulls
    confident scores away from both ends. ``p log p`` is taken as ``p x log-sigmoid``, exact for
    confident logits."""
    logits = logits.float()
    return -(logits.sigmoid() * functional.logsigmoid(logits)).sum()


@register_method
class CSC(Method):
    """Confidence Self-Calibration: class-incremental GCN, distillation, max-entropy (ECCV 2024)."""

    name = "csc"
    Params = CSCParams
    keeps_old_network = True
    distills_old_outputs = True
    loss_parts = frozenset({"asl", "kd", "entropy"})

    def __init__(self, params: Any, network: IncrementalNetwork, loss: LossConfig) -> None:
        if not isinstance(network, CIGCNNetwork):
            raise ConfigError(
                f"method csc needs model.network: cigcn (its class-incremental graph), got "
                f"{type(network).__name__}"
            )
        super().__init__(params, network, loss)

    def training_step(self, batch: Batch) -> StepOutput:
        logits = self.network(batch.images).logits  # (B, seen)
        teacher = self.teacher(batch.images)
        targets = self.rule_targets(batch, None if teacher is None else teacher.logits)
        parts: dict[str, torch.Tensor] = {}
        loss = self.classification_term(logits, targets, parts)
        if teacher is not None:
            old, images = self.num_old, len(logits)
            summed = sigmoid_distillation(logits[:, :old], teacher.logits)
            distillation = self.per_reference_images(summed, images)
            entropy = self.per_reference_images(sigmoid_entropy(logits[:, :old]), images)
            loss = (
                loss
                + self.params.distillation_weight * distillation
                - self.params.entropy_weight * entropy
            )
            parts.update(kd=distillation.detach(), entropy=entropy.detach())
        return StepOutput(loss, parts)

"""DER++: Dark Experience Replay++ (Buzzega et al., NeurIPS 2020), for multi-label outputs.

Replay in which every exemplar also keeps the logits the network gave it when it was stored
(right after the session that stored it, on its un-augmented image, over the classes seen
then). Whenever an exemplar is replayed the loss adds

- ``alpha`` x the squared error between its current logits and the stored ones (mean over the
  stored classes), and
- ``beta`` x the binary cross-entropy of its current sigmoid outputs against the labels it was
  stored with (the multi-label form of DER++'s cross-entropy on replayed labels: sigmoid and
  BCE instead of softmax);

the session's own images get the run's classification loss (ASL) under the old-class rule (by
default ``negative``: over every seen class, as in replay). Adaptation: the paper fills its
buffer by reservoir sampling along a stream and draws separate buffer batches; here the memory
is chosen at session end by ``memory.policy`` and its exemplars are mixed into the training
batches. Every term is ``R x`` a per-image mean over the
whole batch (``R``: ``loss.reference_images``), so the objective does not depend on how a step
is split, and ``alpha = 0, beta = 1`` with a plain-BCE loss section is replay.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from mlcil.methods.base import Batch, Method, MethodParams, StepOutput
from mlcil.methods.registry import register_method


class DERppParams(MethodParams):
    alpha: Annotated[float, Field(ge=0)] = 0.2  # weight of the stored-logit squared error
    beta: Annotated[float, Field(ge=0)] = 0.5  # weight of the BCE on replayed labels


def logit_replay_error(logits: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Summed over rows: each row's mean squared error between ``logits`` and its ``stored``
    logits, over the columns it stored (NaN columns, and all-NaN rows, count for nothing).

    Args:
        logits: ``(B, C)`` current logits, ``C >=`` the stored width.
        stored: ``(B, E)`` stored logits, NaN-padded.
    """
    width = stored.shape[1]
    present = torch.isfinite(stored)
    difference = logits[:, :width].float() - torch.nan_to_num(stored.float())
    squared = torch.where(present, difference.square(), torch.zeros_like(difference))
    return (squared.sum(dim=1) / present.sum(dim=1).clamp(min=1)).sum()


@register_method
class DERpp(Method):
    """DER++ (Buzzega et al., NeurIPS 2020): replayed labels and stored logits."""

    name = "derpp"
    Params = DERppParams
    needs_memory = True
    stores_exemplar_data = True
    loss_parts = frozenset({"asl", "logit_mse", "replay_bce"})

    @torch.no_grad()
    def exemplar_data(self, images: torch.Tensor) -> torch.Tensor:
        """The logits over the classes seen so far: what DER++ stores with an exemplar."""
        return self.network(images).logits.float()

    def training_step(self, batch: Batch) -> StepOutput:
        logits = self.network(batch.images).logits  # (B, seen)
        targets = batch.targets[:, : self.seen]
        ruled = self.rule_targets(batch)
        stored = batch.exemplar_data
        parts: dict[str, torch.Tensor] = {}
        if stored is None:  # no exemplar has logits yet (the first session)
            return StepOutput(self.classification_term(logits, ruled, parts), parts)
        images = len(logits)
        replayed = torch.isfinite(stored).any(dim=1)  # (B,) rows that are exemplars
        own = ~replayed
        asl = self.classification_term(logits[own], ruled.rows(own), parts, images)
        error = self.per_reference_images(logit_replay_error(logits, stored), images)
        bce = F.binary_cross_entropy_with_logits(
            logits[replayed].float(), targets[replayed].float(), reduction="sum"
        )
        bce = self.per_reference_images(bce, images)
        loss = asl + self.params.alpha * error + self.params.beta * bce
        parts.update(logit_mse=error.detach(), replay_bce=bce.detach())
        return StepOutput(loss, parts)

"""BiC: Large Scale Incremental Learning (Wu et al., CVPR 2019), for multi-label outputs.

From the second session on, the main fit (the session's images and exemplars minus a held-out
part) minimises ``(1 - lambda) x`` the classification loss over the seen classes ``+ lambda x``
distillation on the old ones at temperature ``T`` (BiC's ``lambda = old / seen`` unless
``distillation_weight``). The bias phase, network frozen, then fits the session's ``alpha x
logit + beta`` on its new classes' logits by BCE on the held-out rows (BiC's balanced validation
set, ``validation_rows``); stored pairs correct every later prediction, distillation target and
old logit. Multi-label form: sigmoids and (soft-target) BCE instead of softmax cross-entropy.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from mlcil.config.schema import TrainConfig
from mlcil.losses import sigmoid_distillation
from mlcil.methods.base import (
    Batch,
    ExtraPhase,
    Method,
    MethodParams,
    Optimization,
    SessionContext,
    StepOutput,
)
from mlcil.methods.registry import register_method
from mlcil.protocol import Session
from mlcil.runtime import derive_seed

SPLIT_STREAM = "bic/validation-split"  # the validation split's seed


class BiCParams(MethodParams):
    temperature: Annotated[float, Field(gt=0)] = 2.0  # distillation temperature T
    distillation_weight: Annotated[float, Field(ge=0, le=1)] | None = None  # None: old / seen
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1  # BiC's 9:1 train/validation split
    bias_epochs: Annotated[int, Field(gt=0)] = 2
    bias_lr: Annotated[float, Field(gt=0)] = 1e-3


def correct(logits: torch.Tensor, sizes: list[int], pairs: list[Any]) -> torch.Tensor:
    """``alpha x logit + beta`` on the columns of sessions 1, 2, ..., one pair each, in order."""
    pieces, start = [logits[:, : sizes[0]]], sizes[0]
    for (alpha, beta), size in zip(pairs, sizes[1:], strict=False):
        pieces.append(alpha * logits[:, start : start + size] + beta)
        start += size
    pieces.append(logits[:, start:])
    return torch.cat(pieces, dim=1)


def validation_rows(
    targets: np.ndarray, own_images: int, num_old: int, fraction: float, seed: int
) -> np.ndarray:
    """Rows held out of a session's training set for bias correction: per old class, exemplars,
    and per new class, the session's own rows, ``max(1, round(fraction x`` the mean exemplar
    rows per old class``))`` each (a multi-label row counts for each of its classes)."""
    rows, positive = len(targets), targets > 0
    exemplar = np.arange(rows) >= own_images
    counts = positive[exemplar][:, :num_old].sum(axis=0)
    per_class = max(1, round(fraction * float(counts.mean()))) if num_old else 0
    order, held = np.random.default_rng(seed).permutation(rows), np.zeros(rows, dtype=bool)
    for column in range(positive.shape[1]):
        pool = exemplar if column < num_old else ~exemplar
        missing = per_class - int((held & positive[:, column]).sum())
        if missing > 0:
            free = order[pool[order] & positive[order, column] & ~held[order]]
            held[free[:missing]] = True
    return np.flatnonzero(held)


@register_method
class BiC(Method):
    """BiC (Wu et al., CVPR 2019): distillation, then a bias-correction phase per session."""

    name = "bic"
    Params = BiCParams
    keeps_old_network = True
    distills_old_outputs = True
    needs_memory = True
    loss_parts = frozenset({"asl", "kd"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.corrections: list[list[float]] = []  # [alpha, beta] of sessions 1, 2, ... done
        self.bias: torch.nn.Parameter | None = None  # the session's (alpha, beta), learning

    def begin_session(self, context: SessionContext) -> None:
        super().begin_session(context)
        self.bias = torch.nn.Parameter(torch.tensor([1.0, 0.0])) if self.num_old else None

    def corrected(self, logits: torch.Tensor, current: bool) -> torch.Tensor:
        pairs: list[Any] = [torch.tensor(pair, device=logits.device) for pair in self.corrections]
        if current and self.bias is not None:
            pairs.append(self.bias.to(logits.device))
        return correct(logits.float(), list(self.network.session_sizes), pairs)

    def previous_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The previous network's logits as BiC predicts with them: corrected."""
        return self.corrected(super().previous_logits(images), current=False)

    def training_step(self, batch: Batch) -> StepOutput:
        logits = self.corrected(self.network(batch.images).logits, current=False)
        teacher = self.teacher(batch.images)
        previous = None if teacher is None else self.corrected(teacher.logits, current=False)
        parts: dict[str, torch.Tensor] = {}
        loss = self.classification_term(logits, self.rule_targets(batch, previous), parts)
        if previous is not None:
            old, temperature = self.num_old, self.params.temperature
            soft = sigmoid_distillation(logits[:, :old] / temperature, previous / temperature)
            distillation = self.per_reference_images(soft, len(logits))
            weight = self.params.distillation_weight
            weight = old / self.seen if weight is None else weight
            loss = (1.0 - weight) * loss + weight * distillation
            parts["kd"] = distillation.detach()
        return StepOutput(loss, parts)

    def extra_phase(self, context: SessionContext) -> ExtraPhase | None:
        if self.bias is None or context.own_images is None or not len(context.exemplar_rows):
            return None
        seed = derive_seed(context.seed, context.session.index, SPLIT_STREAM)
        targets, fraction = context.train_set.targets[:, : self.seen], self.params.val_fraction
        rows = validation_rows(targets, context.own_images, self.num_old, fraction, seed)
        return ExtraPhase("bias", rows, self.params.bias_epochs) if len(rows) else None

    def configure_phase_optimization(
        self, phase: ExtraPhase, train: TrainConfig, session: Session, total_steps: int
    ) -> Optimization:
        assert self.bias is not None
        optimizer = torch.optim.Adam([self.bias], lr=self.params.bias_lr)
        return Optimization(optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, 0))

    def phase_step(self, phase: ExtraPhase, batch: Batch) -> StepOutput:
        with torch.no_grad():  # the network is frozen: only alpha and beta learn
            logits = self.network(batch.images).logits
        corrected, targets = self.corrected(logits, True), batch.targets[:, : self.seen].float()
        summed = F.binary_cross_entropy_with_logits(corrected, targets, reduction="sum")
        loss = self.per_reference_images(summed, len(logits))
        return StepOutput(loss, {"bias_bce": loss.detach()})

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.corrected(self.network(images).logits, current=True)

    def end_session(self, context: SessionContext) -> None:
        bias, self.bias = self.state_dict()["bias"], None
        self.corrections += [bias] if bias is not None else []
        super().end_session(context)

    def state_dict(self) -> dict[str, Any]:
        bias = None if self.bias is None else self.bias.detach().cpu().tolist()
        # Copies: the engine keeps each session's state in its results while the list grows.
        corrections = [list(pair) for pair in self.corrections]
        return {"corrections": corrections, "bias": bias, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.corrections = [[float(a), float(b)] for a, b in state.get("corrections", [])]
        bias = state.get("bias")
        self.bias = None if bias is None else torch.nn.Parameter(torch.tensor(bias))

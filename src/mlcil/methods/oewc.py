"""Online EWC (Schwarz et al., "Progress & Compress", ICML 2018; EWC: Kirkpatrick et al., 2017).

After each session the diagonal Fisher information of the network's parameters is estimated on
the session's training images and folded into a running Fisher, ``F <- gamma x F + F_session``;
the parameters at that point become the anchor ``theta*``. Every later step adds the quadratic
penalty ``penalty_weight / 2 x sum_i F_i (theta_i - theta*_i)^2`` to the run's classification
loss over every seen class (as in fine-tuning; no exemplars).

Multi-label form: the Fisher is the empirical one of the multi-label Bernoulli likelihood, the
squared gradient of each image's binary cross-entropy over the seen classes (sigmoid / BCE
instead of softmax cross-entropy), averaged over ``fisher_images`` training images drawn with
the run's seed, one image at a time, with batch-norm statistics frozen. Parameters born after
the anchor (a new session's head) are not penalised.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from mlcil.methods.base import Batch, Method, MethodParams, SessionContext, StepOutput, eval_mode
from mlcil.methods.registry import register_method
from mlcil.models import IncrementalNetwork
from mlcil.protocol import Session
from mlcil.runtime import derive_seed, seed_everything

# The Fisher's image draw and augmentation are seeded apart from every epoch and pass.
FISHER_STREAM = "oewc/fisher"


class OnlineEWCParams(MethodParams):
    penalty_weight: Annotated[float, Field(ge=0)] = 5000.0  # lambda
    gamma: Annotated[float, Field(gt=0, le=1)] = 1.0  # decay of the running Fisher
    fisher_images: Annotated[int, Field(gt=0)] = 512  # images of each session's Fisher estimate


def ewc_penalty(penalised: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``sum_i F_i (theta_i - theta*_i)^2`` over ``(theta, F, theta*)`` triples, in float32."""
    total = torch.zeros((), dtype=torch.float32, device=penalised[0][0].device)
    for theta, weight, star in penalised:
        total = total + (weight * (theta.float() - star).square()).sum()
    return total


@register_method
class OnlineEWC(Method):
    """Online EWC (Schwarz et al., ICML 2018): a running diagonal Fisher, a quadratic penalty."""

    name = "oewc"
    Params = OnlineEWCParams
    loss_parts = frozenset({"asl", "ewc"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fisher: dict[str, torch.Tensor] = {}  # parameter name -> running Fisher
        self.anchor: dict[str, torch.Tensor] = {}  # parameter name -> theta*
        self.penalised: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def begin_session(self, context: SessionContext) -> None:
        super().begin_session(context)
        self.bind_penalty()

    def resume_session(self, session: Session, teacher: IncrementalNetwork | None) -> None:
        super().resume_session(session, teacher)
        self.bind_penalty()

    def bind_penalty(self) -> None:
        """Pair every trainable parameter that has a Fisher with it and its anchor (by
        object, so that the pairs survive the engine's wrapping of the network)."""
        self.penalised = [
            (parameter, self.fisher[name], self.anchor[name])
            for name, parameter in self.network.named_parameters()
            if parameter.requires_grad and name in self.fisher
        ]

    def training_step(self, batch: Batch) -> StepOutput:
        logits = self.network(batch.images).logits
        parts: dict[str, torch.Tensor] = {}
        loss = self.classification_term(logits, self.rule_targets(batch), parts)
        if self.penalised:
            device = logits.device
            if self.penalised[0][1].device != device:  # moved once, after the network moved
                self.penalised = [(p, f.to(device), a.to(device)) for p, f, a in self.penalised]
            penalty = ewc_penalty(self.penalised)
            loss = loss + 0.5 * self.params.penalty_weight * penalty
            parts["ewc"] = penalty.detach()
        return StepOutput(loss, parts)

    def end_session(self, context: SessionContext) -> None:
        session_fisher = self.estimate_fisher(context)
        gamma = self.params.gamma
        decayed = {name: gamma * value for name, value in self.fisher.items()}
        for name, value in session_fisher.items():  # frozen tensors have no new term
            decayed[name] = decayed[name] + value if name in decayed else value
        self.fisher = decayed
        self.anchor = {
            name: parameter.detach().float().cpu().clone()
            for name, parameter in self.network.named_parameters()
            if name in self.fisher
        }
        self.penalised = []
        super().end_session(context)

    def estimate_fisher(self, context: SessionContext) -> dict[str, torch.Tensor]:
        """Mean squared per-image gradient of the BCE over the seen classes, on a seeded draw
        of training images (the same on every process, so no exchange is needed)."""
        seed = derive_seed(context.seed, context.session.index, FISHER_STREAM)
        seed_everything(seed)  # the training transform's augmentation
        rows = np.random.default_rng(seed).permutation(len(context.train_set))
        rows = rows[: self.params.fisher_images]
        named = [(n, p) for n, p in self.network.named_parameters() if p.requires_grad]
        sums = [torch.zeros_like(p, dtype=torch.float32) for _, p in named]
        runtime, seen = context.runtime, self.seen
        with eval_mode(self.network):
            for row in rows:
                image, target = context.train_set[int(row)]
                with context.autocast():
                    logits = self.network(runtime.images_to_device(image[None])).logits
                target = target[None, :seen].to(logits.device)
                nll = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum")
                grads = torch.autograd.grad(nll, [p for _, p in named], allow_unused=True)
                for total, grad in zip(sums, grads, strict=True):
                    if grad is not None:
                        total += grad.detach().float().square()
        count = max(len(rows), 1)
        return {name: (total / count).cpu() for (name, _), total in zip(named, sums, strict=True)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"fisher.{name}": value for name, value in self.fisher.items()}
        tensors.update({f"anchor.{name}": value for name, value in self.anchor.items()})
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.fisher = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("fisher.")}
        self.anchor = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("anchor.")}

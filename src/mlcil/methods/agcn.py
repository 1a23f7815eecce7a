"""AGCN: Augmented Graph Convolutional Network (Du et al., ICME 2022), docs/agcn.md.

The paper: "AGCN: Augmented Graph Convolutional Network for Lifelong Multi-label Image
Recognition"; its journal extension (AGCN++): "Multi-label Continual Learning using Augmented
Graph Convolutional Network".

- Network (``model.network: gcn``): a two-layer GCN over the seen classes' label graph makes one
  classifier per class (ML-GCN style); the graph grows by one block of classes per session.
- Augmented correlation matrix (ACM): when a session starts, one pass over its training images
  collects per-image label evidence: the new classes' given labels and, for the old classes
  (unlabelled in new data), the previous model's sigmoid scores (an exemplar's stored old
  labels count as certain). The new-new block comes from the hard labels, the two inter-task
  blocks from soft-hard pairs, and the old-old block is kept from earlier sessions.
- Loss: the asymmetric loss on the new classes only (old classes are unlabelled, not negative:
  the old-class rule ``distill``, its default; ``method.old_classes`` chooses another);
  from the second session on, LwF-style sigmoid distillation of the old classes' predictions
  (``distillation_weight``) and the relationship-preserving term: the mean squared distance
  between the old classes' GCN classifiers and the previous model's (``relation_weight``).

Multi-label and offline adaptations: ASL (the run's ``loss`` section) instead of the papers'
multi-label soft-margin loss; learnable class embeddings instead of GloVe word vectors (none
offline); the statistics from one pass at session start instead of being accumulated batch by
batch during the first epoch, so the graph is fixed while a session trains and is stored with
the weights (the network's ``correlation`` buffer).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import torch
from pydantic import Field

from mlcil.config.schema import LossConfig, TrainConfig
from mlcil.errors import ConfigError
from mlcil.losses import sigmoid_distillation
from mlcil.methods.base import (
    Batch,
    Method,
    MethodParams,
    Optimization,
    SessionContext,
    StepOutput,
)
from mlcil.methods.registry import register_method
from mlcil.models import IncrementalNetwork
from mlcil.models.gcn import GCNNetwork, GCNOutput
from mlcil.old_classes import OldClassRule
from mlcil.optim import decay_groups, one_cycle
from mlcil.protocol import Session

logger = logging.getLogger(__name__)

# The label-statistics pass draws its own shuffle and augmentation, apart from every epoch's.
STATISTICS_STREAM = "agcn/statistics"


class AGCNParams(MethodParams):
    old_classes: OldClassRule = "distill"
    distillation_weight: Annotated[float, Field(ge=0)] = 1.0  # old-class prediction distillation
    relation_weight: Annotated[float, Field(ge=0)] = 1.0  # relationship-preserving term
    # The GCN (its two layers and the class embeddings) learns at this fraction of the run's lr,
    # as the release gives the GCN its own, lower rate: at the trunk's rate under Adam the
    # classifiers it makes diverge (digits, session 0: 100.0 mAP at 1e-4, 82.6 at 3e-4).
    gcn_lr_scale: Annotated[float, Field(gt=0)] = 0.1


def relation_preserving_loss(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the previous and the current old-class classifiers
    ``(old classes, F)``: the graph's outputs, which carry the classes' relations."""
    if old.shape != new.shape:
        raise ValueError(f"classifier shapes differ: {tuple(old.shape)} vs {tuple(new.shape)}")
    return (new.float() - old.float()).pow(2).mean()


@register_method
class AGCN(Method):
    name = "agcn"
    Params = AGCNParams
    keeps_old_network = True
    distills_old_outputs = True
    loss_parts = frozenset({"asl", "kd", "relation"})

    def __init__(self, params: Any, network: IncrementalNetwork, loss: LossConfig) -> None:
        if not isinstance(network, GCNNetwork):
            raise ConfigError(
                f"method agcn needs model.network: gcn (its classifiers come from the label "
                f"graph), got {type(network).__name__}"
            )
        super().__init__(params, network, loss)

    def begin_session(self, context: SessionContext) -> None:
        super().begin_session(context)
        network = self.network
        assert isinstance(network, GCNNetwork)
        network.set_session_correlation(self.label_evidence(context))
        edges = int((network.adjacency() > 0).sum().item()) - network.num_classes
        logger.info(
            "session %d: label graph over %d classes with %d directed edges",
            context.session.index,
            network.num_classes,
            edges,
        )

    def configure_optimization(
        self, train: TrainConfig, session: Session, total_steps: int
    ) -> Optimization:
        """The default Adam + OneCycle, with the GCN's groups at ``gcn_lr_scale`` x the lr."""
        network = self.network
        assert isinstance(network, GCNNetwork)
        gcn = [*network.gc1.parameters(), *network.gc2.parameters(), *network.heads.parameters()]
        is_gcn = {id(parameter) for parameter in gcn}
        trunk = [p for p in network.parameters() if id(p) not in is_gcn]
        rate = train.lr_for(session.index)
        groups = decay_groups(trunk) + decay_groups(gcn)
        rates = [rate, rate, rate * self.params.gcn_lr_scale, rate * self.params.gcn_lr_scale]
        for group, group_rate in zip(groups, rates, strict=True):
            group["lr"] = group_rate
        optimizer = torch.optim.Adam(groups, lr=rate, weight_decay=train.weight_decay)
        scheduler = one_cycle(optimizer, rates, total_steps, train.pct_start)
        return Optimization(optimizer, scheduler, train.grad_clip_norm)

    def label_evidence(self, context: SessionContext) -> torch.Tensor:
        """``(images, seen)`` per training image: old-class evidence (the previous model's
        sigmoid score, or 1 where a stored label says so), then the new classes' labels."""
        seen, old = self.seen, self.num_old
        if self.old_network is None:  # only given labels: no pass over the images needed
            return torch.from_numpy(context.train_set.targets[:, :seen]).float()

        def evidence(batch: Batch) -> torch.Tensor:
            teacher = self.teacher(batch.images)
            assert teacher is not None
            targets = batch.targets[:, :seen].float()
            soft = torch.maximum(teacher.logits.float().sigmoid(), targets[:, :old])
            return torch.cat([soft, targets[:, old:]], dim=1)

        # Every process scores its shard; all of them get every row, so their graphs agree.
        rows = context.score_pass(STATISTICS_STREAM, evidence)
        return rows.reshape(-1, seen)

    def training_step(self, batch: Batch) -> StepOutput:
        output = self.network(batch.images)
        assert isinstance(output, GCNOutput) and output.classifiers is not None
        old = self.num_old
        teacher = self.teacher(batch.images)
        targets = self.rule_targets(batch, None if teacher is None else teacher.logits)
        parts: dict[str, torch.Tensor] = {}
        loss = self.classification_term(output.logits, targets, parts)
        if teacher is not None:
            assert isinstance(teacher, GCNOutput) and teacher.classifiers is not None
            summed = sigmoid_distillation(output.logits[:, :old], teacher.logits)
            distillation = self.per_reference_images(summed, len(batch.images))
            relation = relation_preserving_loss(teacher.classifiers, output.classifiers[:old])
            loss = (
                loss
                + self.params.distillation_weight * distillation
                + self.params.relation_weight * relation
            )
            parts.update(kd=distillation.detach(), relation=relation.detach())
        return StepOutput(loss, parts)

"""TPCIL: Topology-Preserving Class-Incremental Learning (Tao et al., ECCV 2020), docs/tpcil.md.

Written from the paper's text (no code was released), adapted to multi-label images:

- The elastic Hebbian graph (EHG, :mod:`mlcil.hebbian`) models the topology of the feature
  space, the pooled backbone features of ``model.network: linear``. When a session ends, the
  graph grows by ``vertices_per_class`` vertices per new class (drawn from the session's
  features), every vertex is refitted by the neural gas to the features of the session's
  training images (own and replayed) under the network just trained, and competitive Hebbian
  learning draws the edges. Vertices carry no class: a multi-label image's feature belongs to
  no single class, so the graph covers the space the session's images occupy, at a budget
  proportional to the classes seen.
- Loss: the run's asymmetric loss on what the old-class rule keeps (``negative`` by default:
  TPCIL's cross-entropy covers every seen class on new images and exemplars) plus, from the
  second session on, ``topology_weight x`` the topology-preserving loss (``tpl``): the graph
  was fitted in the previous network's feature space, so each image of the batch falls in the
  cell of its nearest vertex there; a vertex's position before and after is the mean of the
  previous and of the current network's features of the images in its cell, and the loss is
  the mean squared change of the cosine between neighbouring vertices. Relations along the
  graph's edges are held; positions and far relations are free (the graph is elastic).

The graph is plain tensors kept in every checkpoint (``method.safetensors``).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import torch
from pydantic import Field

from mlcil.config.schema import LossConfig
from mlcil.hebbian import (
    fit_neural_gas,
    hebbian_edges,
    nearest_vertices,
    topology_preserving_loss,
)
from mlcil.methods.base import Batch, Method, MethodParams, SessionContext, StepOutput, eval_mode
from mlcil.methods.registry import register_method
from mlcil.models import IncrementalNetwork
from mlcil.old_classes import OldClassRule
from mlcil.runtime import derive_seed

logger = logging.getLogger(__name__)

# The graph pass's shuffle, augmentation and neural gas order, apart from every epoch's.
GRAPH_STREAM = "tpcil/graph"


class TPCILParams(MethodParams):
    old_classes: OldClassRule = "negative"
    topology_weight: Annotated[float, Field(ge=0)] = 100.0  # lambda of the TPL (ours)
    vertices_per_class: Annotated[int, Field(gt=0)] = 2  # EHG vertices added per new class
    graph_epochs: Annotated[int, Field(gt=0)] = 2  # neural gas passes over a session's features
    max_edge_age: Annotated[int, Field(gt=0)] = 50  # a vertex's wins before an edge it no
    # longer refreshes is removed


@register_method
class TPCIL(Method):
    """Topology-preserving class-incremental learning: an elastic Hebbian graph (ECCV 2020)."""

    name = "tpcil"
    Params = TPCILParams
    keeps_old_network = True
    loss_parts = frozenset({"asl", "tpl"})

    def __init__(self, params: Any, network: IncrementalNetwork, loss: LossConfig) -> None:
        super().__init__(params, network, loss)
        self.vertices: torch.Tensor | None = None  # (N, F), the previous network's space
        self.edges: torch.Tensor | None = None  # (N, N) bool, symmetric

    def training_step(self, batch: Batch) -> StepOutput:
        output = self.network(batch.images)
        teacher = self.teacher(batch.images)
        targets = self.rule_targets(batch, None if teacher is None else teacher.logits)
        parts: dict[str, torch.Tensor] = {}
        loss = self.classification_term(output.logits, targets, parts)
        if teacher is not None and self.vertices is not None and self.edges is not None:
            cells = nearest_vertices(teacher.pooled, self.vertices)
            topology = topology_preserving_loss(teacher.pooled, output.pooled, cells, self.edges)
            loss = loss + self.params.topology_weight * topology
            parts["tpl"] = topology.detach()
        return StepOutput(loss, parts)

    def end_session(self, context: SessionContext) -> None:
        """Grow and refit the graph in the feature space of the network just trained, then
        keep the frozen copy whose features the next session's loss reads."""
        super().end_session(context)
        with eval_mode(self.network):
            features = context.score_pass(
                GRAPH_STREAM, lambda batch: self.network(batch.images).pooled.float()
            )
        generator = torch.Generator().manual_seed(
            derive_seed(context.seed, context.session.index, GRAPH_STREAM)
        )
        new = self.params.vertices_per_class * len(context.session.new_classes)
        drawn = features[torch.randperm(len(features), generator=generator)[:new]]
        previous = self.vertices if self.vertices is not None else features[:0]
        initial = torch.cat([previous.to(features.dtype), drawn])
        self.vertices = fit_neural_gas(initial, features, self.params.graph_epochs, generator)
        order = features[torch.randperm(len(features), generator=generator)]
        self.edges = hebbian_edges(self.vertices, order, self.params.max_edge_age)
        logger.info(
            "session %d: elastic Hebbian graph of %d vertices and %d edges over %d features",
            context.session.index,
            len(self.vertices),
            int(self.edges.sum().item()) // 2,
            len(features),
        )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.vertices is not None and self.edges is not None:
            edges = int(self.edges.sum().item()) // 2
            state["graph"] = {"vertices": len(self.vertices), "edges": edges}
        return state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.vertices is None or self.edges is None:
            return {}
        return {"graph_vertices": self.vertices, "graph_edges": self.edges.to(torch.uint8)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            self.vertices = self.edges = None
            return
        self.vertices = tensors["graph_vertices"].float()
        self.edges = tensors["graph_edges"].bool()

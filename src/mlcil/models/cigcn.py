"""CSC's class-incremental graph convolutional network (CI-GCN), grown session by session
(docs/csc.md, network).

Every seen class is a node whose features are read off the image itself: the class's activation
map (a 1x1 convolution of the backbone's map, squashed by a sigmoid) weights the positions of a
shared projection of the map (``V0 = M^T F``, averaged over positions). Two graph layers update
the nodes:

- the *general* layer, ``V1 = LReLU(A_g V0 W_g)``, over a learnable label graph ``A_g``: no
  co-occurrence counts, the entries are parameters learned by gradient;
- the *specific* layer, ``V2 = LReLU(A_s V1 W_s)``, over an image-specific graph: row ``i`` of
  ``A_s`` is a softmax over the nodes ``j`` of a linear map of ``[V1_j ; g]``, ``g`` a global
  vector pooled from ``V1``.

Each class has two logits: its activation map's mean (the classification branch) and a linear
classifier of its own node in ``V2`` (the graph branch); the network returns their sum.

Growth: a session's head holds everything that has one row or column per class of that session
(its activation maps, its rows of the specific graph's generator, its node classifiers) and its
blocks of ``A_g``: the rows of its classes over every class seen by then, and the columns of
the earlier classes towards its classes. Heads freeze when the next session starts, so the
graph's old-old block is inherited unchanged while the new rows and columns learn; the
projection, ``W_g``, ``W_s`` and the global map are shared and keep learning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional

from mlcil.config.schema import Params
from mlcil.models.backbones import Backbone
from mlcil.models.base import IncrementalNetwork, NetworkOutput
from mlcil.models.registry import NETWORKS

LEAKY_SLOPE = 0.2  # the graph layers' LeakyReLU, as in ML-GCN, AGCN and ADD-GCN


def _uniform(rows: int, columns: int, fan_in: int) -> nn.Parameter:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: a linear layer's default draw."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return nn.Parameter(torch.empty(rows, columns).uniform_(-bound, bound))


class SessionGraphHead(nn.Module):
    """The parameters of one session's classes (``old`` classes came before them)."""

    def __init__(self, channels: int, node_dim: int, old: int, new: int) -> None:
        super().__init__()
        seen = old + new
        self.activation = nn.Conv2d(channels, new, kernel_size=1)
        self.relation = nn.Linear(2 * node_dim, new)  # rows of the specific graph
        self.classifier_weight = _uniform(new, node_dim, node_dim)  # graph branch, per class
        self.classifier_bias = nn.Parameter(torch.zeros(new))
        self.general_rows = _uniform(new, seen, seen)  # A_g[new, :seen]
        self.general_columns = _uniform(old, new, seen)  # A_g[:old, new]


def assemble_general_graph(heads: Sequence[SessionGraphHead]) -> torch.Tensor:
    """``A_g`` over every seen class from the sessions' blocks, ``(seen, seen)``.

    Row band of session ``s``: its own rows over the classes seen by then, then, for each later
    session ``t``, the rows of ``t``'s columns that belong to ``s``'s classes."""
    sizes = [head.general_rows.shape[0] for head in heads]
    bands = []
    start = 0
    for index, head in enumerate(heads):
        stop = start + sizes[index]
        later = [other.general_columns[start:stop] for other in heads[index + 1 :]]
        bands.append(torch.cat([head.general_rows, *later], dim=1))
        start = stop
    return torch.cat(bands, dim=0)


class CIGCNParams(Params):
    """The CI-GCN network's YAML keys (next to ``network: cigcn`` in the ``model`` section)."""

    node_dim: Annotated[int, Field(gt=0)] = 512  # width of the nodes' features (ours)


@NETWORKS.register
class CIGCNNetwork(IncrementalNetwork):
    """Backbone -> class-activation nodes -> general then image-specific graph layer; logits
    are the activation maps' means plus the nodes' classifiers."""

    name = "cigcn"
    Params = CIGCNParams

    @classmethod
    def from_params(cls, backbone: Backbone, image_size: int, params: Any) -> CIGCNNetwork:
        del image_size
        return cls(backbone, **params.model_dump())

    def __init__(self, backbone: Backbone, node_dim: int = 512) -> None:
        super().__init__(backbone)
        self.node_dim = node_dim
        self.projection = nn.Conv2d(backbone.num_features, node_dim, kernel_size=1)
        self.general_weight = nn.Linear(node_dim, node_dim, bias=False)  # W_g
        self.specific_weight = nn.Linear(node_dim, node_dim, bias=False)  # W_s
        self.global_map = nn.Linear(node_dim, node_dim)  # g from the pooled V1

    def _make_head(self, num_classes: int) -> nn.Module:
        head = SessionGraphHead(self.backbone.num_features, self.node_dim, self.num_classes,
                                num_classes)  # fmt: skip
        return head.to(self.projection.weight.device)

    def session_heads(self) -> list[SessionGraphHead]:
        heads = [head for head in self.heads if isinstance(head, SessionGraphHead)]
        if not heads:
            raise RuntimeError("the network has no session yet: call add_session first")
        return heads

    def general_graph(self) -> torch.Tensor:
        """The learnable label graph ``A_g`` over the seen classes, ``(seen, seen)``."""
        return assemble_general_graph(self.session_heads())

    def specific_graph(self, nodes: torch.Tensor) -> torch.Tensor:
        """``(B, seen, seen)`` image-specific graphs from the general layer's ``(B, seen, D)``
        nodes: each row a softmax over the nodes."""
        pooled = functional.leaky_relu(self.global_map(nodes.mean(dim=1)), LEAKY_SLOPE)
        paired = torch.cat([nodes, pooled[:, None, :].expand_as(nodes)], dim=2)  # (B, seen, 2D)
        rows = torch.cat([head.relation(paired) for head in self.session_heads()], dim=2)
        return rows.transpose(1, 2).softmax(dim=2)  # rows: classes, columns: nodes

    def forward(
        self, images: torch.Tensor, stage_indices: Sequence[int] | None = None
    ) -> NetworkOutput:
        feature_map, stages = self.backbone_maps(images, stage_indices)
        heads = self.session_heads()
        activation = torch.cat([head.activation(feature_map) for head in heads], dim=1)
        attention = activation.flatten(2).sigmoid()  # (B, seen, HW)
        projected = self.projection(feature_map).flatten(2).transpose(1, 2)  # (B, HW, D)
        nodes = attention @ projected / attention.shape[2]  # V0: (B, seen, D)
        general = self.general_graph().to(nodes.dtype)
        nodes = functional.leaky_relu(self.general_weight(general @ nodes), LEAKY_SLOPE)
        specific = self.specific_graph(nodes)
        nodes = functional.leaky_relu(self.specific_weight(specific @ nodes), LEAKY_SLOPE)
        weight = torch.cat([head.classifier_weight for head in heads]).to(nodes.dtype)
        bias = torch.cat([head.classifier_bias for head in heads]).to(nodes.dtype)
        graph_logits = (nodes * weight).sum(dim=2) + bias
        pooled = feature_map.mean(dim=(2, 3))
        return NetworkOutput(
            logits=activation.mean(dim=(2, 3)) + graph_logits,
            embeddings=pooled[:, None, :],  # one embedding shared by every class
            pooled=pooled,
            stages=stages,
        )

"""The graph-convolutional classifier network of ML-GCN and AGCN, grown session by session
(docs/agcn.md, network).

Every seen class is a node of a label graph. A two-layer GCN maps the nodes' input vectors to one
classifier vector per class, of the backbone's feature width, and an image's logits are its
pooled feature dotted with every classifier. The graph's edges come from the augmented
correlation matrix (ACM): conditional label probabilities ``P(j | i)`` over the seen classes,
kept in the ``correlation`` buffer (so it is saved with the weights and survives ``--resume``
bit for bit); the propagation matrix is derived from it at every forward pass with ML-GCN's
binarisation (``tau``) and re-weighting (``reweight_p``), then the symmetric degree
normalisation both releases apply.

Offline there are no word vectors for the class names, so each class's node input is a learnable
vector (one ``nn.Embedding`` per session, registered as that session's head so that it is frozen
once its session ends, as word vectors are fixed inputs); the GCN weights are shared by all
sessions and keep learning.
"""

from __future__ import annotations

import dataclasses
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

LEAKY_SLOPE = 0.2  # the GCN's LeakyReLU, as in ML-GCN and AGCN
# Below this much evidence a class counts as never seen in the pass: its row of P(. | i) is 0.
EVIDENCE_EPS = 1e-6


def conditional_cooccurrence(given: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``P(other_j | given_i)`` estimated from per-image label evidence: ``(G, O)``.

    ``sum_x given_i(x) other_j(x) / sum_x given_i(x)``: with 0/1 labels this is ML-GCN's
    co-occurrence count over the class count; with soft scores (an old model's probabilities)
    it is AGCN's soft-label estimate. A class with no evidence gets a row of zeros.

    Args:
        given: ``(N, G)`` evidence for the conditioning classes, in [0, 1].
        other: ``(N, O)`` evidence for the other classes, in [0, 1].
    """
    given, other = given.double(), other.double()
    joint = given.T @ other
    return (joint / given.sum(0).clamp_min(EVIDENCE_EPS)[:, None]).float()


def augmented_correlation(previous: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
    """The ACM after a session: ``(old + new, old + new)`` conditional probabilities.

    The old-old block is ``previous`` unchanged (the old classes' relations learned when their
    labels were known); the new-new block comes from the new classes' hard labels; the two
    inter-task blocks pair the old classes' soft evidence with the new hard labels:
    ``P(new_j | old_i)`` and ``P(old_j | new_i)``.

    Args:
        previous: ``(old, old)`` the ACM before the session (``(0, 0)`` in the first one).
        evidence: ``(N, old + new)`` per image: old-class evidence, then new-class labels.
    """
    old = previous.shape[0]
    soft, hard = evidence[:, :old], evidence[:, old:]
    top = torch.cat(
        [previous.to(soft.device, torch.float32), conditional_cooccurrence(soft, hard)], 1
    )
    bottom = torch.cat(
        [conditional_cooccurrence(hard, soft), conditional_cooccurrence(hard, hard)], 1
    )
    return torch.cat([top, bottom], dim=0)


def reweighted_adjacency(
    correlation: torch.Tensor, thresholds: torch.Tensor | float, reweight_p: float
) -> torch.Tensor:
    """The GCN's propagation matrix from conditional probabilities (ML-GCN, eqs. 7-8).

    An edge ``i -> j`` (``i != j``) exists where ``P(j | i) >= tau``; each class spreads
    ``reweight_p`` over its edges equally and keeps ``1 - reweight_p`` on itself; the result is
    normalised as ``D^-1/2 A D^-1/2`` with ``D`` its row sums.
    """
    size = correlation.shape[0]
    eye = torch.eye(size, dtype=torch.bool, device=correlation.device)
    edges = ((correlation >= thresholds) & ~eye).float()
    neighbours = edges.sum(dim=1, keepdim=True).clamp_min(1.0)
    weighted = reweight_p * edges / neighbours + (1.0 - reweight_p) * eye.float()
    scale = weighted.sum(dim=1).rsqrt()
    return scale[:, None] * weighted * scale[None, :]


@dataclasses.dataclass
class GCNOutput(NetworkOutput):
    """A forward pass of :class:`GCNNetwork`: also the classifiers it used, ``(seen, F)``."""

    classifiers: torch.Tensor | None = None


class GCNParams(Params):
    """The GCN network's YAML keys (next to ``network: gcn`` in the ``model`` section)."""

    embedding_dim: Annotated[int, Field(gt=0)] = 300  # node input width (GloVe's in the papers)
    hidden_dim: Annotated[int, Field(gt=0)] = 1024  # the first GCN layer's width
    tau: Annotated[float, Field(ge=0, le=1)] = 0.4  # edge threshold within a session's classes
    inter_task_tau: Annotated[float, Field(ge=0, le=1)] = 0.3  # ... between sessions' classes
    reweight_p: Annotated[float, Field(ge=0, lt=1)] = 0.2  # weight spread over neighbours


@NETWORKS.register
class GCNNetwork(IncrementalNetwork):
    """Backbone -> average pooling -> dot product with GCN-made class classifiers."""

    name = "gcn"
    Params = GCNParams
    correlation: torch.Tensor

    @classmethod
    def from_params(cls, backbone: Backbone, image_size: int, params: Any) -> GCNNetwork:
        del image_size
        return cls(backbone, **params.model_dump())

    def __init__(
        self,
        backbone: Backbone,
        embedding_dim: int = 300,
        hidden_dim: int = 1024,
        tau: float = 0.4,
        inter_task_tau: float = 0.3,
        reweight_p: float = 0.2,
    ) -> None:
        super().__init__(backbone)
        self.embedding_dim = embedding_dim
        self.tau, self.inter_task_tau, self.reweight_p = tau, inter_task_tau, reweight_p
        # No bias: a GCN layer is A H W, as in both papers.
        self.gc1 = nn.Linear(embedding_dim, hidden_dim, bias=False)
        self.gc2 = nn.Linear(hidden_dim, backbone.num_features, bias=False)
        self.register_buffer("correlation", torch.zeros(0, 0))

    def _make_head(self, num_classes: int) -> nn.Module:
        # The session's class embeddings (N(0, 1) rows): the head list freezes them later.
        return nn.Embedding(num_classes, self.embedding_dim).to(self.correlation.device)

    def _grow(self, num_new_classes: int) -> None:
        """Widen the ACM with empty rows and columns until the session's statistics arrive."""
        old = self.correlation.shape[0]
        grown = self.correlation.new_zeros(old + num_new_classes, old + num_new_classes)
        grown[:old, :old] = self.correlation
        self.correlation = grown

    def set_session_correlation(self, evidence: torch.Tensor) -> None:
        """Fill the newest session's rows and columns of the ACM from ``(N, seen)`` evidence
        (see :func:`augmented_correlation`); the old-old block is kept as it is."""
        seen = self.num_classes
        if evidence.ndim != 2 or evidence.shape[1] != seen:
            raise ValueError(f"evidence must be (images, {seen}), got {tuple(evidence.shape)}")
        old = seen - self.session_sizes[-1]
        matrix = augmented_correlation(self.correlation[:old, :old], evidence)
        self.correlation = matrix.to(self.correlation.device)

    def thresholds(self) -> torch.Tensor:
        """``(seen, seen)``: ``tau`` inside a session's block, ``inter_task_tau`` across."""
        sizes = torch.tensor(self.session_sizes, device=self.correlation.device)
        session = torch.repeat_interleave(torch.arange(len(sizes), device=sizes.device), sizes)
        same = session[:, None] == session[None, :]
        return torch.where(same, self.tau, self.inter_task_tau).to(self.correlation.dtype)

    def adjacency(self) -> torch.Tensor:
        """The propagation matrix over the seen classes, ``(seen, seen)``."""
        return reweighted_adjacency(self.correlation, self.thresholds(), self.reweight_p)

    def class_classifiers(self) -> torch.Tensor:
        """``(seen, F)``: one classifier per class, ``A LeakyReLU(A E W1) W2``."""
        if not self.heads:
            raise RuntimeError("the network has no session yet: call add_session first")
        embeddings = torch.cat([self._embedding(head) for head in self.heads])  # (seen, E)
        adjacency = self.adjacency()
        hidden = functional.leaky_relu(adjacency @ self.gc1(embeddings), LEAKY_SLOPE)
        return adjacency @ self.gc2(hidden)

    @staticmethod
    def _embedding(head: nn.Module) -> torch.Tensor:
        assert isinstance(head, nn.Embedding)
        return head.weight

    def forward(
        self, images: torch.Tensor, stage_indices: Sequence[int] | None = None
    ) -> GCNOutput:
        feature_map, stages = self.backbone_maps(images, stage_indices)
        pooled = feature_map.mean(dim=(2, 3))  # (B, F)
        classifiers = self.class_classifiers()
        return GCNOutput(
            logits=pooled @ classifiers.T.to(pooled.dtype),
            embeddings=pooled[:, None, :],  # one embedding shared by every class
            pooled=pooled,
            stages=stages,
            classifiers=classifiers,
        )

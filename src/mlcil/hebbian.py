"""The elastic Hebbian graph (EHG) of TPCIL and its topology-preserving loss, as pure functions
(docs/tpcil.md).

The graph models the topology of a network's feature space: its vertices are centroids placed by
the neural gas (every vertex moves towards each feature by a step that decays with its distance
rank), and its edges are drawn by competitive Hebbian learning (each feature links its nearest
and second-nearest vertex; an edge that its vertices stop refreshing ages and is removed). The
topology-preserving loss then holds the angles between neighbouring vertices while the network
learns new classes, leaving everything else free to move.
"""

from __future__ import annotations

import torch
from torch.nn import functional

# The neural gas's schedule (Martinetz, Berkovich & Schulten, 1993): the step size and the
# neighbourhood range decay exponentially from their initial to their final values.
STEP_SIZES = (0.5, 0.005)
NEIGHBOURHOODS = (10.0, 0.01)


def neural_gas_step(
    vertices: torch.Tensor, feature: torch.Tensor, step_size: float, neighbourhood: float
) -> torch.Tensor:
    """One neural gas update: ``m_j + step x exp(-k_j / neighbourhood) x (f - m_j)``, with
    ``k_j`` the rank of vertex ``j``'s distance to ``f`` (0 for the nearest), ``(N, F)``."""
    distances = (vertices - feature).pow(2).sum(dim=1)
    ranks = distances.argsort().argsort().to(vertices.dtype)
    factors = step_size * torch.exp(-ranks / neighbourhood)
    return vertices + factors[:, None] * (feature - vertices)


def fit_neural_gas(
    initial: torch.Tensor, features: torch.Tensor, epochs: int, generator: torch.Generator
) -> torch.Tensor:
    """Vertices ``(N, F)`` fitted to ``features`` ``(M, F)`` by ``epochs`` passes of the neural
    gas from ``initial``, the features in a seeded order, under the standard schedule."""
    vertices = initial.float().clone()
    features = features.float()
    total = max(epochs * len(features), 1)
    step = 0
    for _ in range(epochs):
        for index in torch.randperm(len(features), generator=generator).tolist():
            progress = step / total
            step_size = STEP_SIZES[0] * (STEP_SIZES[1] / STEP_SIZES[0]) ** progress
            reach = NEIGHBOURHOODS[0] * (NEIGHBOURHOODS[1] / NEIGHBOURHOODS[0]) ** progress
            vertices = neural_gas_step(vertices, features[index], step_size, reach)
            step += 1
    return vertices


def hebbian_edges(vertices: torch.Tensor, features: torch.Tensor, max_age: int) -> torch.Tensor:
    """Competitive Hebbian learning with ageing, features taken in the order given: ``(N, N)``
    symmetric bool adjacency.

    For each feature, the edges of its nearest vertex age by one, the edge between its nearest
    and second-nearest vertex is made (or refreshed) with age 0, and edges older than
    ``max_age`` are removed."""
    count = len(vertices)
    ages = torch.full((count, count), -1, dtype=torch.long)  # -1: no edge
    if count < 2:
        return ages >= 0
    distances = torch.cdist(features.float(), vertices.float())
    nearest = distances.topk(2, dim=1, largest=False).indices.tolist()
    for winner, runner_up in nearest:
        row = ages[winner]
        row[row >= 0] += 1
        ages[:, winner] = row
        ages[winner, runner_up] = ages[runner_up, winner] = 0
        ages[ages > max_age] = -1
    return ages >= 0


def nearest_vertices(features: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """``(B,)`` the index of each feature's nearest vertex (its cell)."""
    return torch.cdist(features.float(), vertices.to(features.device).float()).argmin(dim=1)


def topology_preserving_loss(
    old_features: torch.Tensor,
    new_features: torch.Tensor,
    cells: torch.Tensor,
    edges: torch.Tensor,
) -> torch.Tensor:
    """Mean over the EHG's edges of ``(cos(a_i, a_j) - cos(b_i, b_j))^2``, float32.

    ``a_i`` and ``b_i`` are where vertex ``i`` sits before and after the network changed: the
    mean of the previous network's (``old_features``) and of the current network's
    (``new_features``) features ``(B, F)`` of the batch's images in its cell (``cells``,
    ``(B,)``). Only edges whose two vertices hold an image of the batch count; with none the
    loss is 0 (still attached to ``new_features``' graph).
    """
    hit, cell_of = torch.unique(cells, return_inverse=True)
    members = functional.one_hot(cell_of, len(hit)).float()  # (B, hit vertices)
    sizes = members.sum(dim=0)[:, None]
    before = functional.normalize(members.T @ old_features.detach().float() / sizes, dim=1)
    after = functional.normalize(members.T @ new_features.float() / sizes, dim=1)
    live = edges.to(hit.device)[hit][:, hit].triu(diagonal=1)
    if not bool(live.any()):
        return new_features.float().sum() * 0.0
    change = before @ before.T - after @ after.T
    return change[live].pow(2).mean()

"""A growing linear classifier on pooled backbone features.

The network of the baselines (fine-tuning, LwF, replay, PODNet, joint training) and of the
"KRT without ICA" ablation: global average pooling, then one ``Linear`` head per session. All heads
read the same pooled embedding, so ``NetworkOutput.embeddings`` has a single slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mlcil.models.backbones import Backbone
from mlcil.models.base import IncrementalNetwork, NetworkOutput
from mlcil.models.registry import NETWORKS


@NETWORKS.register
class LinearNetwork(IncrementalNetwork):
    """Backbone -> global average pooling -> concatenated per-session linear heads."""

    name = "linear"

    def __init__(self, backbone: Backbone) -> None:
        super().__init__(backbone)
        self.embed_dim = backbone.num_features

    def _make_head(self, num_classes: int) -> nn.Module:
        device = next(self.backbone.parameters()).device
        return nn.Linear(self.embed_dim, num_classes).to(device)

    def forward(
        self, images: torch.Tensor, stage_indices: Sequence[int] | None = None
    ) -> NetworkOutput:
        feature_map, stages = self.backbone_maps(images, stage_indices)
        pooled = feature_map.mean(dim=(2, 3))  # (B, F)
        embeddings = pooled[:, None, :]  # (B, 1, F): every head reads the same embedding
        return NetworkOutput(
            logits=self.classify(embeddings), embeddings=embeddings, pooled=pooled, stages=stages
        )

"""Backbones and incremental networks."""

from __future__ import annotations

from mlcil.config import ModelConfig
from mlcil.models.backbones import Backbone, load_backbone_weights
from mlcil.models.base import IncrementalNetwork, NetworkOutput
from mlcil.models.ica import ClassAttentionBlock, ICANetwork
from mlcil.models.linear import LinearNetwork


def build_network(
    config: ModelConfig, image_size: int, load_weights: bool = True
) -> IncrementalNetwork:
    """Build the configured network with no session yet (call ``add_session`` per session).

    Args:
        config: the model section of a run config.
        image_size: square input size (fixes ICA's positional embedding).
        load_weights: read ``config.pretrained``; False builds the same architecture without
            touching the file (dry runs, and rebuilding before a checkpoint is loaded).
    """
    pretrained = config.pretrained if load_weights else None
    backbone = Backbone(config.backbone, config.feature_stage, pretrained)
    if config.network == "ica":
        return ICANetwork(
            backbone,
            image_size=image_size,
            embed_dim=config.embed_dim,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            released_init=config.ica_init == "released",
        )
    return LinearNetwork(backbone)


__all__ = [
    "Backbone",
    "ClassAttentionBlock",
    "ICANetwork",
    "IncrementalNetwork",
    "LinearNetwork",
    "NetworkOutput",
    "build_network",
    "load_backbone_weights",
]

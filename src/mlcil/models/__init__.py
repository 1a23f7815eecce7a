"""Backbones and incremental networks, one file each, registered by name (``model.network``)
and discovered: importing this package imports every module in this folder."""

from __future__ import annotations

from mlcil import hub_weights
from mlcil.config.schema import ModelConfig
from mlcil.imagenet import is_imagenet_name, normalisation
from mlcil.models.backbones import Backbone, load_backbone_weights
from mlcil.models.base import IncrementalNetwork, NetworkOutput
from mlcil.models.cigcn import CIGCNNetwork, CIGCNParams
from mlcil.models.gcn import GCNNetwork, GCNOutput, GCNParams
from mlcil.models.ica import ClassAttentionBlock, ICANetwork, ICAParams
from mlcil.models.linear import LinearNetwork
from mlcil.models.registry import NETWORKS
from mlcil.registry import discover

# Every module of this folder is imported, so a new network is one new file here (registered by
# its @NETWORKS.register); the imports above only name the built-in ones for users.
discover(__name__, __path__)


def input_normalisation(
    config: ModelConfig,
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` the backbone applies to its [0, 1] input, or None.

    ``model.input_normalisation: auto`` means the ImageNet statistics for ``imagenet:`` weights,
    the statistics timm's pretrained config gives hub weights (``timm/<model>.<tag>``), and
    nothing otherwise."""
    choice = config.input_normalisation
    if choice == "auto" and hub_weights.is_hub_name(config.pretrained):
        assert config.pretrained is not None
        return hub_weights.normalisation(config.pretrained)
    if choice == "auto":
        choice = "imagenet" if is_imagenet_name(config.pretrained) else "none"
    return normalisation(config.backbone) if choice == "imagenet" else None


def build_network(
    config: ModelConfig, image_size: int, load_weights: bool = True
) -> IncrementalNetwork:
    """Build the configured network with no session yet (call ``add_session`` per session).

    Args:
        config: the model section of a run config (its ``params`` are the network's own).
        image_size: square input size (fixes ICA's positional embedding).
        load_weights: read ``config.pretrained``; False builds the same architecture without
            touching the file (dry runs, and rebuilding before a checkpoint is loaded).
    """
    network_class = NETWORKS.get_class(config.network)
    pretrained = config.pretrained if load_weights else None
    backbone = Backbone(
        config.backbone, config.feature_stage, pretrained, input_normalisation(config)
    )
    return network_class.from_params(backbone, image_size, config.params)


__all__ = [
    "NETWORKS",
    "Backbone",
    "CIGCNNetwork",
    "CIGCNParams",
    "ClassAttentionBlock",
    "GCNNetwork",
    "GCNOutput",
    "GCNParams",
    "ICANetwork",
    "ICAParams",
    "IncrementalNetwork",
    "LinearNetwork",
    "NetworkOutput",
    "build_network",
    "input_normalisation",
    "load_backbone_weights",
]

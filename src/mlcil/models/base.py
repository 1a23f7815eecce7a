"""What every incremental network shares: a backbone, one head per session, growth and freezing.

A network never stores per-batch state on ``self``: ``forward`` returns everything a method may
need in a ``NetworkOutput``. Growth (``add_session``) appends the new session's parameters and
freezes the previous sessions' ones; a checkpoint records ``session_sizes`` so that an identical
module tree can be rebuilt before its weights are loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from mlcil.config.schema import Params
from mlcil.models.backbones import Backbone


@dataclasses.dataclass
class NetworkOutput:
    """Outputs of one forward pass.

    Attributes:
        logits: ``(B, seen classes)``, the session heads concatenated in class order.
        embeddings: ``(B, S, D)``, the embedding each session's head reads (S = sessions; a
            network whose heads share one embedding returns S = 1).
        pooled: ``(B, F)``, the global-average-pooled backbone feature map (used by herding).
        stages: backbone stage maps, only when ``forward`` was given ``stage_indices``: the
            requested stages in ascending order, then the feature map.
    """

    logits: torch.Tensor
    embeddings: torch.Tensor
    pooled: torch.Tensor
    stages: list[torch.Tensor] | None = None


class IncrementalNetwork(nn.Module):
    """Base class: a backbone plus a growing list of per-session heads.

    A subclass registered with ``@NETWORKS.register`` sets ``name`` (the ``model.network`` value)
    and ``Params`` (its own typed YAML keys), and builds itself in ``from_params``.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params

    @classmethod
    def from_params(cls, backbone: Backbone, image_size: int, params: Any) -> IncrementalNetwork:
        """Build the network on ``backbone`` for square inputs of ``image_size`` pixels."""
        del image_size, params
        return cls(backbone)

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList()
        self.session_sizes: list[int] = []

    @property
    def num_sessions(self) -> int:
        return len(self.session_sizes)

    @property
    def num_classes(self) -> int:
        return sum(self.session_sizes)

    def add_session(self, num_new_classes: int) -> None:
        """Append the parameters of a new session and freeze the earlier sessions' ones."""
        if num_new_classes <= 0:
            raise ValueError(f"a session needs at least one class, got {num_new_classes}")
        for module in self.heads:
            module.requires_grad_(False)
        self._freeze_session_parameters()
        self.heads.append(self._make_head(num_new_classes))
        self._grow(num_new_classes)
        self.session_sizes.append(num_new_classes)

    def _make_head(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def _freeze_session_parameters(self) -> None:
        """Freeze per-session parameters other than the heads (e.g. KRT's KR tokens)."""

    def _grow(self, num_new_classes: int) -> None:
        """Append per-session parameters other than the head."""

    def forward(
        self, images: torch.Tensor, stage_indices: Sequence[int] | None = None
    ) -> NetworkOutput:
        raise NotImplementedError

    def backbone_maps(
        self, images: torch.Tensor, stage_indices: Sequence[int] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The feature map, plus the requested stage maps when ``stage_indices`` is given."""
        if stage_indices is not None:
            stages = self.backbone.forward_stages(images, stage_indices)
            return stages[-1], stages
        return self.backbone(images), None

    def classify(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, S, D)`` (or ``(B, 1, D)`` shared) -> ``(B, seen classes)`` logits."""
        if not self.heads:
            raise RuntimeError("the network has no session yet: call add_session first")
        shared = embeddings.shape[1] == 1
        return torch.cat(
            [head(embeddings[:, 0 if shared else i]) for i, head in enumerate(self.heads)], dim=1
        )

    def retained_embedding(self, output: NetworkOutput, num_old_sessions: int) -> torch.Tensor:
        """The representation of the first ``num_old_sessions`` sessions, one vector per image,
        that knowledge distillation keeps close to the previous model's: ``(B, X)``."""
        if output.embeddings.shape[1] == 1:
            return output.embeddings[:, 0]
        return output.embeddings[:, :num_old_sessions].flatten(1)

    @torch.no_grad()
    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` pooled backbone features (exemplar herding)."""
        return self.backbone(images).mean(dim=(2, 3))

    def summary(self) -> list[tuple[str, int, int]]:
        """``(module, parameters, trainable parameters)`` rows for a model summary."""
        rows = []
        for name, module in self.named_children():
            params = list(module.parameters())
            total = sum(p.numel() for p in params)
            trainable = sum(p.numel() for p in params if p.requires_grad)
            rows.append((name, total, trainable))
        direct = [p for n, p in self.named_parameters(recurse=False)]
        if direct:
            rows.append(
                (
                    "tokens/embeddings",
                    sum(p.numel() for p in direct),
                    sum(p.numel() for p in direct if p.requires_grad),
                )
            )
        return rows

"""KRT's incremental cross-attention network (docs/method.md, network).

Session i reads the sequence ``X_i = [KT, KR_i, P]`` with one shared class-attention block in
which only the KT position queries. Because the query comes from the KT token alone and layer
normalisation works token by token, everything but the KR_i key and value is identical across
sessions: ``ClassAttentionBlock.forward`` computes the patch keys and values once and mixes in
each session's KR_i column, which is exact (a test checks it against ``forward_sequence``, the
plain per-session computation) and costs one block instead of S.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from mlcil.config.schema import Params
from mlcil.models.backbones import Backbone
from mlcil.models.base import IncrementalNetwork, NetworkOutput
from mlcil.models.registry import NETWORKS

INIT_STD = 0.01  # the released code redraws every Linear weight from N(0, 0.01)
TOKEN_STD = 0.02


class ClassAttentionBlock(nn.Module):
    """CaiT-style class-attention block where the first token (KT) is the only query."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def _finish(self, kt: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        # Steps 3-4: residual on the *un-normalised* KT token, then the MLP branch.
        embedding = kt + self.proj(attended)
        return embedding + self.mlp(self.norm2(embedding))

    def forward(
        self, kt_token: torch.Tensor, kr_tokens: torch.Tensor, patches: torch.Tensor
    ) -> torch.Tensor:
        """Embeddings of every session in one pass.

        Args:
            kt_token: ``(D,)`` the shared knowledge-transfer token.
            kr_tokens: ``(S, D)`` one knowledge-retention token per session.
            patches: ``(B, N, D)`` projected patch tokens with positional embedding.

        Returns:
            ``(B, S, D)``: the embedding of every session.
        """
        batch, num_patches, dim = patches.shape
        num_sessions = kr_tokens.shape[0]
        z_kt = self.norm1(kt_token)  # (D,)
        z_kr = self.norm1(kr_tokens)  # (S, D)
        z_patches = self.norm1(patches)  # (B, N, D)
        query = self._split(self.q(z_kt)) * self.scale  # (H, Dh): one query for the whole batch
        shared = torch.cat([z_kt.expand(batch, 1, dim), z_patches], dim=1)  # (B, 1 + N, D)
        k_shared = self._split(self.k(shared))  # (B, 1 + N, H, Dh)
        v_shared = self._split(self.v(shared))
        k_kr = self._split(self.k(z_kr))  # (S, H, Dh)
        v_kr = self._split(self.v(z_kr))
        logits_shared = torch.einsum("hd,bnhd->bhn", query, k_shared)  # (B, H, 1 + N)
        logits_kr = torch.einsum("hd,shd->hs", query, k_kr)  # (H, S)
        heads = self.num_heads
        logits = torch.cat(
            [
                logits_shared[:, :, None, :].expand(batch, heads, num_sessions, num_patches + 1),
                logits_kr[None, :, :, None].expand(batch, heads, num_sessions, 1),
            ],
            dim=-1,
        )  # (B, H, S, 2 + N): session s attends over [KT, P..., KR_s]
        attention = logits.softmax(dim=-1)
        attended = torch.einsum("bhsn,bnhd->bshd", attention[..., :-1], v_shared) + torch.einsum(
            "bhs,shd->bshd", attention[..., -1], v_kr
        )  # (B, S, H, Dh)
        return self._finish(kt_token, attended.reshape(batch, num_sessions, dim))

    def forward_sequence(self, sequence: torch.Tensor) -> torch.Tensor:
        """The spec's per-session computation on ``X_i = [KT, KR_i, P]``: ``(B, L, D) -> (B, D)``.

        Kept as the readable reference that ``forward`` must match.
        """
        batch, length, dim = sequence.shape
        z = self.norm1(sequence)
        query = self.q(z[:, :1]).reshape(batch, 1, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k(z).reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        value = self.v(z).reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        attention = (query * self.scale) @ key.transpose(-2, -1)  # (B, H, 1, L)
        attended = attention.softmax(dim=-1) @ value  # (B, H, 1, Dh)
        return self._finish(sequence[:, 0], attended.transpose(1, 2).reshape(batch, dim))


class ICAParams(Params):
    """The ICA network's YAML keys (next to ``network: ica`` in the ``model`` section)."""

    embed_dim: Annotated[int, Field(gt=0)] = 384  # token width D: 384 COCO, 768 VOC
    num_heads: Annotated[int, Field(gt=0)] = 8
    mlp_ratio: Annotated[float, Field(gt=0)] = 4.0
    # "released": as the authors' code: the block's Linear weights and the first head's weight
    # redrawn from N(0, 0.01) (block biases zero, the first head's bias PyTorch's default) and
    # the 1x1 projection Kaiming-normal (fan_out, leaky_relu) (docs/method.md, network);
    # "pytorch": PyTorch's default initialisation, which trains far faster when the backbone
    # itself starts from random weights (the embedded benchmark).
    ica_init: Literal["released", "pytorch"] = "released"

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ICAParams:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"model.embed_dim ({self.embed_dim}) must be divisible by model.num_heads "
                f"({self.num_heads})"
            )
        return self


@NETWORKS.register
class ICANetwork(IncrementalNetwork):
    """Backbone -> 1x1 projection + positional embedding -> shared class attention -> heads.

    Args:
        backbone: the feature extractor.
        image_size: square input size, which fixes the number of patches.
        embed_dim: token width D (384 for COCO, 768 for VOC in the released configs).
        num_heads: attention heads (8).
        mlp_ratio: MLP hidden width over D (4).
        released_init: initialise as the released code does: the block's Linear weights from
            N(0, 0.01) with zero biases, the first head's weight from N(0, 0.01) (its bias keeps
            PyTorch's default), the projection Kaiming-normal (fan_out, leaky_relu); False keeps
            PyTorch's defaults.
    """

    name = "ica"
    Params = ICAParams

    @classmethod
    def from_params(cls, backbone: Backbone, image_size: int, params: Any) -> ICANetwork:
        return cls(
            backbone,
            image_size=image_size,
            embed_dim=params.embed_dim,
            num_heads=params.num_heads,
            mlp_ratio=params.mlp_ratio,
            released_init=params.ica_init == "released",
        )

    def __init__(
        self,
        backbone: Backbone,
        image_size: int,
        embed_dim: int = 384,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        released_init: bool = True,
    ) -> None:
        super().__init__(backbone)
        self.released_init = released_init
        channels, height, width = backbone.feature_shape(image_size)
        self.feature_hw = (height, width)
        self.embed_dim = embed_dim
        self.projection = nn.Conv2d(channels, embed_dim, kernel_size=1)
        self.pos_embed = nn.Parameter(torch.zeros(1, height * width, embed_dim))
        self.kt_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.kr_tokens = nn.ParameterList()
        self.block = ClassAttentionBlock(embed_dim, num_heads, mlp_ratio)
        nn.init.trunc_normal_(self.pos_embed, std=TOKEN_STD)
        nn.init.trunc_normal_(self.kt_token, std=TOKEN_STD)
        if released_init:
            self.block.apply(_init_linear)
            nn.init.kaiming_normal_(
                self.projection.weight, mode="fan_out", nonlinearity="leaky_relu"
            )

    def _make_head(self, num_classes: int) -> nn.Module:
        head = nn.Sequential(nn.LayerNorm(self.embed_dim), nn.Linear(self.embed_dim, num_classes))
        if not self.heads and self.released_init:
            # The first head exists when the released code re-initialises the network; later
            # heads keep PyTorch's default Linear initialisation (docs/method.md, network).
            # Only the weight is redrawn: the head's bias keeps PyTorch's default.
            linear = head[1]
            assert isinstance(linear, nn.Linear)
            nn.init.normal_(linear.weight, std=INIT_STD)
        return head

    def _freeze_session_parameters(self) -> None:
        for token in self.kr_tokens:
            token.requires_grad_(False)

    def _grow(self, num_new_classes: int) -> None:
        token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, device=self.kt_token.device))
        nn.init.trunc_normal_(token, std=TOKEN_STD)
        self.kr_tokens.append(token)
        self.heads[-1].to(self.kt_token.device)

    def patch_tokens(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` backbone map -> ``(B, H*W, D)`` tokens with positional embedding."""
        if tuple(feature_map.shape[-2:]) != self.feature_hw:
            raise ValueError(
                f"feature map is {tuple(feature_map.shape[-2:])} but the positional embedding "
                f"was sized for {self.feature_hw}: feed images of the configured image_size"
            )
        return self.projection(feature_map).flatten(2).transpose(1, 2) + self.pos_embed

    def forward(
        self, images: torch.Tensor, stage_indices: Sequence[int] | None = None
    ) -> NetworkOutput:
        feature_map, stages = self.backbone_maps(images, stage_indices)
        patches = self.patch_tokens(feature_map)  # (B, N, D)
        kr_tokens = torch.cat([token.reshape(1, -1) for token in self.kr_tokens])  # (S, D)
        embeddings = self.block(self.kt_token.reshape(-1), kr_tokens, patches)  # (B, S, D)
        return NetworkOutput(
            logits=self.classify(embeddings),
            embeddings=embeddings,
            pooled=feature_map.mean(dim=(2, 3)),
            stages=stages,
        )

    def session_embeddings_loop(self, images: torch.Tensor) -> torch.Tensor:
        """Reference: every session's embedding by its own block pass, ``(B, S, D)``."""
        patches = self.patch_tokens(self.backbone(images))
        batch = patches.shape[0]
        outputs = []
        for token in self.kr_tokens:
            sequence = torch.cat(
                [self.kt_token.expand(batch, -1, -1), token.expand(batch, -1, -1), patches], dim=1
            )  # (B, 2 + N, D)
            outputs.append(self.block.forward_sequence(sequence))
        return torch.stack(outputs, dim=1)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

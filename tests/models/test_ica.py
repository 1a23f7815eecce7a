"""The ICA network (docs/method.md, network): one-pass sessions, growth and freezing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlcil.config import LossConfig, ModelConfig
from mlcil.methods.base import Batch
from mlcil.methods.krt import KRT, KRTParams
from mlcil.models import ClassAttentionBlock, ICANetwork, LinearNetwork, build_network
from mlcil.models.ica import ICAParams
from mlcil.protocol import sessions
from tiny import in_memory_context

SMALL = ModelConfig(
    backbone="resnet18", feature_stage=2, params=ICAParams(embed_dim=32, num_heads=4)
)


def small_network(sessions_sizes: tuple[int, ...] = (2,)) -> ICANetwork:
    torch.manual_seed(0)
    network = build_network(SMALL, image_size=32)
    for size in sessions_sizes:
        network.add_session(size)
    return network  # type: ignore[return-value]


def test_one_pass_equals_the_per_session_loop() -> None:
    network = small_network((3, 2, 2, 4))
    # Make the KR tokens and keys matter: larger weights than the N(0, 0.01) initialisation.
    with torch.no_grad():
        for token in network.kr_tokens:
            token.normal_(std=1.0)
        for linear in (network.block.q, network.block.k, network.block.v, network.block.proj):
            linear.weight.normal_(std=0.3)
    network.eval()
    images = torch.rand(5, 3, 32, 32)
    output = network(images)
    reference = network.session_embeddings_loop(images)
    assert output.embeddings.shape == (5, 4, 32)
    torch.testing.assert_close(output.embeddings, reference, atol=1e-5, rtol=1e-5)
    # The sessions really differ (the test is not comparing identical vectors).
    assert (reference[:, 0] - reference[:, 1]).abs().max() > 1e-3


def test_block_forward_matches_sequence_form_directly() -> None:
    torch.manual_seed(1)
    block = ClassAttentionBlock(16, 4)
    kt, kr, patches = torch.randn(16), torch.randn(3, 16), torch.randn(2, 7, 16)
    fast = block(kt, kr, patches)
    for session in range(3):
        sequence = torch.cat([kt.expand(2, 1, 16), kr[session].expand(2, 1, 16), patches], dim=1)
        torch.testing.assert_close(
            fast[:, session], block.forward_sequence(sequence), atol=1e-5, rtol=1e-5
        )


def test_shapes_initialisation_and_patch_count() -> None:
    network = small_network((2, 3))
    assert network.feature_hw == (4, 4)  # 32 px at stride 8
    assert network.pos_embed.shape == (1, 16, 32)
    output = network(torch.rand(2, 3, 32, 32))
    assert output.logits.shape == (2, 5) and output.pooled.shape == (2, 128)
    # Released initialisation: block Linear weights N(0, 0.01), biases zero; the first head's
    # weight too, its bias PyTorch's default (uniform +-1/sqrt(D), non-zero); the projection
    # Kaiming-normal with fan_out = D and leaky_relu's gain: std sqrt(2 / (1 + 0.01^2) / 32).
    assert abs(network.block.q.weight.std().item() - 0.01) < 0.003
    assert network.block.proj.bias.abs().max() == 0
    assert abs(network.heads[0][1].weight.std().item() - 0.01) < 0.005
    head_bias = network.heads[0][1].bias
    assert head_bias.abs().max() > 0 and head_bias.abs().max() <= 32**-0.5
    expected_std = (2 / (1 + 0.01**2) / 32) ** 0.5
    assert abs(network.projection.weight.std().item() - expected_std) < 0.1 * expected_std
    # Later heads keep PyTorch's default (uniform +-1/sqrt(D): std 1/sqrt(3 D) ~ 0.1).
    assert network.heads[1][1].weight.std().item() > 0.05
    with pytest.raises(ValueError, match="positional embedding"):
        network(torch.rand(1, 3, 40, 40))


def test_growth_freezes_old_tokens_and_heads_only() -> None:
    network = small_network((2, 2, 2))
    assert [t.requires_grad for t in network.kr_tokens] == [False, False, True]
    assert [all(p.requires_grad is False for p in h.parameters()) for h in network.heads] == [
        True,
        True,
        False,
    ]
    for shared in (network.kt_token, network.pos_embed, network.block.q.weight):
        assert shared.requires_grad
    assert all(p.requires_grad for p in network.backbone.parameters())


def test_a_training_step_leaves_old_tokens_and_heads_bit_identical() -> None:
    torch.manual_seed(0)
    network = build_network(SMALL, image_size=32)
    method = KRT(KRTParams(token_loss_weight=50.0, label_density=0.3), network, LossConfig())
    protocol = sessions(6, 0, 2)
    images, targets = torch.rand(6, 3, 32, 32), (torch.rand(6, 6) > 0.5).float()
    labels = np.ones((6, 6), dtype=np.uint8)

    for session in protocol[:2]:
        context = in_memory_context(session, protocol, labels)
        method.begin_session(context)
        optimizer = torch.optim.Adam(method.parameter_groups(), lr=1e-2, weight_decay=1e-4)
        if session.index == 1:
            before = {k: v.clone() for k, v in network.state_dict().items()}
        for _ in range(3):
            output = method.training_step(Batch(images, targets))
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()
        if session.index == 0:
            method.end_session(context)
    after = network.state_dict()
    old_keys = [k for k in after if k.startswith(("kr_tokens.0", "heads.0."))]
    assert old_keys and all(torch.equal(before[k], after[k]) for k in old_keys)
    # ... while shared and new parameters did move.
    for key in ("kt_token", "kr_tokens.1", "heads.1.1.weight", "block.q.weight"):
        assert not torch.equal(before[key], after[key]), key
    assert "token" in output.parts and "pseudo_pos" in output.parts


def test_linear_network_shares_one_embedding() -> None:
    torch.manual_seed(0)
    linear = ModelConfig(backbone="resnet18", feature_stage=2, network="linear")
    network = build_network(linear, 32)
    assert isinstance(network, LinearNetwork)
    network.add_session(2)
    network.add_session(3)
    output = network(torch.rand(2, 3, 32, 32), stage_indices=[1])
    assert output.logits.shape == (2, 5) and output.embeddings.shape == (2, 1, 128)
    assert output.stages is not None and output.stages[-1].shape == (2, 128, 4, 4)
    torch.testing.assert_close(network.retained_embedding(output, 1), output.pooled)
    assert not any(p.requires_grad for p in network.heads[0].parameters())


def test_pytorch_initialisation_option_keeps_default_weights() -> None:
    torch.manual_seed(0)
    config = ModelConfig(
        backbone="resnet18",
        feature_stage=2,
        params=ICAParams(embed_dim=32, num_heads=4, ica_init="pytorch"),
    )
    network = build_network(config, image_size=32)
    network.add_session(2)
    # nn.Linear's default: uniform(+-1/sqrt(fan_in)), std 1/sqrt(3 * 32) ~ 0.10, biases non-zero.
    assert abs(network.block.q.weight.std().item() - (3 * 32) ** -0.5) < 0.02
    assert network.block.proj.bias.abs().max() > 0
    assert network.heads[0][1].weight.std().item() > 0.05

"""Tests of mlcil.losses: ASL, token / sigmoid distillation and PODNet's pooled distillation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlcil.errors import MlcilError
from mlcil.losses import (
    asymmetric_loss,
    pod_flat,
    pod_spatial,
    sigmoid_distillation,
    token_distillation,
    token_distillation_weight,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------
# asymmetric_loss
# --------------------------------------------------------------------------------------------


def test_asl_hand_computed_1x2() -> None:
    # Element 0: logit 1, positive, gamma_pos 1.
    #   p = sigmoid(1) = 0.7310585786, log p = -0.3132616875, w = 1 - p = 0.2689414214
    #   loss_0 = 0.2689414214 * 0.3132616875 = 0.0842490435
    # Element 1: logit -2, negative, gamma_neg 2, clip 0.05.
    #   p = sigmoid(-2) = 0.1192029220, p_neg = min(1 - p + 0.05, 1) = 0.9307970780
    #   log p_neg = -0.0717139868, w = (1 - p_neg)^2 = 0.0692029220^2 = 0.0047890444
    #   loss_1 = 0.0047890444 * 0.0717139868 = 0.0003434415
    # Total = 0.0845924850
    p0 = _sigmoid(1.0)
    p_neg = min(1.0 - _sigmoid(-2.0) + 0.05, 1.0)
    expected = -(1.0 - p0) * math.log(p0) - (1.0 - p_neg) ** 2 * math.log(p_neg)
    assert expected == pytest.approx(0.0845924850, abs=1e-9)

    loss = asymmetric_loss(
        torch.tensor([[1.0, -2.0]]),
        torch.tensor([[1.0, 0.0]]),
        gamma_neg=2.0,
        gamma_pos=1.0,
        clip=0.05,
    )
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("clip", [0.0, None])
def test_asl_without_focusing_or_clip_is_summed_bce(clip: float | None) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen) * 3
    targets = (torch.rand(6, 5, generator=gen) > 0.5).float()
    loss = asymmetric_loss(logits, targets, gamma_neg=0.0, gamma_pos=0.0, clip=clip)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    assert loss.item() == pytest.approx(bce.item(), rel=1e-5)


def test_asl_clip_zeroes_confident_negative() -> None:
    # p = 0.02 with clip 0.05: p_neg = min(0.98 + 0.05, 1) = 1, log 1 = 0 -> no loss at all.
    logit = math.log(0.02 / 0.98)
    logits = torch.tensor([[logit]], requires_grad=True)
    loss = asymmetric_loss(logits, torch.zeros(1, 1), gamma_neg=4.0, clip=0.05)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None
    assert logits.grad.abs().item() == 0.0
    # Without the clip the same negative costs -(1 - 0.02)^0 * log(0.98) > 0 (gamma 0).
    unclipped = asymmetric_loss(logits.detach(), torch.zeros(1, 1), gamma_neg=0.0, clip=0.0)
    assert unclipped.item() == pytest.approx(-math.log(0.98), rel=1e-5)


def test_asl_focusing_weight_carries_no_gradient() -> None:
    # Negatives kept below the clip's saturation (p > clip) so the analytic formula applies.
    logits = torch.tensor([[0.7, -0.3, 1.5, -1.0], [-0.4, 2.0, 0.1, -2.2]])
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    gamma_neg, gamma_pos, clip = 3.0, 1.0, 0.05
    x = logits.clone().requires_grad_(True)
    asymmetric_loss(x, targets, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip).backward()

    # Analytic gradient with the weight w held constant:
    #   positive: d/dx [-w log p] = -w (1 - p),                 w = (1 - p)^gamma_pos
    #   negative: d/dx [-w log(1 - p + clip)] = w p (1 - p) / (1 - p + clip),
    #             w = (p - clip)^gamma_neg
    p = torch.sigmoid(logits)
    p_neg = 1 - p + clip
    grad_pos = -((1 - p) ** gamma_pos) * (1 - p)
    grad_neg = (1 - p_neg) ** gamma_neg * p * (1 - p) / p_neg
    expected = targets * grad_pos + (1 - targets) * grad_neg
    assert x.grad is not None
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-7)

    # The same loss with the weight inside the graph has a different gradient, so the check
    # above really distinguishes a detached weight.
    y = logits.clone().requires_grad_(True)
    py = torch.sigmoid(y)
    pn = 1 - py + clip
    w = targets * (1 - py) ** gamma_pos + (1 - targets) * (1 - pn) ** gamma_neg
    attached = -(w * (targets * torch.log(py) + (1 - targets) * torch.log(pn))).sum()
    attached.backward()
    assert y.grad is not None
    assert not torch.allclose(y.grad, expected, rtol=1e-3, atol=1e-5)


def test_asl_is_a_sum_over_the_batch() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 7, generator=gen)
    targets = (torch.rand(3, 7, generator=gen) > 0.7).float()
    single = asymmetric_loss(logits, targets)
    doubled = asymmetric_loss(torch.cat([logits, logits]), torch.cat([targets, targets]))
    assert doubled.item() == pytest.approx(2 * single.item(), rel=1e-6)


def test_asl_shape_mismatch_raises() -> None:
    with pytest.raises(MlcilError, match="same shape"):
        asymmetric_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_asl_float16_logits_upcast_to_float32() -> None:
    gen = torch.Generator().manual_seed(3)
    logits16 = (torch.randn(4, 6, generator=gen) * 4).half()
    targets = (torch.rand(4, 6, generator=gen) > 0.5).float()
    loss = asymmetric_loss(logits16, targets)
    assert loss.dtype == torch.float32
    reference = asymmetric_loss(logits16.float(), targets)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert math.isfinite(loss.item())


# --------------------------------------------------------------------------------------------
# token distillation
# --------------------------------------------------------------------------------------------


def test_token_distillation_identical_opposite_orthogonal() -> None:
    a = torch.tensor([[1.0, 2.0, -3.0], [0.5, 0.0, 4.0]])
    assert token_distillation(a, a).item() == pytest.approx(0.0, abs=1e-6)
    # Opposite rows: cos = -1, 1 - cos = 2.
    assert token_distillation(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    # Orthogonal rows: cos = 0, 1 - cos = 1.
    old = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    new = torch.tensor([[0.0, 2.0], [5.0, 0.0]])
    assert token_distillation(old, new).item() == pytest.approx(1.0, abs=1e-6)
    # Mixed batch: rows give 0 and 2 -> mean 1.
    mixed = token_distillation(
        torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [-1.0, 0.0]])
    )
    assert mixed.item() == pytest.approx(1.0, abs=1e-6)


def test_token_distillation_no_gradient_into_old_tokens() -> None:
    old = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    new = torch.tensor([[0.5, 1.0], [1.0, 1.0]], requires_grad=True)
    token_distillation(old, new).backward()
    assert old.grad is None
    assert new.grad is not None
    assert new.grad.abs().sum().item() > 0


def test_token_distillation_flattens_sessions() -> None:
    gen = torch.Generator().manual_seed(4)
    old = torch.randn(3, 4, 5, generator=gen)  # (B, S, D)
    new = torch.randn(3, 4, 5, generator=gen)
    manual_old = torch.cat([old[:, s] for s in range(4)], dim=1)  # (B, S*D)
    manual_new = torch.cat([new[:, s] for s in range(4)], dim=1)
    expected = (1 - F.cosine_similarity(manual_old, manual_new, dim=1)).mean()
    assert token_distillation(old, new).item() == pytest.approx(expected.item(), rel=1e-6)


def test_token_distillation_errors() -> None:
    with pytest.raises(MlcilError, match="same shape"):
        token_distillation(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(MlcilError, match=r"\(B, D\)"):
        token_distillation(torch.zeros(3), torch.zeros(3))
    with pytest.raises(MlcilError, match="empty"):
        token_distillation(torch.zeros(0, 3), torch.zeros(0, 3))


def test_token_distillation_weight_schedule() -> None:
    # 100 * sqrt(20 / 10) = 141.4213562
    assert token_distillation_weight(100.0, 20, 10) == pytest.approx(141.4213562, rel=1e-9)
    # 5 * sqrt(80 / 10) = 5 * 2.8284271 = 14.1421356
    assert token_distillation_weight(5.0, 80, 10) == pytest.approx(14.1421356, rel=1e-7)
    assert token_distillation_weight(3.0, 10, 10) == 3.0
    with pytest.raises(MlcilError, match="num_new_classes"):
        token_distillation_weight(1.0, 10, 0)
    with pytest.raises(MlcilError, match="num_seen_classes"):
        token_distillation_weight(1.0, 10, 20)
    with pytest.raises(MlcilError, match="base_weight"):
        token_distillation_weight(-1.0, 20, 10)


def test_pod_flat_matches_token_distillation() -> None:
    gen = torch.Generator().manual_seed(5)
    old, new = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    assert pod_flat(old, new).item() == pytest.approx(token_distillation(old, new).item())
    with pytest.raises(MlcilError, match=r"\(B, F\)"):
        pod_flat(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))


# --------------------------------------------------------------------------------------------
# sigmoid distillation
# --------------------------------------------------------------------------------------------


def test_sigmoid_distillation_equals_manual_bce() -> None:
    gen = torch.Generator().manual_seed(6)
    new = torch.randn(5, 4, generator=gen) * 2
    old = torch.randn(5, 4, generator=gen) * 2
    q = torch.sigmoid(old)
    p = torch.sigmoid(new)
    manual = -(q * torch.log(p) + (1 - q) * torch.log(1 - p)).sum()
    assert sigmoid_distillation(new, old).item() == pytest.approx(manual.item(), rel=1e-5)
    # Hand check on one element: new = old = 0 -> q = p = 0.5 -> -2 * 0.5 * log 0.5 = log 2.
    one = sigmoid_distillation(torch.zeros(1, 1), torch.zeros(1, 1))
    assert one.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_sigmoid_distillation_gradient_vanishes_at_agreement() -> None:
    gen = torch.Generator().manual_seed(7)
    old = torch.randn(3, 6, generator=gen)
    new = old.clone().requires_grad_(True)
    sigmoid_distillation(new, old).backward()
    assert new.grad is not None
    assert new.grad.abs().max().item() < 1e-6
    # Away from agreement the gradient is sigmoid(new) - sigmoid(old), and old gets none.
    old_leaf = old.clone().requires_grad_(True)
    shifted = (old + 1.0).requires_grad_(True)
    sigmoid_distillation(shifted, old_leaf).backward()
    assert shifted.grad is not None
    torch.testing.assert_close(shifted.grad, torch.sigmoid(old + 1.0) - torch.sigmoid(old))
    assert old_leaf.grad is None


def test_sigmoid_distillation_errors() -> None:
    with pytest.raises(MlcilError, match="same shape"):
        sigmoid_distillation(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(MlcilError, match=r"\(B, K\)"):
        sigmoid_distillation(torch.zeros(3), torch.zeros(3))


# --------------------------------------------------------------------------------------------
# pod_spatial
# --------------------------------------------------------------------------------------------


def test_pod_spatial_identical_features_is_zero() -> None:
    gen = torch.Generator().manual_seed(8)
    feats = [torch.rand(2, 3, 4, 5, generator=gen), torch.rand(2, 6, 2, 2, generator=gen)]
    assert pod_spatial(feats, [f.clone() for f in feats]).item() == pytest.approx(0.0, abs=1e-6)


def test_pod_spatial_hand_computed_1x1x2x2() -> None:
    # old = [[1, 0], [0, 0]]: sum over W (rows) = [1, 0], sum over H (columns) = [1, 0]
    #   -> [1, 0, 1, 0] / sqrt(2)
    # new = [[0, 0], [0, 1]]: rows [0, 1], columns [0, 1] -> [0, 1, 0, 1] / sqrt(2)
    # difference = [1, -1, 1, -1] / sqrt(2), norm = sqrt(4 / 2) = sqrt(2) = 1.4142136
    old = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    new = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])
    assert pod_spatial([old], [new]).item() == pytest.approx(math.sqrt(2.0), rel=1e-6)
    # Two stages: the identical one adds 0, the mean over stages halves: sqrt(2) / 2.
    two = pod_spatial([old, old], [new, old])
    assert two.item() == pytest.approx(math.sqrt(2.0) / 2, rel=1e-6)


def test_pod_spatial_invariant_to_positive_scaling() -> None:
    gen = torch.Generator().manual_seed(9)
    old = [torch.rand(3, 2, 4, 4, generator=gen)]
    new = [torch.rand(3, 2, 4, 4, generator=gen)]
    base = pod_spatial(old, new).item()
    assert base > 0.01
    scaled = pod_spatial([old[0] * 2.5], [new[0] * 0.1]).item()
    assert scaled == pytest.approx(base, rel=1e-5)
    assert pod_spatial(old, [old[0] * 7.0]).item() == pytest.approx(0.0, abs=1e-6)


def test_pod_spatial_no_gradient_into_old_features() -> None:
    gen = torch.Generator().manual_seed(10)
    old = torch.rand(2, 2, 3, 3, generator=gen).requires_grad_(True)
    new = torch.rand(2, 2, 3, 3, generator=gen).requires_grad_(True)
    pod_spatial([old], [new]).backward()
    assert old.grad is None
    assert new.grad is not None


def test_pod_spatial_errors() -> None:
    with pytest.raises(MlcilError, match="at least one stage"):
        pod_spatial([], [])
    with pytest.raises(MlcilError, match="same stages"):
        pod_spatial([torch.zeros(1, 1, 2, 2)], [torch.zeros(1, 1, 2, 2)] * 2)
    with pytest.raises(MlcilError, match="same shape"):
        pod_spatial([torch.zeros(1, 1, 2, 2)], [torch.zeros(1, 1, 2, 3)])
    with pytest.raises(MlcilError, match=r"\(B, C, H, W\)"):
        pod_spatial([torch.zeros(1, 2, 2)], [torch.zeros(1, 2, 2)])

"""Tests of mlcil.pseudo_labels: exact and iterative DPL thresholds, applying pseudo labels."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from mlcil.errors import MlcilError
from mlcil.pseudo_labels import (
    apply_pseudo_labels,
    dpl_threshold,
    iterative_dpl_threshold,
    target_positives_per_image,
)


def _count_above(scores: np.ndarray | torch.Tensor, tau: float) -> int:
    """Count of ``score > tau`` the way training does it: a float32 torch comparison."""
    tensor = torch.as_tensor(np.asarray(scores), dtype=torch.float32)
    return int((tensor > tau).sum().item())


def _reference_count(scores: np.ndarray, k: int) -> int:
    """Brute force: every count some threshold can produce, closest to k, smaller on ties."""
    flat = scores.astype(np.float32).ravel()
    reachable = {int((flat > v).sum()) for v in np.unique(flat)} | {flat.size}
    return min(reachable, key=lambda j: (abs(j - k), j))


# --------------------------------------------------------------------------------------------
# dpl_threshold
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "num_images", "num_classes", "target"),
    [(0, 50, 10, 1.3), (1, 200, 40, 1.45), (2, 7, 3, 0.5), (3, 1000, 19, 2.9), (4, 1, 5, 2.0)],
)
def test_dpl_threshold_hits_the_target_count_on_distinct_scores(
    seed: int, num_images: int, num_classes: int, target: float
) -> None:
    rng = np.random.default_rng(seed)
    n = num_images * num_classes
    # Distinct float32 values (spacing 1/n >> float32 resolution), in random positions.
    scores = (rng.permutation(n).astype(np.float32) / n + np.float32(0.5 / n)).reshape(
        num_images, num_classes
    )
    tau = dpl_threshold(scores, target)
    assert float(np.float32(tau)) == tau  # exactly representable in float32
    k = round(target * num_images)
    assert _count_above(scores, tau) == k
    # The same holds for a torch input.
    assert dpl_threshold(torch.from_numpy(scores), target) == tau


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_dpl_threshold_matches_brute_force_on_sigmoid_scores(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    # Sigmoid scores of confident logits, quantised to 1e-3 so that ties are common.
    scores = torch.round(torch.sigmoid(torch.randn(300, 12, generator=gen) * 3) * 1000) / 1000
    target = 2.9 / 80 * 12
    tau = dpl_threshold(scores, target)
    k = round(target * 300)
    assert _count_above(scores, tau) == _reference_count(scores.numpy(), k)


def test_dpl_threshold_ties_prefer_the_smaller_count() -> None:
    # Pooled scores 0.9 0.9 0.9 0.5 0.5 0.1 (N = 6 images, K = 1): reachable counts 0, 3, 5, 6.
    scores = np.array([[0.9], [0.5], [0.9], [0.1], [0.9], [0.5]], dtype=np.float32)
    # target 4/6 -> k = 4, equally far from 3 and 5 -> 3 (fewer false positives); tau = 0.5.
    tau = dpl_threshold(scores, 4 / 6)
    assert _count_above(scores, tau) == 3
    assert tau == float(np.float32(0.5))
    # k = 2 -> closest reachable is 3 (distance 1) rather than 0 (distance 2).
    assert _count_above(scores, dpl_threshold(scores, 2 / 6)) == 3
    # k = 1 -> 0 is closer than 3; tau = max score.
    tau = dpl_threshold(scores, 1 / 6)
    assert _count_above(scores, tau) == 0
    assert tau == float(np.float32(0.9))


def test_dpl_threshold_all_equal_scores() -> None:
    scores = np.full((4, 2), 0.5, dtype=np.float32)  # n = 8, reachable counts 0 and 8
    # target 1 -> k = 4: distance 4 to both 0 and 8 -> the smaller count, 0; tau = 0.5.
    tau = dpl_threshold(scores, 1.0)
    assert tau == 0.5
    assert _count_above(scores, tau) == 0
    # target 1.5 -> k = 6: 8 is closer; tau just below 0.5 in float32.
    tau = dpl_threshold(scores, 1.5)
    assert _count_above(scores, tau) == 8
    assert tau == float(np.nextafter(np.float32(0.5), np.float32(0)))


def test_dpl_threshold_all_zero_scores() -> None:
    scores = torch.zeros(10, 3)  # n = 30, reachable counts 0 and 30
    tau = dpl_threshold(scores, 1.0)  # k = 10 -> 0 is closer
    assert _count_above(scores, tau) == 0
    tau = dpl_threshold(scores, 2.0)  # k = 20 -> 30 is closer; tau < 0
    assert tau < 0
    assert _count_above(scores, tau) == 30


def test_dpl_threshold_extremes() -> None:
    rng = np.random.default_rng(5)
    scores = rng.random((20, 6)).astype(np.float32)
    tau = dpl_threshold(scores, 0.0)  # k = 0
    assert _count_above(scores, tau) == 0
    assert tau == float(scores.max())
    tau = dpl_threshold(scores, 6.0)  # k = n = 120
    assert _count_above(scores, tau) == 120
    tau = dpl_threshold(scores, 50.0)  # k = 1000 > n: clamped to all 120
    assert _count_above(scores, tau) == 120


def test_dpl_threshold_accepts_float64_and_does_not_modify_input() -> None:
    rng = np.random.default_rng(6)
    scores = rng.random((30, 4))  # float64
    before = scores.copy()
    tau = dpl_threshold(scores, 1.0)
    assert _count_above(scores, tau) == 30
    np.testing.assert_array_equal(scores, before)


def test_dpl_threshold_errors() -> None:
    with pytest.raises(MlcilError, match="NaN"):
        dpl_threshold(np.array([[0.1, np.nan]]), 1.0)
    with pytest.raises(MlcilError, match="empty"):
        dpl_threshold(np.zeros((0, 5)), 1.0)
    with pytest.raises(MlcilError, match="target_per_image"):
        dpl_threshold(np.zeros((2, 5)), -0.5)
    with pytest.raises(MlcilError, match=r"\(N, K\)"):
        dpl_threshold(np.zeros(5), 1.0)


# --------------------------------------------------------------------------------------------
# iterative_dpl_threshold
# --------------------------------------------------------------------------------------------


def test_iterative_dpl_threshold_converges(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(7)
    scores = rng.random((400, 10)).astype(np.float32)
    target = 0.5  # about 10 * (1 - tau) positives per image -> tau near 0.95
    with caplog.at_level(logging.WARNING, logger="mlcil.pseudo_labels"):
        tau = iterative_dpl_threshold(scores, target)
    mean = _count_above(scores, tau) / 400
    assert abs(mean - target) <= 0.1
    assert 0.9 < tau < 1.0
    assert not caplog.records


def test_iterative_dpl_threshold_returns_start_when_already_within_tolerance() -> None:
    # Per image: 0.85 and 0.95 above the start 0.8, 0.1 below -> m(0.8) = 2 = target.
    scores = np.tile(np.array([0.85, 0.95, 0.1], dtype=np.float32), (5, 1))
    assert iterative_dpl_threshold(scores, 2.0) == 0.8


def test_iterative_dpl_threshold_unreachable_warns_instead_of_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # All scores 0.9 with 4 classes: m(tau) is 4 below 0.9 and 0 from 0.9 up; a target of 2
    # can never be within 0.1. Both counts miss by 2, so the closest visit has error 2.
    scores = np.full((8, 4), 0.9, dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="mlcil.pseudo_labels"):
        tau = iterative_dpl_threshold(scores, 2.0)
    assert 0.0 <= tau <= 1.0
    assert abs(_count_above(scores, tau) / 8 - 2.0) == 2.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "did not converge" in warnings[0].getMessage()


def test_iterative_dpl_threshold_returns_closest_visited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Per image 0.9 0.9 0.9 0.1 0.1, target 2.5: m is 3 for tau in [0.1, 0.9) and 0 from 0.9.
    # From 0.8 the search climbs in steps of 0.005 (m = 3 > 2.5) to 0.9 (m = 0), then bounces
    # between about 0.895 and 0.9. The visits with m = 3 miss by 0.5, those with m = 0 by 2.5,
    # so the answer is the last visit below 0.9, about 0.895.
    scores = np.tile(np.array([0.9, 0.9, 0.1, 0.9, 0.1], dtype=np.float32), (6, 1))
    with caplog.at_level(logging.WARNING, logger="mlcil.pseudo_labels"):
        tau = iterative_dpl_threshold(scores, 2.5)
    assert _count_above(scores, tau) == 3 * 6
    assert tau == pytest.approx(0.895, abs=1e-9)
    assert any("did not converge" in r.getMessage() for r in caplog.records)


def test_iterative_dpl_threshold_single_iteration_returns_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scores = np.full((3, 3), 0.5, dtype=np.float32)  # m(0.8) = 0, target 2: not converged
    with caplog.at_level(logging.WARNING, logger="mlcil.pseudo_labels"):
        tau = iterative_dpl_threshold(scores, 2.0, max_iterations=1)
    assert tau == 0.8
    assert len(caplog.records) == 1


def test_iterative_dpl_threshold_errors() -> None:
    scores = np.full((2, 2), 0.5)
    with pytest.raises(MlcilError, match="NaN"):
        iterative_dpl_threshold(np.array([[np.nan]]), 1.0)
    with pytest.raises(MlcilError, match="step"):
        iterative_dpl_threshold(scores, 1.0, step=0.0)
    with pytest.raises(MlcilError, match="start"):
        iterative_dpl_threshold(scores, 1.0, start=1.5)
    with pytest.raises(MlcilError, match="max_iterations"):
        iterative_dpl_threshold(scores, 1.0, max_iterations=0)
    with pytest.raises(MlcilError, match="target_per_image"):
        iterative_dpl_threshold(scores, -1.0)


# --------------------------------------------------------------------------------------------
# apply_pseudo_labels and target_positives_per_image
# --------------------------------------------------------------------------------------------


def test_apply_pseudo_labels_adds_only_old_positives() -> None:
    # 3 old classes then 2 new ones.
    targets = torch.tensor(
        [
            [1.0, 0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0, 0.0, 1.0],
        ]
    )
    old_scores = torch.tensor(
        [
            [0.1, 0.95, 0.7],
            [0.8, 0.2, 0.1],
        ]
    )
    before = targets.clone()
    out = apply_pseudo_labels(targets, old_scores, 0.7)
    expected = torch.tensor(
        [
            [1.0, 1.0, 0.0, 1.0, 0.0],  # GT kept at score 0.1; 0.95 added; 0.7 is not > 0.7
            [1.0, 0.0, 1.0, 0.0, 1.0],  # 0.8 added; GT kept at score 0.1
        ]
    )
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(targets, before)  # input untouched
    assert out.data_ptr() != targets.data_ptr()


def test_apply_pseudo_labels_never_touches_new_columns() -> None:
    gen = torch.Generator().manual_seed(8)
    targets = (torch.rand(16, 10, generator=gen) > 0.8).float()
    old_scores = torch.rand(16, 6, generator=gen)
    out = apply_pseudo_labels(targets, old_scores, 0.0)  # every old column becomes positive
    assert torch.equal(out[:, :6], torch.ones(16, 6))
    assert torch.equal(out[:, 6:], targets[:, 6:])
    # With an unreachable threshold nothing changes at all.
    assert torch.equal(apply_pseudo_labels(targets, old_scores, 1.0), targets)


def test_apply_pseudo_labels_uses_dpl_threshold_count() -> None:
    gen = torch.Generator().manual_seed(9)
    scores = torch.rand(64, 8, generator=gen).half()  # compared in float32 either way
    tau = dpl_threshold(scores, 1.0)
    out = apply_pseudo_labels(torch.zeros(64, 12), scores, tau)
    assert int(out.sum().item()) == _reference_count(scores.float().numpy(), 64)


def test_apply_pseudo_labels_errors() -> None:
    with pytest.raises(MlcilError, match="does not fit"):
        apply_pseudo_labels(torch.zeros(2, 3), torch.zeros(2, 4), 0.5)
    with pytest.raises(MlcilError, match="does not fit"):
        apply_pseudo_labels(torch.zeros(2, 3), torch.zeros(3, 2), 0.5)
    with pytest.raises(MlcilError, match="2-D"):
        apply_pseudo_labels(torch.zeros(2, 3), torch.zeros(2), 0.5)


def test_target_positives_per_image() -> None:
    # COCO density 2.9 / 80 with 40 old classes: 2.9 / 80 * 40 = 1.45.
    assert target_positives_per_image(2.9 / 80, 40) == pytest.approx(1.45)
    assert target_positives_per_image(0.07, 0) == 0.0
    with pytest.raises(MlcilError, match="label_density"):
        target_positives_per_image(0.0, 10)
    with pytest.raises(MlcilError, match="label_density"):
        target_positives_per_image(1.5, 10)
    with pytest.raises(MlcilError, match="num_old_classes"):
        target_positives_per_image(0.5, -1)

"""Diagnostics: pseudo-label quality, embedding drift and logit drift."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score

from mlcil.errors import MlcilError
from mlcil.metrics.diagnostics import embedding_drift, logit_drift, pseudo_label_quality

# 4 images x 3 old classes.
PSEUDO = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
HIDDEN = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 0], [1, 0, 1]])


def test_pseudo_label_quality_against_a_hand_count() -> None:
    # Pseudo positives: 2 + 1 + 2 + 0 = 5. Hidden positives: 1 + 2 + 1 + 2 = 6.
    # Both at (0, 0), (1, 1), (2, 1): 3 true positives.
    # Precision 3/5 = 60 %, recall 3/6 = 50 %, F1 = 2 * 60 * 50 / 110 = 54.54... %.
    result = pseudo_label_quality(PSEUDO, HIDDEN)
    assert result["pseudo_positives"] == 5
    assert result["hidden_positives"] == 6
    assert result["true_positives"] == 3
    assert result["precision"] == pytest.approx(60.0)
    assert result["recall"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(6000.0 / 110.0)
    assert result["per_image"] == pytest.approx(5 / 4)
    assert result["hidden_per_image"] == pytest.approx(6 / 4)
    assert isinstance(result["true_positives"], int)


def test_pseudo_label_quality_matches_sklearn_micro_averages() -> None:
    rng = np.random.default_rng(0)
    hidden = (rng.random((60, 7)) < 0.3).astype(np.int64)
    pseudo = (rng.random((60, 7)) < 0.25).astype(np.float32)
    result = pseudo_label_quality(pseudo, hidden)
    assert result["precision"] == pytest.approx(
        100 * precision_score(hidden, pseudo, average="micro")
    )
    assert result["recall"] == pytest.approx(100 * recall_score(hidden, pseudo, average="micro"))
    assert result["f1"] == pytest.approx(100 * f1_score(hidden, pseudo, average="micro"))


def test_pseudo_label_quality_accepts_tensors() -> None:
    from_tensors = pseudo_label_quality(torch.tensor(PSEUDO).bool(), torch.tensor(HIDDEN).float())
    assert from_tensors == pseudo_label_quality(PSEUDO, HIDDEN)


def test_undefined_ratios_are_none() -> None:
    nothing_restored = pseudo_label_quality(np.zeros((2, 3)), HIDDEN[:2])
    assert nothing_restored["precision"] is None and nothing_restored["f1"] is None
    assert nothing_restored["recall"] == 0.0 and nothing_restored["per_image"] == 0.0
    nothing_hidden = pseudo_label_quality(PSEUDO, np.zeros_like(PSEUDO))
    assert nothing_hidden["recall"] is None and nothing_hidden["precision"] == 0.0
    # Both defined but no hit: F1 is 0, not undefined.
    all_wrong = pseudo_label_quality([[1, 0]], [[0, 1]])
    assert all_wrong["precision"] == 0.0 and all_wrong["recall"] == 0.0 and all_wrong["f1"] == 0.0
    no_images = pseudo_label_quality(np.zeros((0, 3)), np.zeros((0, 3)))
    assert no_images["per_image"] is None and no_images["precision"] is None


@pytest.mark.parametrize(
    ("pseudo", "hidden", "message"),
    [
        (PSEUDO, HIDDEN[:3], r"\(4, 3\).*\(3, 3\)"),
        (PSEUDO * 2, HIDDEN, r"pseudo_labels.*0/1.*\(0, 0\)"),
        (PSEUDO, HIDDEN - 0.5, r"hidden_labels.*0/1"),
        (PSEUDO[0], HIDDEN[0], r"pseudo_labels must be a 2-D"),
        (PSEUDO.astype(str), HIDDEN, r"pseudo_labels.*dtype"),
    ],
)
def test_pseudo_label_quality_rejects_bad_input(
    pseudo: np.ndarray, hidden: np.ndarray, message: str
) -> None:
    with pytest.raises(MlcilError, match=message):
        pseudo_label_quality(pseudo, hidden)


def test_embedding_drift_of_hand_made_vectors() -> None:
    # 2 images x 3 slots x 2 dims. Slot 0: unchanged. Slot 1: image 0 turned by 90 degrees
    # (cos 0: distance 1, ||a - b|| / ||b|| = sqrt 2), image 1 reversed (distance 2, change 2).
    # Slot 2: image 0 scaled by 3 (same direction: distance 0, change 2), image 1 unchanged.
    before = np.array(
        [
            [[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]],
            [[3.0, 4.0], [0.0, 1.0], [1.0, 1.0]],
        ]
    )
    after = np.array(
        [
            [[1.0, 0.0], [0.0, 1.0], [0.0, 6.0]],
            [[3.0, 4.0], [0.0, -1.0], [1.0, 1.0]],
        ]
    )
    result = embedding_drift(before, after)
    assert result["num_images"] == 2 and result["num_slots"] == 3
    assert result["cosine_distance"] == pytest.approx([0.0, 1.5, 0.0])
    assert result["relative_l2"] == pytest.approx([0.0, (math.sqrt(2) + 2) / 2, 1.0])
    assert result["mean_cosine_distance"] == pytest.approx(3.0 / 6)
    assert result["mean_relative_l2"] == pytest.approx((math.sqrt(2) + 2 + 2) / 6)


@pytest.mark.parametrize(
    ("after", "distance", "change"),
    [
        ([[2.0, 0.0, 0.0]], 0.0, 0.0),  # identical
        ([[0.0, 2.0, 0.0]], 1.0, math.sqrt(2)),  # orthogonal, same length
        ([[-2.0, 0.0, 0.0]], 2.0, 2.0),  # opposite
    ],
)
def test_embedding_drift_of_single_slot_vectors(
    after: list[list[float]], distance: float, change: float
) -> None:
    result = embedding_drift(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor(after))
    assert result["num_slots"] == 1
    assert result["cosine_distance"] == pytest.approx([distance], abs=1e-12)
    assert result["relative_l2"] == pytest.approx([change])
    assert result["mean_cosine_distance"] == pytest.approx(distance, abs=1e-12)


def test_embedding_drift_rejects_bad_input() -> None:
    with pytest.raises(MlcilError, match="slice"):
        embedding_drift(np.ones((2, 2, 4)), np.ones((2, 3, 4)))
    with pytest.raises(
        MlcilError, match=r"before has a zero embedding at \(image, slot\) \(1, 0\)"
    ):
        embedding_drift(np.array([[1.0, 1.0], [0.0, 0.0]]), np.ones((2, 2)))
    with pytest.raises(MlcilError, match="NaN"):
        embedding_drift(np.array([[np.nan, 1.0]]), np.ones((1, 2)))
    with pytest.raises(MlcilError, match=r"\(N, S, D\)"):
        embedding_drift(np.ones(4), np.ones(4))


def test_embedding_drift_of_no_images() -> None:
    result = embedding_drift(np.zeros((0, 2, 4)), np.zeros((0, 2, 4)))
    assert result["cosine_distance"] == [None, None] and result["mean_relative_l2"] is None


def test_logit_drift_against_a_hand_count() -> None:
    before = np.array([[2.0, -1.0, 0.0], [-3.0, 0.5, 4.0]])
    after = np.array([[-2.0, -1.0, 1.0], [3.0, -0.5, 4.0]])
    # |sigmoid(x) - sigmoid(-x)| = tanh(x / 2) and sigmoid(1) - sigmoid(0) = tanh(1/2) / 2.
    changes = [math.tanh(1.0), 0.0, math.tanh(0.5) / 2, math.tanh(1.5), math.tanh(0.25), 0.0]
    # Decisions (score >= 0.5, i.e. logit >= 0) before: on off on / off on on;
    # after: off off on / on off on. (0, 0) and (1, 1) turned off, (1, 0) turned on; (0, 2) sits
    # exactly at 0.5 before, which counts as on, so it does not flip.
    result = logit_drift(before, after)
    assert result["mean_abs_score_change"] == pytest.approx(sum(changes) / 6)
    assert result["turned_off"] == 2 and result["turned_on"] == 1 and result["flipped"] == 3
    assert result["flip_fraction"] == pytest.approx(0.5)
    assert result["num_pairs"] == 6


def test_logit_drift_with_another_threshold_and_tensors() -> None:
    # At 0.8 (logit ln 4 = 1.386): 2.0 and 4.0 are on; after, only 4.0 is.
    result = logit_drift(
        torch.tensor([[2.0, -1.0], [4.0, 0.5]]), torch.tensor([[1.0, -1.0], [4.0, 1.3]]), 0.8
    )
    assert result["turned_off"] == 1 and result["turned_on"] == 0
    assert result["flip_fraction"] == pytest.approx(0.25)


def test_logit_drift_rejects_bad_input_and_handles_no_pairs() -> None:
    with pytest.raises(MlcilError, match="same shape"):
        logit_drift(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(MlcilError, match="inf"):
        logit_drift(np.array([[np.inf]]), np.zeros((1, 1)))
    with pytest.raises(MlcilError, match="threshold"):
        logit_drift(np.zeros((1, 1)), np.zeros((1, 1)), threshold=1.0)
    empty = logit_drift(np.zeros((0, 3)), np.zeros((0, 3)))
    assert empty["mean_abs_score_change"] is None and empty["flip_fraction"] is None

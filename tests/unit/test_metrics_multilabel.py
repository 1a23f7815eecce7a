"""Tests for mlcil.metrics.multilabel: AP/mAP (with ties), F1 family, session mAPs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
)

from mlcil.errors import MlcilError
from mlcil.metrics import (
    average_precision,
    classes_without_positives,
    f1_scores,
    mean_average_precision,
    session_maps,
)


def _random_problem(
    seed: int, n_images: int = 300, n_classes: int = 25, decimals: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Random scores correlated with random targets; every class gets at least one positive."""
    rng = np.random.default_rng(seed)
    targets = rng.random((n_images, n_classes)) < rng.uniform(0.05, 0.5, size=n_classes)
    targets[0] = True  # no class without positives (sklearn would warn and return 0 anyway)
    scores = rng.normal(size=(n_images, n_classes)) + 1.5 * targets
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores, targets


def _sklearn_ap(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.array(
        [average_precision_score(targets[:, c], scores[:, c]) for c in range(scores.shape[1])]
    )


# --------------------------------------------------------------------------- AP by hand


def test_ap_hand_computed_without_ties() -> None:
    # Ranked: 0.9(+) 0.8(-) 0.7(+) 0.6(-) 0.5(+).
    # Precision at each positive: 1/1, 2/3, 3/5 -> AP = (1 + 2/3 + 3/5) / 3 = 34/45.
    scores = np.array([[0.6], [0.9], [0.5], [0.8], [0.7]])
    targets = np.array([[0], [1], [1], [0], [1]])
    ap = average_precision(scores, targets)
    assert ap.shape == (1,)
    assert ap[0] == pytest.approx(34 / 45)
    assert mean_average_precision(scores, targets) == pytest.approx(100 * 34 / 45)


def test_ap_hand_computed_with_ties() -> None:
    # Blocks by score: {0.9: -}, {0.5: +, -, +}, {0.1: +}.
    # End of block 2: 2 TP among 4 images -> both of its positives get 2/4.
    # End of block 3: 3 TP among 5 images -> 3/5.
    # AP = (1/2 + 1/2 + 3/5) / 3 = 8/15. (Positives-first order inside the tie would give
    # (1/2 + 2/3 + 3/5)/3 and negatives-first (1/3 + 2/4 + 3/5)/3: the rule sits between.)
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.5])
    targets = np.array([1, 0, 0, 1, 1])
    ap = average_precision(scores, targets)  # 1-D input = one class
    assert ap.shape == (1,)
    assert ap[0] == pytest.approx(8 / 15)


def test_ap_all_scores_tied_equals_prevalence() -> None:
    # One block holding everything: every positive gets precision = positives / images.
    scores = np.zeros((8, 2))
    targets = np.array([[1, 1], [0, 1], [1, 1], [0, 1], [0, 0], [0, 0], [0, 0], [0, 1]])
    np.testing.assert_allclose(average_precision(scores, targets), [2 / 8, 5 / 8])


def test_ap_perfect_and_worst_ranking() -> None:
    scores = np.array([[4.0, 4.0], [3.0, 3.0], [2.0, 2.0], [1.0, 1.0]])
    # Class 0: positives ranked first -> AP 1. Class 1: positives ranked last (ranks 3, 4)
    # -> (1/3 + 2/4) / 2 = 5/12.
    targets = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    np.testing.assert_allclose(average_precision(scores, targets), [1.0, 5 / 12])


# --------------------------------------------------------------------------- AP vs sklearn


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ap_matches_sklearn_without_ties(seed: int) -> None:
    scores, targets = _random_problem(seed, n_images=400, n_classes=40)
    assert all(np.unique(scores[:, c]).size == scores.shape[0] for c in range(40))
    np.testing.assert_allclose(average_precision(scores, targets), _sklearn_ap(scores, targets))


@pytest.mark.parametrize(("seed", "decimals"), [(10, 1), (11, 1), (12, 0), (13, 2)])
def test_ap_matches_sklearn_with_heavy_ties(seed: int, decimals: int) -> None:
    scores, targets = _random_problem(seed, n_images=400, n_classes=30, decimals=decimals)
    # Make sure the data really is tied in every column, or this would not test the tie rule.
    assert all(np.unique(scores[:, c]).size < 0.9 * scores.shape[0] for c in range(30))
    np.testing.assert_allclose(average_precision(scores, targets), _sklearn_ap(scores, targets))


@pytest.mark.parametrize("decimals", [None, 1])
def test_ap_invariant_to_image_order(decimals: int | None) -> None:
    scores, targets = _random_problem(5, n_images=200, n_classes=15, decimals=decimals)
    expected = average_precision(scores, targets)
    rng = np.random.default_rng(99)
    for _ in range(5):
        perm = rng.permutation(scores.shape[0])
        np.testing.assert_allclose(
            average_precision(scores[perm], targets[perm]), expected, rtol=0, atol=1e-12
        )


def test_ap_on_a_coco_sized_input_is_correct() -> None:
    # 40k x 80 is the COCO test-set size (its speed is measured in benchmarks/speed.py).
    rng = np.random.default_rng(7)
    targets = rng.random((40_000, 80)) < 0.05
    scores = np.round(rng.random((40_000, 80)) + targets, 3)
    ap = average_precision(scores, targets)
    for c in (0, 41, 79):
        assert ap[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c]))


# --------------------------------------------------------------------------- input types


def test_torch_and_numpy_inputs_agree() -> None:
    scores, targets = _random_problem(3, decimals=1)
    scores32 = scores.astype(np.float32)
    expected = average_precision(scores32, targets)
    from_torch = average_precision(
        torch.from_numpy(scores32).requires_grad_(True), torch.from_numpy(targets)
    )
    np.testing.assert_array_equal(from_torch, expected)
    assert mean_average_precision(torch.from_numpy(scores32), torch.from_numpy(targets)) == (
        pytest.approx(mean_average_precision(scores32, targets))
    )
    assert f1_scores(torch.from_numpy(scores32), torch.from_numpy(targets), 0.5) == (
        f1_scores(scores32, targets, 0.5)
    )


def test_bfloat16_tensor_is_accepted() -> None:
    scores = torch.tensor([[0.5], [0.25], [0.75]], dtype=torch.bfloat16)
    targets = torch.tensor([[1], [0], [0]])
    # Ranked: 0.75(-) 0.5(+) 0.25(-) -> AP = 1/2.
    assert average_precision(scores, targets)[0] == pytest.approx(0.5)


def test_bool_int_float_targets_agree() -> None:
    scores, targets = _random_problem(4)
    as_bool = average_precision(scores, targets)
    np.testing.assert_array_equal(average_precision(scores, targets.astype(np.int64)), as_bool)
    np.testing.assert_array_equal(average_precision(scores, targets.astype(np.float32)), as_bool)
    assert f1_scores(scores, targets.astype(float), 0.0) == f1_scores(scores, targets, 0.0)


# --------------------------------------------------------------------------- no positives


def test_class_without_positives_gets_zero_and_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4], [0.4, 0.3, 0.5]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    assert classes_without_positives(targets) == [2]
    with caplog.at_level(logging.WARNING, logger="mlcil.metrics.multilabel"):
        ap = average_precision(scores, targets)
    np.testing.assert_allclose(ap, [1.0, 1.0, 0.0])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "[2]" in warnings[0].getMessage()
    # The zero AP is counted in the mean, as in the KRT evaluation.
    assert mean_average_precision(scores, targets) == pytest.approx(200 / 3)


def test_no_warning_when_every_class_has_positives(caplog: pytest.LogCaptureFixture) -> None:
    scores, targets = _random_problem(8)
    with caplog.at_level(logging.WARNING, logger="mlcil.metrics.multilabel"):
        average_precision(scores, targets)
    assert not caplog.records
    assert classes_without_positives(targets) == []


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_score_is_an_error(bad: float) -> None:
    scores = np.array([[0.1, 0.2], [0.3, bad]])
    targets = np.array([[1, 0], [0, 1]])
    with pytest.raises(MlcilError, match="NaN/inf"):
        average_precision(scores, targets)
    with pytest.raises(MlcilError, match="NaN/inf"):
        f1_scores(scores, targets)


@pytest.mark.parametrize("bad", [2, 0.5, -1, np.nan])
def test_non_binary_target_is_an_error(bad: float) -> None:
    scores = np.array([[0.1, 0.2], [0.3, 0.4]])
    targets = np.array([[1.0, 0.0], [0.0, bad]])
    with pytest.raises(MlcilError, match="binary"):
        average_precision(scores, targets)
    with pytest.raises(MlcilError, match="binary"):
        f1_scores(scores, targets)
    with pytest.raises(MlcilError, match="binary"):
        classes_without_positives(targets)


def test_shape_mismatch_is_an_error_naming_both_shapes() -> None:
    with pytest.raises(MlcilError) as info:
        average_precision(np.zeros((4, 3)), np.zeros((4, 2)))
    assert "(4, 3)" in str(info.value)
    assert "(4, 2)" in str(info.value)
    with pytest.raises(MlcilError, match="2-D"):
        average_precision(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))
    # MlcilError is a ValueError, so generic callers can catch it.
    with pytest.raises(ValueError):
        mean_average_precision(np.zeros(3), np.zeros((3, 1)))


# --------------------------------------------------------------------------- F1 family


def test_f1_scores_hand_computed() -> None:
    scores = np.array([[0.9, 0.2], [0.5, 0.7], [0.1, 0.6]])
    targets = np.array([[1, 0], [0, 1], [1, 0]])
    # threshold 0.5 -> predicted [[1, 0], [1, 1], [0, 1]] (0.5 counts as positive).
    # class 0: TP 1, FP 1, FN 1 -> P 1/2, R 1/2, F1 1/2
    # class 1: TP 1, FP 1, FN 0 -> P 1/2, R 1,   F1 2/3
    # CP 1/2, CR 3/4, CF1 = 2 * 1/2 * 3/4 / (5/4) = 3/5
    # OP = 2/4, OR = 2/3, OF1 = 2 * 1/2 * 2/3 / (7/6) = 4/7; mean class F1 = 7/12
    result = f1_scores(scores, targets, threshold=0.5)
    expected = {
        "cp": 50.0,
        "cr": 75.0,
        "cf1": 60.0,
        "op": 50.0,
        "or": 200 / 3,
        "of1": 400 / 7,
        "mean_class_f1": 700 / 12,
    }
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def test_f1_threshold_boundary_is_inclusive() -> None:
    targets = np.array([[1], [0]])
    at = np.array([[0.8], [0.1]])
    below = np.array([[np.nextafter(0.8, 0.0)], [0.1]])
    assert f1_scores(at, targets)["op"] == pytest.approx(100.0)  # default threshold is 0.8
    assert f1_scores(at, targets)["or"] == pytest.approx(100.0)
    assert f1_scores(below, targets)["or"] == 0.0


def test_f1_zero_division_is_zero() -> None:
    # Nothing predicted, one class without positives: every 0/0 must come out as 0, not NaN.
    scores = np.zeros((3, 2))
    targets = np.array([[1, 0], [0, 0], [1, 0]])
    result = f1_scores(scores, targets, threshold=0.5)
    assert result == {key: 0.0 for key in ("cp", "cr", "cf1", "op", "or", "of1", "mean_class_f1")}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_scores_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    targets = (rng.random((500, 20)) < 0.2).astype(int)
    targets[:, 3] = 0  # a class with no positives exercises the zero-division convention
    probs = 1 / (1 + np.exp(-(rng.normal(size=targets.shape) + 2 * targets - 1)))
    threshold = 0.6
    predicted = (probs >= threshold).astype(int)
    result = f1_scores(probs, targets, threshold=threshold)

    kwargs = {"zero_division": 0}
    cp = precision_score(targets, predicted, average="macro", **kwargs)
    cr = recall_score(targets, predicted, average="macro", **kwargs)
    assert result["cp"] == pytest.approx(100 * cp)
    assert result["cr"] == pytest.approx(100 * cr)
    # CF1 is the harmonic mean of macro P and R, which is not sklearn's macro F1 ...
    assert result["cf1"] == pytest.approx(100 * 2 * cp * cr / (cp + cr))
    macro_f1 = f1_score(targets, predicted, average="macro", **kwargs)
    assert result["cf1"] != pytest.approx(100 * macro_f1)
    # ... which is what mean_class_f1 is.
    assert result["mean_class_f1"] == pytest.approx(100 * macro_f1)
    assert result["op"] == pytest.approx(
        100 * precision_score(targets, predicted, average="micro", **kwargs)
    )
    assert result["or"] == pytest.approx(
        100 * recall_score(targets, predicted, average="micro", **kwargs)
    )
    assert result["of1"] == pytest.approx(
        100 * f1_score(targets, predicted, average="micro", **kwargs)
    )


# --------------------------------------------------------------------------- session mAPs


def test_session_maps_hand_example() -> None:
    column = np.array([0.9, 0.8, 0.3, 0.1])
    scores = np.stack([column, column, column], axis=1)
    targets = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1]])
    # class 0: positives at ranks 1, 2 -> AP 1
    # class 1: positive at rank 2 -> AP 1/2
    # class 2: positives at ranks 3, 4 -> (1/3 + 2/4) / 2 = 5/12
    result = session_maps(scores, targets, base_classes=[0, 1], new_classes=[2])
    np.testing.assert_allclose(result["ap"], [1.0, 0.5, 5 / 12])
    assert isinstance(result["ap"], list)
    assert result["seen_map"] == pytest.approx(100 * (1 + 0.5 + 5 / 12) / 3)
    assert result["base_map"] == pytest.approx(75.0)
    assert result["new_map"] == pytest.approx(500 / 12)
    assert result["classes_without_positives"] == []


def test_session_maps_base_session_and_missing_positives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scores = np.array([[0.9, 0.2], [0.1, 0.7]])
    targets = np.array([[1, 0], [0, 0]])
    with caplog.at_level(logging.WARNING, logger="mlcil.metrics.multilabel"):
        result = session_maps(scores, targets, base_classes=[0, 1], new_classes=[])
    assert result["classes_without_positives"] == [1]
    assert result["ap"] == [1.0, 0.0]
    assert result["seen_map"] == pytest.approx(50.0)
    assert result["base_map"] == pytest.approx(50.0)
    assert result["new_map"] is None  # no new classes in the base session
    assert len(caplog.records) == 1


def test_session_maps_rejects_bad_class_lists() -> None:
    scores = np.zeros((2, 3))
    targets = np.array([[1, 0, 1], [0, 1, 0]])
    with pytest.raises(MlcilError, match="outside"):
        session_maps(scores, targets, base_classes=[0, 1], new_classes=[3])
    with pytest.raises(MlcilError, match="duplicate"):
        session_maps(scores, targets, base_classes=[0, 0], new_classes=[2])

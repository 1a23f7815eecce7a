"""Tests of subset_maps: the released evaluation's base/new mAP, each on its own image subset."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mlcil.errors import MlcilError
from mlcil.metrics.multilabel import session_maps, subset_maps

# 5 images x 3 classes; classes 0, 1 are the base classes, class 2 is new.
_TARGETS = np.array(
    [
        [1, 0, 0],
        [0, 1, 1],
        [0, 0, 1],
        [1, 1, 0],
        [0, 0, 1],
    ]
)
_SCORES = np.array(
    [
        [0.2, 0.6, 0.7],
        [0.9, 0.3, 0.4],
        [0.8, 0.95, 0.6],
        [0.7, 0.4, 0.9],
        [0.1, 0.5, 0.2],
    ]
)


def test_hand_computed_case_where_the_two_definitions_differ() -> None:
    # Base subset = images 0, 1, 3 (they show class 0 or 1).
    #   class 0 ranks 1 (neg) 3 (pos) 0 (pos): AP = (1/2 + 2/3) / 2 = 7/12
    #   class 1 ranks 0 (neg) 3 (pos) 1 (pos): AP = 7/12
    # New subset = images 1, 2, 4 (they show class 2): all positive, AP = 1.
    result = subset_maps(_SCORES, _TARGETS, base_classes=[0, 1], new_classes=[2])
    assert result == {
        "base_map_subset": pytest.approx(100 * 7 / 12),
        "new_map_subset": pytest.approx(100.0),
    }
    # Over all 5 images (session_maps):
    #   class 0 ranks 1 n, 2 n, 3 p, 0 p, 4 n: AP = (1/3 + 2/4) / 2 = 5/12
    #   class 1 ranks 2 n, 0 n, 4 n, 3 p, 1 p: AP = (1/4 + 2/5) / 2 = 13/40
    #   class 2 ranks 3 n, 0 n, 2 p, 1 p, 4 p: AP = (1/3 + 2/4 + 3/5) / 3 = 43/90
    whole = session_maps(_SCORES, _TARGETS, base_classes=[0, 1], new_classes=[2])
    assert whole["base_map"] == pytest.approx(100 * (5 / 12 + 13 / 40) / 2)
    assert whole["new_map"] == pytest.approx(100 * 43 / 90)


def test_none_when_a_class_list_is_empty_or_no_image_qualifies() -> None:
    assert subset_maps(_SCORES, _TARGETS, base_classes=[0, 1], new_classes=[]) == {
        "base_map_subset": pytest.approx(100 * 7 / 12),
        "new_map_subset": None,
    }
    no_new_image = _TARGETS.copy()
    no_new_image[:, 2] = 0
    result = subset_maps(_SCORES, no_new_image, base_classes=[], new_classes=[2])
    assert result == {"base_map_subset": None, "new_map_subset": None}


def test_group_class_without_positives_counts_as_zero() -> None:
    targets = _TARGETS.copy()
    targets[:, 2] = 0  # class 2 now has no positive image at all
    result = subset_maps(_SCORES, targets, base_classes=[0, 2], new_classes=[1])
    # Group {0, 2}: images 0, 3 (both show class 0): class 0 AP 1, class 2 AP 0 -> 50.
    # Group {1}: images 1, 3, both positive -> 100.
    assert result["base_map_subset"] == pytest.approx(50.0)
    assert result["new_map_subset"] == pytest.approx(100.0)


def _sklearn_subset_map(scores: np.ndarray, targets: np.ndarray, cols: list[int]) -> float:
    shown = targets[:, cols].any(axis=1)
    aps = [average_precision_score(targets[shown, c], scores[shown, c]) for c in cols]
    return 100.0 * float(np.mean(aps))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_equals_sklearn_on_random_data(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    targets = (rng.random((80, 9)) < 0.2).astype(np.int64)
    scores = rng.random((80, 9))
    if ties:
        scores = np.round(scores, 1)  # many equal scores: the tie rule must match sklearn's
    base, new = [0, 4, 1, 3], [8, 6]
    assert targets[:, base + new].any(axis=0).all()  # sklearn needs a positive per class
    result = subset_maps(scores, targets, base, new)
    assert result["base_map_subset"] == pytest.approx(_sklearn_subset_map(scores, targets, base))
    assert result["new_map_subset"] == pytest.approx(_sklearn_subset_map(scores, targets, new))
    # The subsets really are smaller than the whole set here, so the definitions differ.
    assert not targets[:, base].any(axis=1).all()


def test_bad_class_indices_are_errors() -> None:
    with pytest.raises(MlcilError, match=r"base_classes has column indices outside \[0, 3\)"):
        subset_maps(_SCORES, _TARGETS, base_classes=[0, 3], new_classes=[2])
    with pytest.raises(MlcilError, match="new_classes has duplicate"):
        subset_maps(_SCORES, _TARGETS, base_classes=[0], new_classes=[2, 2])

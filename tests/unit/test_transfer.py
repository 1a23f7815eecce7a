"""Backward / forward transfer on hand-computed task matrices (mlcil.metrics.transfer)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlcil.errors import MlcilError
from mlcil.metrics import backward_transfer, forward_transfer, task_means, transfer_matrix

# Three sessions: {a, b}, then {c}, then {d, e}; APs in percent after each session.
CLASSES = [["a", "b"], ["c"], ["d", "e"]]
AP_AFTER = [
    {"a": 80.0, "b": 60.0},
    {"a": 70.0, "b": 50.0, "c": 90.0},
    {"a": 60.0, "b": 40.0, "c": 80.0, "d": 50.0, "e": 30.0},
]


def test_the_task_matrix_averages_each_sessions_classes() -> None:
    matrix = transfer_matrix(AP_AFTER, CLASSES)
    # R[t, j]: mean AP of session j's classes after session t.
    expected = [
        [70.0, math.nan, math.nan],  # (80 + 60) / 2
        [60.0, 90.0, math.nan],  # (70 + 50) / 2, c
        [50.0, 80.0, 40.0],  # (60 + 40) / 2, c, (50 + 30) / 2
    ]
    np.testing.assert_array_equal(matrix, np.array(expected))


def test_backward_transfer_weighs_every_earlier_session_the_same() -> None:
    matrix = transfer_matrix(AP_AFTER, CLASSES)
    # Session 0: 50 - 70 = -20; session 1: 80 - 90 = -10; mean -15. (Per class it would be
    # (-20 - 20 - 10) / 3 = -16.7: the sessions, not the classes, are averaged.)
    assert backward_transfer(matrix) == pytest.approx(-15.0)


def test_backward_transfer_is_positive_when_later_sessions_help_old_classes() -> None:
    improved = [dict(ap) for ap in AP_AFTER]
    improved[2].update(a=90.0, b=70.0, c=95.0)
    # Session 0: 80 - 70 = +10; session 1: 95 - 90 = +5.
    assert backward_transfer(transfer_matrix(improved, CLASSES)) == pytest.approx(7.5)


def test_forward_transfer_compares_new_classes_with_the_reference() -> None:
    matrix = transfer_matrix(AP_AFTER, CLASSES)
    # A joint run: every class learned at once.
    joint = task_means({"a": 85.0, "b": 65.0, "c": 95.0, "d": 60.0, "e": 40.0}, CLASSES)
    assert joint.tolist() == [75.0, 95.0, 50.0]
    # Session 1: 90 - 95 = -5; session 2: 40 - 50 = -10; session 0 is left out.
    assert forward_transfer(matrix, joint) == pytest.approx(-7.5)
    # Against a reference that learns them exactly as well, nothing is gained or lost.
    assert forward_transfer(matrix, np.diag(matrix)) == 0.0


def test_one_session_has_no_transfer() -> None:
    matrix = transfer_matrix(AP_AFTER[:1], CLASSES[:1])
    assert matrix.shape == (1, 1) and matrix[0, 0] == 70.0
    assert backward_transfer(matrix) is None
    assert forward_transfer(matrix, [70.0]) is None


@pytest.mark.parametrize(
    ("ap_after", "classes", "message"),
    [
        (AP_AFTER[:2], CLASSES, "2 AP tables for 3 sessions"),
        ([], [], "no session"),
        ([{"a": 1.0}], [[]], "session 0 introduces no class"),
        (
            [AP_AFTER[0], {"a": 70.0, "c": 90.0}],
            CLASSES[:2],
            "no finite AP of class 'b' \\(session 0\\) after session 1",
        ),
        ([{"a": float("nan")}], [["a"]], "no finite AP of class 'a'"),
    ],
)
def test_bad_inputs_name_what_is_missing(ap_after: list, classes: list, message: str) -> None:
    with pytest.raises(MlcilError, match=message):
        transfer_matrix(ap_after, classes)


def test_bad_matrices_are_refused() -> None:
    matrix = transfer_matrix(AP_AFTER, CLASSES)
    with pytest.raises(MlcilError, match="square"):
        backward_transfer(np.zeros((2, 3)))
    with pytest.raises(MlcilError, match="NaN/inf on or below its diagonal"):
        backward_transfer(np.full((2, 2), np.nan))
    with pytest.raises(MlcilError, match="the reference has 2 session values, the run 3"):
        forward_transfer(matrix, [1.0, 2.0])
    with pytest.raises(MlcilError, match="reference has NaN/inf"):
        forward_transfer(matrix, [1.0, np.nan, 2.0])
    with pytest.raises(MlcilError, match="no finite AP of class 'e' \\(session 2\\) in the ref"):
        task_means({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, CLASSES)

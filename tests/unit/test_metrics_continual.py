"""Tests for mlcil.metrics.continual: average/last mAP and forgetting."""

from __future__ import annotations

import numpy as np
import pytest

from mlcil.errors import MlcilError
from mlcil.metrics import average_map, forgetting, forgetting_per_class, last_map

# Three sessions: 2 base classes, then +2, then +2.
HISTORY = [
    [0.8, 0.6],
    [0.7, 0.9, 0.5, 0.4],
    [0.6, 0.3, 0.45, 0.5, 0.2, 0.9],
]


def test_average_and_last_map() -> None:
    maps = [80.0, 70.0, 66.0]
    # The base session counts: (80 + 70 + 66) / 3 = 72.
    assert average_map(maps) == pytest.approx(72.0)
    assert last_map(maps) == 66.0
    assert average_map([55.5]) == 55.5
    assert last_map(np.array([1.0, 2.0])) == 2.0


@pytest.mark.parametrize("func", [average_map, last_map])
def test_session_map_errors(func) -> None:
    with pytest.raises(MlcilError, match="empty"):
        func([])
    with pytest.raises(MlcilError, match="NaN"):
        func([70.0, float("nan")])


def test_forgetting_hand_example() -> None:
    # Classes seen before the final session: 0..3 (len(HISTORY[-2]) == 4).
    # c0: best(0.8, 0.7) = 0.8 - 0.6  =  0.20
    # c1: best(0.6, 0.9) = 0.9 - 0.3  =  0.60  (best AP in the middle session)
    # c2: best(0.5)      = 0.5 - 0.45 =  0.05  (first seen in session 1)
    # c3: best(0.4)      = 0.4 - 0.5  = -0.10  (improved: negative, not clipped)
    # mean = 0.75 / 4 = 0.1875 -> 18.75 %
    np.testing.assert_allclose(forgetting_per_class(HISTORY), [0.2, 0.6, 0.05, -0.1])
    assert forgetting(HISTORY) == pytest.approx(18.75)


def test_forgetting_ignores_classes_of_the_final_session() -> None:
    # Changing the APs of classes 4 and 5 (new in the final session) must not matter.
    changed = [list(s) for s in HISTORY]
    changed[-1][4:] = [0.0, 0.0]
    assert forgetting(changed) == pytest.approx(forgetting(HISTORY))


def test_forgetting_single_session_is_none() -> None:
    assert forgetting([[0.5, 0.7]]) is None
    assert forgetting_per_class([[0.5, 0.7]]).shape == (0,)


def test_forgetting_two_sessions_no_new_classes() -> None:
    # Same classes in both sessions: forgetting is simply first - last.
    assert forgetting([[0.9, 0.5], [0.6, 0.5]]) == pytest.approx(100 * (0.3 + 0.0) / 2)


def test_forgetting_rejects_malformed_history() -> None:
    with pytest.raises(MlcilError, match="shrink"):
        forgetting([[0.5, 0.6, 0.7], [0.5, 0.6]])
    with pytest.raises(MlcilError, match="empty"):
        forgetting([])
    with pytest.raises(MlcilError, match="non-empty"):
        forgetting([[0.5], []])
    with pytest.raises(MlcilError, match="percent"):
        forgetting([[80.0, 60.0], [70.0, 50.0]])
    with pytest.raises(MlcilError, match="NaN"):
        forgetting_per_class([[0.5], [float("nan")]])

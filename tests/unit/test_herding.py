"""Tests of mlcil.memory.herding (iCaRL exemplar selection)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlcil.errors import MlcilError
from mlcil.memory import herding


def _slow_herding(features: np.ndarray, m: int) -> list[int]:
    """Literal reference: a Python loop over candidates, distances by np.linalg.norm."""
    f = features.astype(np.float64)
    norms = np.linalg.norm(f, axis=1)
    f = np.array([row / n if n > 0 else row * 0 for row, n in zip(f, norms, strict=True)])
    mu = f.mean(axis=0)
    picked: list[int] = []
    running = np.zeros(f.shape[1])
    for k in range(1, min(m, len(f)) + 1):
        best, best_dist = -1, np.inf
        for i in range(len(f)):
            if i in picked:
                continue
            dist = np.linalg.norm(mu - (running + f[i]) / k)
            if dist < best_dist:
                best, best_dist = i, dist
        picked.append(best)
        running += f[best]
    return picked


def test_herding_hand_computed_order() -> None:
    # Unit directions f0 = (1, 0), f1 = (0, 1), f2 = (0.6, 0.8), f3 = (-0.6, 0.8), given with
    # different positive scales (normalisation removes them). mu = (0.4 / 4, 2.6 / 4)
    # = (0.25, 0.65). Squared distances ||mu - (S + f_i) / k||^2:
    #   k = 1: f0 0.985, f1 0.185, f2 0.145, f3 0.745              -> pick 2, S = (0.6, 0.8)
    #   k = 2: f0 (0.8, 0.4) -> 0.365, f1 (0.3, 0.9) -> 0.065,
    #          f3 (0.0, 0.8) -> 0.085                               -> pick 1, S = (0.6, 1.8)
    #   k = 3: f0 (1.6/3, 0.6) -> 149/1800 = 0.0828,
    #          f3 (0.0, 2.6/3) -> 197/1800 = 0.1094                 -> pick 0
    #   k = 4: only f3 is left                                      -> pick 3
    features = np.array([[2.0, 0.0], [0.0, 0.5], [3.0, 4.0], [-1.8, 2.4]])
    assert herding(features, 4) == [2, 1, 0, 3]
    assert herding(features, 2) == [2, 1]
    assert herding(torch.from_numpy(features).float(), 3) == [2, 1, 0]


def test_herding_without_replacement_and_sizes() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(12, 5))
    picks = herding(features, 12)
    assert sorted(picks) == list(range(12))
    assert herding(features, 50) == picks  # m > N returns all N, in the same order
    assert herding(features, 0) == []
    assert herding(features, -3) == []
    assert herding(np.zeros((0, 4)), 5) == []


def test_herding_identical_rows_picks_smallest_index_first() -> None:
    # Rows 1 and 3 are the same point: equal distances at every step, so 1 precedes 3.
    features = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 1.0]])
    picks = herding(features, 4)
    assert picks.index(1) < picks.index(3)
    # mu = (0, 0.5): the first pick is the closest point, (0, 1), so index 1.
    assert picks[0] == 1


def test_herding_scale_invariant() -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(30, 8))
    scales = rng.uniform(0.01, 100.0, size=(30, 1))
    assert herding(features * scales, 10) == herding(features, 10)


def test_herding_zero_rows_stay_zero() -> None:
    # Normalised rows: (0, 0), (1, 0), (1, 0); mu = (2/3, 0).
    #   k = 1: distances 2/3, 1/3, 1/3 -> tie between rows 1 and 2 -> smallest index, 1
    #   k = 2: row 0 gives mean (1/2, 0), distance 1/6; row 2 gives (1, 0), distance 1/3 -> 0
    #   k = 3: row 2
    features = np.array([[0.0, 0.0], [5.0, 0.0], [2.0, 0.0]])
    assert herding(features, 3) == [1, 0, 2]


@pytest.mark.parametrize(("seed", "n", "d", "m"), [(2, 40, 6, 15), (3, 25, 3, 25), (4, 60, 16, 7)])
def test_herding_matches_slow_reference(seed: int, n: int, d: int, m: int) -> None:
    rng = np.random.default_rng(seed)
    features = np.abs(rng.normal(size=(n, d))) + rng.normal(scale=0.3, size=(n, d))
    assert herding(features, m) == _slow_herding(features, m)
    assert herding(torch.from_numpy(features), m) == _slow_herding(features, m)


def test_herding_errors() -> None:
    with pytest.raises(MlcilError, match=r"\(N, D\)"):
        herding(np.zeros(5), 2)
    with pytest.raises(MlcilError, match="NaN"):
        herding(np.array([[1.0, np.nan]]), 1)

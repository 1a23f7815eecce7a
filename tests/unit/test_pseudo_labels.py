"""Tests of mlcil.pseudo_labels: exact and iterative DPL thresholds, applying pseudo labels."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from mlcil import pseudo_labels
from mlcil.errors import MlcilError
from mlcil.pseudo_labels import (
    apply_pseudo_labels,
    dpl_threshold,
    dpl_threshold_by_sort,
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
# dpl_threshold by selection == the former sort-based dpl_threshold
# --------------------------------------------------------------------------------------------


_SCORE_KINDS = (
    "uniform",
    "sigmoid",
    "round2",
    "round3",
    "float16",
    "blocks",
    "constant",
    "signed_zeros",
    "wide",
)


def _scores_of_kind(rng: np.random.Generator, kind: str, shape: tuple[int, int]) -> np.ndarray:
    """float32 scores of one distribution; most kinds are heavily tied on purpose."""
    if kind == "uniform":
        return rng.random(shape, dtype=np.float32)
    sigmoid = 1.0 / (1.0 + np.exp(-3.0 * rng.standard_normal(shape)))
    if kind == "sigmoid":
        return sigmoid.astype(np.float32)
    if kind == "round2":
        return np.round(rng.random(shape), 2).astype(np.float32)
    if kind == "round3":
        return np.round(sigmoid, 3).astype(np.float32)
    if kind == "float16":  # 2048 values per octave: ties everywhere in a large array
        return sigmoid.astype(np.float16).astype(np.float32)
    if kind == "blocks":  # a few values in huge blocks, half of the array one contiguous block
        levels = rng.random(int(rng.integers(1, 5))).astype(np.float32)
        values = rng.choice(levels, size=shape, p=rng.dirichlet(np.ones(levels.size)))
        if rng.random() < 0.5:
            values.ravel()[: values.size // 2] = levels[0]
        return values
    if kind == "constant":
        return np.full(shape, rng.random(), dtype=np.float32)
    if kind == "signed_zeros":  # -0.0 == 0.0 must stay one tied value
        return rng.choice(np.array([-0.0, 0.0, 0.0, 0.5, -1.0], dtype=np.float32), size=shape)
    assert kind == "wide"  # both signs, magnitudes 1e-30..1e30, the lowest float32 too
    values = rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 31, size=shape)
    values = values.astype(np.float32)
    values.ravel()[rng.integers(0, values.size)] = np.finfo(np.float32).min
    return values


def _targets_for(rng: np.random.Generator, scores: np.ndarray) -> list[float]:
    """Targets whose k hits 0, n, beyond n, random counts, tie-block edges and distance ties."""
    num_images, n = scores.shape[0], scores.size
    flat = np.sort(scores, axis=None)[::-1]  # descending
    ks = {0, 1, n - 1, n, n + 3, *rng.integers(0, n + 1, size=3).tolist()}
    edge = int(np.count_nonzero(flat > flat[rng.integers(0, n)]))  # a reachable count
    ks |= {edge - 1, edge, edge + 1}
    reachable = np.concatenate(([0], np.flatnonzero(flat[:-1] > flat[1:]) + 1, [n]))
    gaps = np.flatnonzero(np.diff(reachable) % 2 == 0)  # two reachable counts an even gap apart
    if gaps.size:
        i = int(rng.choice(gaps))
        ks.add(int(reachable[i] + reachable[i + 1]) // 2)  # equally far from both: smaller wins
    return [max(k, 0) / num_images for k in sorted(ks)]


def _assert_selection_matches_sort(rng: np.random.Generator, kind: str, shape: tuple) -> int:
    scores = _scores_of_kind(rng, kind, shape)
    before = scores.copy()
    checked = 0
    for target in _targets_for(rng, scores):
        with np.errstate(over="ignore"):  # "wide": below the lowest float32 is -inf, in both
            expected = dpl_threshold_by_sort(scores, target)
            got = dpl_threshold(scores, target)
        assert got == expected, (kind, shape, target, got, expected)
        checked += 1
    np.testing.assert_array_equal(scores, before)  # the selection works on copies
    return checked


@pytest.mark.parametrize("kind", _SCORE_KINDS)
def test_dpl_threshold_selection_equals_sort_on_small_inputs(kind: str) -> None:
    # Below _SAMPLED_SELECTION_MIN scores the k-th largest is selected from all of them.
    rng = np.random.default_rng(100 + _SCORE_KINDS.index(kind))
    shapes = [(1, 1), (1, 2), (2, 1), (3, 3)] + [
        (int(rng.integers(1, 300)), int(rng.integers(1, 20))) for _ in range(36)
    ]
    assert sum(_assert_selection_matches_sort(rng, kind, s) for s in shapes) >= 200


@pytest.mark.parametrize("sigmas", [8.0, 0.0])
def test_dpl_threshold_selection_equals_sort_through_the_sampled_bracket(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, sigmas: float
) -> None:
    # Force the sampled bracket on small inputs. With 0 sigmas of margin the bracket often
    # misses the k-th largest and the fallback to all scores must give the same answer.
    monkeypatch.setattr(pseudo_labels, "_SAMPLED_SELECTION_MIN", 1)
    monkeypatch.setattr(pseudo_labels, "_SAMPLE_SIZE", 256)
    monkeypatch.setattr(pseudo_labels, "_BRACKET_SIGMAS", sigmas)
    narrowed, below_calls = [], []
    real_candidates, real_largest_below = pseudo_labels._candidates, pseudo_labels._largest_below

    def spy_candidates(flat: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        candidates, above = real_candidates(flat, k)
        narrowed.append(candidates.size < flat.size)
        return candidates, above

    def spy_largest_below(flat: np.ndarray, v: np.float32) -> np.float32:
        below_calls.append(flat.size)
        return real_largest_below(flat, v)

    monkeypatch.setattr(pseudo_labels, "_candidates", spy_candidates)
    monkeypatch.setattr(pseudo_labels, "_largest_below", spy_largest_below)
    rng = np.random.default_rng(200 + int(sigmas))
    checked = 0
    with caplog.at_level(logging.DEBUG, logger="mlcil.pseudo_labels"):
        for kind in _SCORE_KINDS:
            for _ in range(12):
                shape = (int(rng.integers(1, 400)), int(rng.integers(1, 20)))
                checked += _assert_selection_matches_sort(rng, kind, shape)
    misses = [r for r in caplog.records if "bracket missed" in r.getMessage()]
    assert checked >= 500
    assert sum(narrowed) >= 50  # the bracket really narrowed the candidates...
    assert below_calls  # ...and the largest score below a tie block was searched
    if sigmas == 0.0:
        assert len(misses) >= 20  # ...and the fallback ran
    else:
        assert len(misses) < len(narrowed) // 10


@pytest.mark.parametrize("kind", ["uniform", "round2", "float16", "blocks", "constant"])
def test_dpl_threshold_selection_equals_sort_at_real_size(kind: str) -> None:
    # 6,000 x 50 = 300,000 scores: above _SAMPLED_SELECTION_MIN with the shipped settings.
    rng = np.random.default_rng(300 + len(kind))
    scores = _scores_of_kind(rng, kind, (6_000, 50))
    assert scores.size >= pseudo_labels._SAMPLED_SELECTION_MIN
    for target in [0.0, 50.0, 2.9 / 80 * 50, 1.4 / 20 * 50, 25.0, 49.99, 0.013]:
        assert dpl_threshold(scores, target) == dpl_threshold_by_sort(scores, target), target
    assert dpl_threshold(torch.from_numpy(scores), 1.8) == dpl_threshold_by_sort(scores, 1.8)


def test_dpl_threshold_signed_zeros_tie() -> None:
    # -0.0 and 0.0 are one value for a float comparison. Pooled: four zeros, then -1 -1, so
    # the reachable counts are 0, 4 and 6.
    scores = np.array([[-0.0, 0.0], [0.0, -0.0], [-1.0, -1.0]], dtype=np.float32)
    tau = dpl_threshold(scores, 1.0)  # k = 3 -> 4 (distance 1); tau = -1
    assert tau == -1.0
    assert _count_above(scores, tau) == 4
    tau = dpl_threshold(scores, 0.5)  # k = round(1.5) = 2: 0 and 4 equally far -> 0; tau = 0
    assert tau == 0.0
    assert _count_above(scores, tau) == 0
    tau = dpl_threshold(scores, 5 / 3)  # k = 5: 4 and 6 equally far -> 4
    assert _count_above(scores, tau) == 4


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
# iterative_dpl_threshold == the released search, statement by statement
# --------------------------------------------------------------------------------------------


def _release_search(
    scores: np.ndarray,
    target: float,
    start: float,
    step: float,
    tolerance: float,
    max_iterations: int,
    arithmetic: str,
) -> tuple[float, bool, list[tuple[float, int]]]:
    """The released KRT search, written out on torch float32 tensors as the release computes it.

    Returns the threshold, whether it converged, and the visits ``(tau, count)``. Where the
    release raises (no convergence), the threshold is the documented fallback: the visit whose
    mean is closest to the target, the last one on a tie.
    """
    pooled = torch.as_tensor(scores, dtype=torch.float32)
    num_images = pooled.shape[0]
    tau = start
    visits: list[tuple[float, int]] = []
    means: list[float] = []
    evaluated = 0
    while evaluated < max_iterations:
        count = (pooled > tau).sum()  # tau rounded to float32 by the comparison
        if arithmetic == "cpu":
            mean = count / num_images  # int64 tensor / Python int, on the CPU
        else:
            # What PyTorch's CUDA kernel computes for `tensor / python_int`: the float32
            # reciprocal of N, then one float32 multiplication.
            inv = torch.tensor(1.0) / torch.tensor(num_images, dtype=torch.float32)
            mean = count.to(torch.float32) * inv
        visits.append((tau, int(count)))
        means.append(float(mean))
        if mean > target + tolerance:
            tau = min(0.999999, tau + step)
        elif mean < target - tolerance:
            tau = max(0.0001, tau - step)
        else:
            return tau, True, visits
        evaluated += 1
    best = min(reversed(range(len(visits))), key=lambda i: abs(means[i] - target))
    return visits[best][0], False, visits


def _saturated_sigmoid(
    rng: np.random.Generator, shape: tuple[int, int], shift: float
) -> np.ndarray:
    """Sigmoid of large logits: many scores round to exactly 1.0 (or to tiny values)."""
    logits = torch.from_numpy(rng.standard_normal(shape) * 4.0 + shift).float()
    return torch.sigmoid(logits).numpy()


def _search_case(rng: np.random.Generator) -> dict:
    """One random search: scores, target, start, step, tolerance, iterations."""
    shape = (int(rng.integers(1, 300)), int(rng.integers(1, 25)))
    num_classes = shape[1]
    kind = str(rng.choice(["uniform", "sigmoid", "round3", "float16", "near_one", "near_zero"]))
    if kind == "near_one":  # climbs to the upper clamp 0.999999
        scores = _saturated_sigmoid(rng, shape, 14.0)
    elif kind == "near_zero":  # falls to the lower clamp 0.0001
        scores = _saturated_sigmoid(rng, shape, -12.0)
    else:
        scores = _scores_of_kind(rng, kind, shape)
    start = float(rng.choice([0.8, 0.8, rng.random(), 0.0, 1.0, 0.0001, 0.999999, 0.9999]))
    step = 0.005 if rng.random() < 0.7 else float(rng.uniform(0.0005, 0.05))
    tolerance = 0.1 if rng.random() < 0.7 else float(rng.choice([0.0, 0.01, 0.05, 0.3]))
    max_iterations = 100 if rng.random() < 0.8 else int(rng.integers(1, 30))
    choice = rng.random()
    if choice < 0.3:  # acceptance decided by float32 rounding at the start
        mean = int((scores > np.float32(start)).sum()) / shape[0]
        delta = float(rng.choice([0.0, 1e-12, -1e-12, 1e-9, -1e-9, 3e-8, -3e-8]))
        target = max(mean + float(rng.choice([tolerance, -tolerance])) + delta, 0.0)
    elif choice < 0.55:  # the datasets' priors
        target = float(rng.choice([2.9 / 80, 1.4 / 20])) * num_classes
    elif choice < 0.65:
        target = float(rng.choice([0.0, num_classes]))
    else:
        target = float(rng.uniform(0, num_classes))
    return {
        "scores": scores,
        "target": target,
        "start": start,
        "step": step,
        "tolerance": tolerance,
        "max_iterations": max_iterations,
    }


def test_iterative_dpl_threshold_equals_the_release_on_random_cases() -> None:
    rng = np.random.default_rng(2023)
    cases = [_search_case(rng) for _ in range(330)]
    converged = clamped_high = clamped_low = rounding_decided = arithmetic_differs = 0
    for case in cases:
        scores, target, tol = case["scores"], case["target"], case["tolerance"]
        settings = (case["start"], case["step"], tol, case["max_iterations"])
        results = {}
        for arithmetic in ("cuda", "cpu"):
            expected, ok, visits = _release_search(scores, target, *settings, arithmetic)
            got = iterative_dpl_threshold(scores, target, *settings, arithmetic=arithmetic)
            assert got == expected, (arithmetic, case, got, expected)
            results[arithmetic] = got
        converged += ok
        clamped_high += any(tau == 0.999999 for tau, _ in visits)
        clamped_low += any(tau == 0.0001 for tau, _ in visits)
        # Visits where a float64 test |count / N - target| <= tol decides otherwise.
        n = scores.shape[0]
        for _, count in visits:
            mean32 = np.float32(count) / np.float32(n)
            accept32 = np.float32(target - tol) <= mean32 <= np.float32(target + tol)
            rounding_decided += bool(accept32) != (abs(count / n - target) <= tol)
        arithmetic_differs += results["cuda"] != results["cpu"]
    # The random cases cover what they are meant to cover.
    assert 50 <= converged <= len(cases) - 20
    assert clamped_high >= 5 and clamped_low >= 5
    assert rounding_decided >= 5
    assert arithmetic_differs >= 1  # the CUDA and CPU roundings are really told apart


def test_iterative_dpl_threshold_float32_accepts_where_float64_rejects() -> None:
    # COCO B40-C10's second session: target 2.9 / 80 * 40 = 1.45. 20 images with 31 scores
    # above 0.8: mean 31 / 20 = 1.55. In float64 |1.55 - 1.45| = 0.10000000000000009 > 0.1,
    # but the release compares in float32: float32(31) / float32(20) = 1.55f and
    # float32(1.45 + 0.1) = 1.55f, equal, so the start is accepted.
    target = 2.9 / 80 * 40
    assert abs(31 / 20 - target) > 0.1  # float64 would reject...
    scores = np.full((20, 40), 0.1, dtype=np.float32)
    scores.ravel()[:29] = 0.95
    scores.ravel()[29:31] = 0.802  # ...above 0.8, below 0.805
    assert iterative_dpl_threshold(scores, target, arithmetic="cpu") == 0.8
    # On CUDA the mean is 31 * float32(1 / 20) = 1.5500001f > 1.55f: the release moved on to
    # 0.805, where 29 / 20 = 1.45 is accepted.
    assert iterative_dpl_threshold(scores, target) == 0.8  # the default: the release's formula
    assert np.float32(31) * (np.float32(1) / np.float32(20)) > np.float32(1.55)
    assert iterative_dpl_threshold(scores, target, arithmetic="cuda") == 0.8 + 0.005


def test_iterative_dpl_threshold_bound_rounded_to_float32() -> None:
    # 5 of 10 images above the start: mean 0.5. The lower bound 0.60000001 - 0.1 = 0.50000001
    # (float64) rounds to 0.5f, so float32 accepts under both arithmetics (5 * float32(0.1)
    # also rounds to 0.5f), while in float64 the mean misses the target by 0.10000001.
    scores = np.where(np.arange(10)[:, None] < 5, 0.9, 0.2).astype(np.float32)  # (10, 1)
    target = 0.60000001
    assert abs(0.5 - target) > 0.1
    assert np.float32(target - 0.1) == np.float32(0.5)
    assert iterative_dpl_threshold(scores, target, arithmetic="cpu") == 0.8
    assert iterative_dpl_threshold(scores, target, arithmetic="cuda") == 0.8


def test_iterative_dpl_threshold_clamps_to_the_release_bounds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Upper bound: per image one score 1.0 (a saturated sigmoid) and three at 0.9995. From 0.99
    # tau climbs to 0.995, then min(0.999999, 1.0) = 0.999999 where only the 1.0 scores count:
    # mean 1 = target. (Clamping to 1.0 would leave nothing above tau.)
    high = np.tile(np.array([1.0, 0.9995, 0.9995, 0.9995], dtype=np.float32), (5, 1))
    # Lower bound: per image 0.0002, 0.00005 and 0.5. From 0.003 (mean 1 < 1.9) tau drops to
    # max(0.0001, -0.002) = 0.0001, where 0.0002 and 0.5 count: mean 2 = target.
    low = np.tile(np.array([0.0002, 0.00005, 0.5], dtype=np.float32), (4, 1))
    with caplog.at_level(logging.WARNING, logger="mlcil.pseudo_labels"):
        assert iterative_dpl_threshold(high, 1.0, start=0.99) == 0.999999
        assert iterative_dpl_threshold(low, 2.0, start=0.003) == 0.0001
    assert not caplog.records
    # All scores 1.0 with target 0: stuck at 0.999999 (1.0 > 0.999999 always), every visit
    # misses by 4, the last visit is returned with a warning instead of an exception.
    with caplog.at_level(logging.WARNING, logger="mlcil.pseudo_labels"):
        assert iterative_dpl_threshold(np.ones((3, 4), np.float32), 0.0, start=0.99) == 0.999999
    assert any("did not converge" in r.getMessage() for r in caplog.records)


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

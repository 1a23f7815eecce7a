"""Dynamic pseudo-labels (DPL): old-class positives restored from the previous model's scores.

In a new session only the new classes are annotated, so an image that also shows an old class
looks like a negative of it. Before training the session, the frozen previous model scores the
session's training images on the K old classes (sigmoid scores, shape ``(N, K)``). A threshold
``tau`` is chosen so that the mean number of old-class positives per image matches a prior
``target_per_image = rho * K`` (``rho`` the dataset's label density, e.g. 2.9/80 for COCO).
During training old class ``c`` of image ``i`` becomes a positive when ``score > tau``
(strictly greater).

Two ways to pick ``tau``:

* :func:`dpl_threshold` computes it exactly from the order statistics of the scores (the
  default).
* :func:`iterative_dpl_threshold` reproduces the step search of the released KRT code exactly
  (float32 comparisons, clamping to ``[0.0001, 0.999999]``), but warns and returns its best
  visit instead of aborting the run when it does not converge.

All comparisons are made in float32: scores are converted to float32 before a threshold is
chosen, and :func:`apply_pseudo_labels` compares ``scores.float() > tau``, so the count chosen
here is exactly the count applied during training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from mlcil.errors import MlcilError

logger = logging.getLogger(__name__)

__all__ = [
    "apply_pseudo_labels",
    "dpl_threshold",
    "dpl_threshold_by_sort",
    "iterative_dpl_threshold",
    "target_positives_per_image",
]


def _scores_to_float32(old_scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """Validate ``(N, K)`` scores and return them as a float32 numpy array on the CPU."""
    if isinstance(old_scores, torch.Tensor):
        scores = old_scores.detach().to(device="cpu", dtype=torch.float32).numpy()
    else:
        scores = np.asarray(old_scores, dtype=np.float32)
    if scores.ndim != 2:
        raise MlcilError(f"old_scores must have shape (N, K), got {scores.shape}")
    if scores.size == 0:
        raise MlcilError(f"old_scores is empty (shape {scores.shape}): no scores to threshold")
    # One pass in the common case; the NaN pass only runs to word the error.
    if not np.isfinite(scores).all():
        if np.isnan(scores).any():
            raise MlcilError("old_scores contains NaN: the old model produced invalid scores")
        raise MlcilError("old_scores contains infinite values: expected sigmoid scores")
    return scores


def _check_target(target_per_image: float) -> None:
    if not (math.isfinite(target_per_image) and target_per_image >= 0):
        raise MlcilError(f"target_per_image must be a finite number >= 0, got {target_per_image!r}")


# Below this many scores the k-th largest is selected from all of them at once.
_SAMPLED_SELECTION_MIN = 1 << 18
# Size of the random sample that brackets the k-th largest score, the bracket's half-width in
# standard deviations of the sample rank, and the sample's fixed seed. None of them changes the
# result, only the speed.
_SAMPLE_SIZE = 1 << 15
_BRACKET_SIGMAS = 8.0
_SAMPLE_SEED = 0


def _random_sample(flat: np.ndarray) -> np.ndarray:
    """``_SAMPLE_SIZE`` scores drawn with replacement, with a fixed seed."""
    rng = np.random.default_rng(_SAMPLE_SEED)
    return flat[rng.integers(0, flat.size, size=_SAMPLE_SIZE)]  # (m,)


def _largest_below(flat: np.ndarray, v: np.float32) -> np.float32:
    """The largest score strictly below ``v`` (at least one must exist).

    Why: a masked maximum over millions of scores costs 15-50 ms when the mask is irregular.
    The largest sampled score below ``v`` is a lower bound of the answer, so only the scores in
    ``[bound, v)``, usually few, are gathered.
    """
    bound = np.float32(-np.inf)
    if flat.size >= _SAMPLED_SELECTION_MIN:
        sample = _random_sample(flat)
        sample_below = sample[sample < v]
        if sample_below.size:
            bound = sample_below.max()
    window = np.logical_and(flat >= bound, flat < v)  # (n,) bool, non-empty
    return np.float32(np.compress(window, flat).max())


def _candidates(flat: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Scores that surely hold the k-th largest (0-based) and how many scores exceed them all.

    Why: partitioning all ``N * K`` scores costs ~45 ms for COCO-sized inputs. The k-th largest
    value of a random sample, widened by 8 standard deviations of its rank on both sides,
    brackets the k-th largest score: one comparison pass then keeps about
    ``8 / sqrt(sample size)`` of the scores. The sample only affects the speed: the bracket is
    checked by counting, and when it misses (an unlucky sample) all scores are returned. Every
    comparison is a float comparison, so -0.0 and 0.0 stay tied as in a sort.

    Returns:
        ``(candidates, above)``: the scores in ``[lo, hi]`` and the count of scores ``> hi``,
        with ``above <= k < above + candidates.size``; or ``(flat, 0)``.
    """
    n = flat.size
    if n < _SAMPLED_SELECTION_MIN:
        return flat, 0
    sample = np.sort(_random_sample(flat))[::-1]  # (m,) descending
    m = sample.size
    centre = k * m / n  # expected rank in the sample of the k-th largest score
    # The rank's standard deviation is at most sqrt(m) / 2; one rank more for rounding.
    margin = _BRACKET_SIGMAS * 0.5 * math.sqrt(m) + 1.0
    top, bottom = math.floor(centre - margin), math.ceil(centre + margin)
    hi = sample[top] if top >= 0 else np.float32(np.inf)
    lo = sample[bottom] if bottom < m else np.float32(-np.inf)
    at_most_hi = flat <= hi  # (n,) bool
    above = n - int(np.count_nonzero(at_most_hi))
    inside = np.logical_and(flat >= lo, at_most_hi, out=at_most_hi)  # (n,) bool, lo <= s <= hi
    if lo == hi:
        # Every candidate equals lo (a block of ties): a read-only view of the right length
        # stands for them, sparing the copy of up to all n scores.
        candidates = np.broadcast_to(lo, (int(np.count_nonzero(inside)),))
    else:
        candidates = np.compress(inside, flat)  # (c,), faster than boolean indexing
    if above <= k < above + candidates.size:
        return candidates, above
    logger.debug("DPL threshold: the sampled bracket missed rank %d; selecting from all", k)
    return flat, 0


def _select_threshold(flat: np.ndarray, k: int) -> tuple[int, np.float32]:
    """The reachable count ``j`` closest to ``k`` (smaller on a tie) and its ``tau``, by selection.

    With ``v`` the k-th largest score (0-based, ``k < n``), the reachable counts nearest to ``k``
    are ``count(s > v) <= k`` and ``count(s >= v) > k``: no count strictly between them is
    reachable because every score in between equals ``v``. This gives the same ``j`` and ``tau``
    as the sorted rule of :func:`dpl_threshold` without sorting.
    """
    n = flat.size
    if k == n:
        return n, np.nextafter(flat.min(), np.float32(-np.inf), dtype=np.float32)
    candidates, above = _candidates(flat, k)
    if candidates.min() == candidates.max():
        # One block of ties (quantised or saturated scores): v is known, and partitioning
        # millions of equal values would cost more than everything else together.
        v, lower_part = candidates[0], candidates[:0]
        greater, smaller = above, 0
    else:
        position = candidates.size - 1 - (k - above)  # ascending position of the k-th largest
        part = np.partition(candidates, position)  # a copy: the caller's scores stay untouched
        v = part[position]
        lower_part = part[:position]  # every candidate below v is here (ties of v may be too)
        greater = above + int(np.count_nonzero(part[position + 1 :] > v))
        smaller = int(np.count_nonzero(lower_part < v))
    at_least = above + candidates.size - smaller  # count(s >= v); the rest is below v
    if greater == k or k - greater <= at_least - k:
        # Exactly `greater` scores exceed v; when greater == 0, v is the maximum, s[0].
        return greater, v
    if at_least == n:
        return n, np.nextafter(v, np.float32(-np.inf), dtype=np.float32)  # v is the minimum
    # tau is the largest score below v: among the candidates if any is below v, else among
    # the scores left out below the bracket.
    return at_least, _largest_below(lower_part if smaller > 0 else flat, v)


def dpl_threshold(old_scores: np.ndarray | torch.Tensor, target_per_image: float) -> float:
    """Exact DPL threshold by order statistics (a selection, no sort; never fails on valid input).

    Let ``N`` be the number of images, ``n = N * K`` the number of pooled scores and
    ``k = round(target_per_image * N)`` (Python's ``round``, halves to even) clamped to
    ``[0, n]``. With the pooled scores sorted descending, ``s[0] >= s[1] >= ...``, the counts
    of ``score > tau`` that some ``tau`` can produce are 0 and every ``j`` in ``1..n`` with
    ``j == n`` or ``s[j-1] > s[j]``: tied scores are switched on together, so ties make some
    counts unreachable. The achievable count ``j`` closest to ``k`` is chosen; on an exact tie
    in distance the SMALLER count wins (fewer false positives). Then::

        j == 0      -> tau = s[0]                     (nothing is strictly above the maximum)
        0 < j < n   -> tau = s[j]                     (exactly s[0..j-1] are above it)
        j == n      -> tau = float32 value just below s[n-1]   (everything is above it)

    The scores are not sorted: the k-th largest is selected (``np.partition`` on the scores
    that a random sample brackets), which gives the same ``j`` and ``tau`` in linear time.

    Args:
        old_scores: ``(N, K)`` old-class sigmoid scores of the session's training images, a
            numpy array or a torch tensor on any device. They are converted to float32 first;
            the guarantee ``count(score > tau) == j`` holds for that float32 version.
        target_per_image: desired mean number of old-class positives per image, >= 0.

    Returns:
        ``tau`` as a Python float that is exactly representable in float32, so comparing a
        float32 tensor with it reproduces the count.

    Raises:
        MlcilError: on non-2-D or empty scores, NaN or infinite scores, or a negative or
            non-finite target.
    """
    _check_target(target_per_image)
    scores = _scores_to_float32(old_scores)
    num_images = scores.shape[0]
    n = scores.size
    k = min(max(round(target_per_image * num_images), 0), n)
    j, tau = _select_threshold(scores.ravel(), k)
    logger.debug(
        "DPL threshold %.9g: %d positives over %d images (requested %d, %.4f per image)",
        tau,
        j,
        num_images,
        k,
        target_per_image,
    )
    return float(np.float32(tau))


# The released search keeps tau in [0.0001, 0.999999] after every move.
_RELEASE_TAU_MIN = 0.0001
_RELEASE_TAU_MAX = 0.999999


def dpl_threshold_by_sort(old_scores: np.ndarray | torch.Tensor, target_per_image: float) -> float:
    """The same threshold as :func:`dpl_threshold`, by one full sort: the plain statement of its
    rules (closest reachable count, the smaller one on a tie), kept as the reference the
    selection is tested and timed against. About 20x slower at COCO size."""
    _check_target(target_per_image)
    scores = _scores_to_float32(old_scores)
    num_images, n = scores.shape[0], scores.size
    k = min(max(round(target_per_image * num_images), 0), n)
    s = np.sort(scores, axis=None)[::-1]  # (n,) descending
    # Count j (1 <= j < n) is reachable iff s[j-1] > s[j]; 0 and n always are.
    reachable = np.concatenate(([0], np.flatnonzero(s[:-1] > s[1:]) + 1, [n]))  # ascending
    upper = int(np.searchsorted(reachable, k))
    if reachable[upper] == k or upper == 0:
        j = int(reachable[upper])
    else:
        below, above = int(reachable[upper - 1]), int(reachable[upper])
        j = below if k - below <= above - k else above
    if j == 0:
        tau = s[0]
    elif j < n:
        tau = s[j]
    else:
        tau = np.nextafter(s[n - 1], np.float32(-np.inf), dtype=np.float32)
    return float(np.float32(tau))


def _release_mean_count(
    scores: np.ndarray, arithmetic: Literal["cuda", "cpu"]
) -> Callable[[float], np.float32]:
    """``tau -> count(score > tau) / N`` in the float32 arithmetic of the released code.

    The release computes ``(sigmoid > tau).sum() / N`` on torch tensors: ``tau`` (a Python
    float) is rounded to float32 for the comparison, and the int64 count divided by the Python
    int ``N`` gives a float32. PyTorch's CUDA kernel for a tensor divided by a CPU scalar
    multiplies by the float32 reciprocal ``1 / float32(N)`` (one rounding more); its CPU kernel
    divides, ``float32(count) / float32(N)``. The two can differ by one unit in the last place.
    """
    ascending = np.sort(scores, axis=None)  # (n,)
    images = np.float32(scores.shape[0])
    reciprocal = np.float32(1.0) / images

    def mean_count(tau: float) -> np.float32:
        # Entries strictly above tau are those right of its last occurrence in sorted order.
        above = ascending.size - int(np.searchsorted(ascending, np.float32(tau), side="right"))
        if arithmetic == "cuda":
            return np.float32(above) * reciprocal
        return np.float32(above) / images

    return mean_count


def _check_search_settings(
    start: float, step: float, tolerance: float, max_iterations: int, arithmetic: str
) -> None:
    if not (math.isfinite(start) and 0 <= start <= 1):
        raise MlcilError(f"start must be in [0, 1], got {start!r}")
    if not (math.isfinite(step) and step > 0):
        raise MlcilError(f"step must be a finite number > 0, got {step!r}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise MlcilError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if max_iterations < 1:
        raise MlcilError(f"max_iterations must be >= 1, got {max_iterations}")
    if arithmetic not in ("cuda", "cpu"):
        raise MlcilError(f"arithmetic must be 'cuda' or 'cpu', got {arithmetic!r}")


def iterative_dpl_threshold(
    old_scores: np.ndarray | torch.Tensor,
    target_per_image: float,
    start: float = 0.8,
    step: float = 0.005,
    tolerance: float = 0.1,
    max_iterations: int = 100,
    *,
    arithmetic: Literal["cuda", "cpu"] = "cpu",
) -> float:
    """DPL threshold by the step search of the released KRT code, reproduced exactly.

    ``tau`` starts at ``start`` (not clamped). Each iteration computes the mean number of
    positives per image ``m = count(score > tau) / N`` in float32 (see ``arithmetic``) and
    compares it, in float32, with ``hi = float32(target + tolerance)`` and
    ``lo = float32(target - tolerance)`` (the sums made in float64, as Python does):

    * ``m > hi``: ``tau = min(0.999999, tau + step)`` (fewer positives);
    * ``m < lo``: ``tau = max(0.0001, tau - step)`` (more positives);
    * otherwise (``lo <= m <= hi``) the search stops and returns ``tau``.

    ``tau`` itself is a float64 sum, as in the released code; each comparison with a score
    rounds it to float32, as comparing a float32 tensor with a Python float does.

    Non-convergence: the released code raises after ``max_iterations`` evaluations and so ends
    the whole run. Here the search logs a WARNING instead and returns, among the thresholds it
    evaluated, the one whose mean ``m`` is closest to the target (``|m - target|`` in float64;
    on a tie, the one visited last). It never raises on valid input.

    Args:
        old_scores: ``(N, K)`` old-class sigmoid scores (numpy array or torch tensor).
        target_per_image: desired mean number of old-class positives per image, >= 0.
        start: initial threshold, in ``[0, 1]``.
        step: amount ``tau`` moves per iteration, > 0.
        tolerance: accepted absolute error on the mean count per image, >= 0.
        max_iterations: number of thresholds evaluated at most, >= 1.
        arithmetic: whose float32 rounding of ``count / N`` to reproduce: ``"cpu"`` (the
            released code's formula, ``float32(count) / float32(N)``, as PyTorch computes it on
            CPU tensors; the default) or ``"cuda"`` (the released runs on CUDA GPUs, where
            PyTorch divides by a Python number as ``float32(count) * float32(1 / N)``: one
            rounding more, which moves a mean lying exactly on a bound).

    Returns:
        The threshold as a Python float.

    Raises:
        MlcilError: on invalid scores or hyper-parameters (see :func:`dpl_threshold`).
    """
    _check_target(target_per_image)
    _check_search_settings(start, step, tolerance, max_iterations, arithmetic)
    mean_count = _release_mean_count(_scores_to_float32(old_scores), arithmetic)
    # The release compares a float32 tensor with a Python float: the bound is rounded to float32.
    upper = np.float32(target_per_image + tolerance)
    lower = np.float32(target_per_image - tolerance)
    tau = float(start)
    best_tau, best_error = tau, math.inf
    for _ in range(max_iterations):
        mean = mean_count(tau)
        if mean > upper:
            moved = min(_RELEASE_TAU_MAX, tau + step)
        elif mean < lower:
            moved = max(_RELEASE_TAU_MIN, tau - step)
        else:
            return tau
        error = abs(float(mean) - target_per_image)
        if error <= best_error:
            best_tau, best_error = tau, error
        tau = moved

    logger.warning(
        "DPL threshold search did not converge in %d iterations (target %.4f positives per "
        "image, tolerance %.4f); using the closest threshold visited, %.6g, which gives %.4f",
        max_iterations,
        target_per_image,
        tolerance,
        best_tau,
        mean_count(best_tau),
    )
    return best_tau


def apply_pseudo_labels(
    targets: torch.Tensor, old_scores: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Add old-class pseudo positives to a batch of session labels.

    Old column ``c`` of image ``i`` becomes 1 when ``old_scores[i, c] > threshold`` (compared in
    float32, like :func:`dpl_threshold`). Existing positives are kept (pseudo labels only add),
    and the new-class columns are returned unchanged.

    Args:
        targets: ``(B, C_seen)`` 0/1 labels whose first ``K`` columns are the old classes.
        old_scores: ``(B, K)`` sigmoid scores of the frozen old model, ``K <= C_seen``, on the
            same device as ``targets``.
        threshold: the DPL threshold.

    Returns:
        A new ``(B, C_seen)`` tensor of ``targets``' dtype; ``targets`` is not modified.

    Raises:
        MlcilError: on shapes that do not fit or a non-finite threshold.
    """
    if targets.ndim != 2 or old_scores.ndim != 2:
        raise MlcilError(
            f"targets and old_scores must be 2-D, got {tuple(targets.shape)} and "
            f"{tuple(old_scores.shape)}"
        )
    num_old = old_scores.shape[1]
    if old_scores.shape[0] != targets.shape[0] or num_old > targets.shape[1]:
        raise MlcilError(
            f"old_scores {tuple(old_scores.shape)} does not fit targets {tuple(targets.shape)}: "
            "expected the same batch size and at most as many old classes as seen classes"
        )
    if not math.isfinite(threshold):
        raise MlcilError(f"threshold must be finite, got {threshold!r}")
    old_targets = targets[:, :num_old]  # (B, K)
    pseudo = old_scores.detach().float() > threshold  # (B, K)
    restored = torch.where(pseudo, torch.ones_like(old_targets), old_targets)  # (B, K)
    return torch.cat([restored, targets[:, num_old:]], dim=1)  # (B, C_seen), a new tensor


def target_positives_per_image(label_density: float, num_old_classes: int) -> float:
    """DPL's prior of old-class positives per image: ``label_density * num_old_classes``.

    Args:
        label_density: labels per image per class, in ``(0, 1]`` (COCO 2.9/80, VOC 1.4/20).
        num_old_classes: number of old classes K, >= 0.

    Returns:
        The target as a Python float.

    Raises:
        MlcilError: when the density is outside ``(0, 1]`` or the class count is negative.
    """
    if not (math.isfinite(label_density) and 0 < label_density <= 1):
        raise MlcilError(f"label_density must be in (0, 1], got {label_density!r}")
    if num_old_classes < 0:
        raise MlcilError(f"num_old_classes must be >= 0, got {num_old_classes}")
    return float(label_density) * num_old_classes

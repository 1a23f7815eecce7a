"""Dynamic pseudo-labels (DPL): old-class positives restored from the previous model's scores.

In a new session only the new classes are annotated, so an image that also shows an old class
looks like a negative of it. Before training the session, the frozen previous model scores the
session's training images on the K old classes (sigmoid scores, shape ``(N, K)``). A threshold
``tau`` is chosen so that the mean number of old-class positives per image matches a prior
``target_per_image = rho * K`` (``rho`` the dataset's label density, e.g. 2.9/80 for COCO).
During training old class ``c`` of image ``i`` becomes a positive when ``score > tau``
(strictly greater).

Two ways to pick ``tau``:

* :func:`dpl_threshold` computes it exactly from the sorted scores (the default).
* :func:`iterative_dpl_threshold` reproduces the step search of the released KRT code, but
  warns and returns its best visit instead of aborting the run when it does not converge.

All comparisons are made in float32: scores are converted to float32 before a threshold is
chosen, and :func:`apply_pseudo_labels` compares ``scores.float() > tau``, so the count chosen
here is exactly the count applied during training.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from mlcil.errors import MlcilError

logger = logging.getLogger(__name__)

__all__ = [
    "apply_pseudo_labels",
    "dpl_threshold",
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
    if np.isnan(scores).any():
        raise MlcilError("old_scores contains NaN: the old model produced invalid scores")
    if not np.isfinite(scores).all():
        raise MlcilError("old_scores contains infinite values: expected sigmoid scores")
    return scores


def _check_target(target_per_image: float) -> None:
    if not (math.isfinite(target_per_image) and target_per_image >= 0):
        raise MlcilError(f"target_per_image must be a finite number >= 0, got {target_per_image!r}")


def dpl_threshold(old_scores: np.ndarray | torch.Tensor, target_per_image: float) -> float:
    """Exact DPL threshold by order statistics (one sort; never fails on valid input).

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

    s = np.sort(scores, axis=None)[::-1]  # (n,) descending
    # Count j (1 <= j < n) is reachable iff s[j-1] > s[j]; 0 and n always are.
    reachable = np.concatenate(([0], np.flatnonzero(s[:-1] > s[1:]) + 1, [n]))  # ascending
    upper = int(np.searchsorted(reachable, k))  # first reachable count >= k
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
    logger.debug(
        "DPL threshold %.9g: %d positives over %d images (requested %d, %.4f per image)",
        tau,
        j,
        num_images,
        k,
        target_per_image,
    )
    return float(np.float32(tau))


def iterative_dpl_threshold(
    old_scores: np.ndarray | torch.Tensor,
    target_per_image: float,
    start: float = 0.8,
    step: float = 0.005,
    tolerance: float = 0.1,
    max_iterations: int = 100,
) -> float:
    """DPL threshold by the step search of the released KRT code (kept for reproduction).

    ``tau`` starts at ``start``. Each iteration computes the mean number of positives per image
    ``m(tau) = count(score > tau) / N``; if ``|m - target| <= tolerance`` the search stops and
    returns ``tau``; otherwise ``tau`` moves by ``step`` towards the target (raised when
    ``m > target``, lowered otherwise) and is clamped to ``[0, 1]``.

    The released code raises after ``max_iterations`` and so ends the whole run. Here the search
    logs a WARNING instead and returns, among all thresholds it evaluated, the one whose mean
    count is closest to the target (on a tie, the one visited last). It never raises on valid
    input.

    Counts compare the float32 scores with ``tau`` rounded to float32, which is what a float32
    tensor compared with the returned Python float does; the returned value itself is the
    unrounded ``start + i * step`` sum, as in the released code.

    Args:
        old_scores: ``(N, K)`` old-class sigmoid scores (numpy array or torch tensor).
        target_per_image: desired mean number of old-class positives per image, >= 0.
        start: initial threshold, in ``[0, 1]``.
        step: amount ``tau`` moves per iteration, > 0.
        tolerance: accepted absolute error on the mean count per image, >= 0.
        max_iterations: number of thresholds evaluated at most, >= 1.

    Returns:
        The threshold as a Python float.

    Raises:
        MlcilError: on invalid scores or hyper-parameters (see :func:`dpl_threshold`).
    """
    _check_target(target_per_image)
    if not (math.isfinite(start) and 0 <= start <= 1):
        raise MlcilError(f"start must be in [0, 1], got {start!r}")
    if not (math.isfinite(step) and step > 0):
        raise MlcilError(f"step must be a finite number > 0, got {step!r}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise MlcilError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if max_iterations < 1:
        raise MlcilError(f"max_iterations must be >= 1, got {max_iterations}")
    scores = _scores_to_float32(old_scores)
    num_images = scores.shape[0]
    ascending = np.sort(scores, axis=None)  # (n,)

    def mean_count(tau: float) -> float:
        # Entries strictly above tau are those right of its last occurrence in sorted order.
        above = ascending.size - int(np.searchsorted(ascending, np.float32(tau), side="right"))
        return above / num_images

    tau = float(start)
    best_tau, best_error = tau, math.inf
    for _ in range(max_iterations):
        mean = mean_count(tau)
        error = abs(mean - target_per_image)
        if error <= tolerance:
            return tau
        if error <= best_error:
            best_tau, best_error = tau, error
        tau = tau + step if mean > target_per_image else tau - step
        tau = min(max(tau, 0.0), 1.0)

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

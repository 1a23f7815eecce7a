"""Multi-label metrics: per-class average precision, mAP, and the CP/CR/CF1/OP/OR/OF1 family.

Every function here is pure: it takes a score matrix and a 0/1 target matrix of shape
``(images, classes)`` (NumPy arrays or PyTorch tensors) and returns plain NumPy/Python values.
Inputs are validated up front so that a NaN logit or a target matrix holding label ids instead
of 0/1 flags fails loudly instead of producing a plausible-looking number.

Percentages: ``mean_average_precision``, ``f1_scores`` and ``session_maps`` report percent
(0-100) because that is how papers quote them; ``average_precision`` returns fractions (0-1)
because the continual metrics in :mod:`mlcil.metrics.continual` work on fractions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from mlcil.errors import MlcilError

logger = logging.getLogger(__name__)

__all__ = [
    "average_precision",
    "classes_without_positives",
    "f1_scores",
    "mean_average_precision",
    "session_maps",
    "subset_maps",
]


def to_numpy(array: Any) -> np.ndarray:
    """Return ``array`` as a NumPy array, detaching and moving PyTorch tensors to the CPU.

    Tensors are recognised by duck typing so this module does not need torch at import time.
    """
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        tensor = array.detach().cpu()
        # NumPy has no bfloat16; widening every float dtype to float64 (as NumPy inputs get
        # later) keeps tensor and array inputs bit-for-bit equivalent.
        if getattr(tensor, "is_floating_point", lambda: False)():
            tensor = tensor.double()
        return tensor.numpy()
    return np.asarray(array)


def _check_targets(targets: np.ndarray) -> np.ndarray:
    """Validate that ``targets`` holds only 0/1 flags and return it as a boolean array."""
    if targets.dtype == np.bool_:
        return targets
    if not (np.issubdtype(targets.dtype, np.integer) or np.issubdtype(targets.dtype, np.floating)):
        raise MlcilError(
            f"targets must be bool, integer or float 0/1 flags, got dtype {targets.dtype}"
        )
    binary = (targets == 0) | (targets == 1)
    if not binary.all():
        bad = targets[~binary]
        raise MlcilError(
            f"targets must be binary (0/1); found {bad.size} other value(s), "
            f"e.g. {bad.flat[0]!r} at index {tuple(int(i) for i in np.argwhere(~binary)[0])}"
        )
    return targets == 1


def _prepare(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    """Convert and validate a ``(scores, targets)`` pair.

    Returns:
        ``scores`` as a float64 array and ``targets`` as a bool array, both of shape
        ``(images, classes)``; 1-D inputs of shape ``(n,)`` become ``(n, 1)``.

    Raises:
        MlcilError: on mismatched or unsupported shapes, non-numeric or non-finite scores, or
            targets that are not 0/1.
    """
    scores_np = to_numpy(scores)
    targets_np = to_numpy(targets)
    if scores_np.shape != targets_np.shape:
        raise MlcilError(
            f"scores and targets must have the same shape, got scores {scores_np.shape} "
            f"and targets {targets_np.shape}"
        )
    if scores_np.ndim == 1:
        scores_np = scores_np[:, None]
        targets_np = targets_np[:, None]
    elif scores_np.ndim != 2:
        raise MlcilError(
            f"scores and targets must be 2-D (images, classes) or 1-D (images,), "
            f"got shape {scores_np.shape}"
        )
    if not (
        np.issubdtype(scores_np.dtype, np.floating)
        or np.issubdtype(scores_np.dtype, np.integer)
        or scores_np.dtype == np.bool_
    ):
        raise MlcilError(f"scores must be real numbers, got dtype {scores_np.dtype}")
    scores_np = scores_np.astype(np.float64, copy=False)
    finite = np.isfinite(scores_np)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise MlcilError(
            f"scores contain {int((~finite).sum())} NaN/inf value(s), first at (image, class) "
            f"{where}"
        )
    return scores_np, _check_targets(targets_np)


def classes_without_positives(targets: Any) -> list[int]:
    """List the classes (column indices) that have no positive image.

    Such classes get AP 0.0 from :func:`average_precision`, which pulls mAP down; reports should
    show this list so the reader knows why.

    Args:
        targets: 0/1 matrix of shape ``(images, classes)`` (or ``(images,)`` for one class).

    Returns:
        Sorted column indices whose target column is all zeros.

    Raises:
        MlcilError: if ``targets`` is not 1-D/2-D or not binary.
    """
    targets_np = to_numpy(targets)
    if targets_np.ndim == 1:
        targets_np = targets_np[:, None]
    elif targets_np.ndim != 2:
        raise MlcilError(
            f"targets must be 2-D (images, classes) or 1-D (images,), got shape {targets_np.shape}"
        )
    positives = _check_targets(targets_np).sum(axis=0)
    return [int(c) for c in np.flatnonzero(positives == 0)]


def _average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class AP on validated inputs (float64 scores, bool targets, 2-D)."""
    n_images, n_classes = scores.shape
    if n_images == 0:
        return np.zeros(n_classes, dtype=np.float64)
    # Work on (classes, images) rows in C order: sorting and gathering along contiguous rows is
    # several times faster than along the columns of an (images, classes) array.
    neg_scores = np.ascontiguousarray(-scores.T)
    targets_t = np.ascontiguousarray(targets.T)
    # Any sort will do (no need for a stable one): the order inside a block of equal scores does
    # not matter because every positive in a block gets the precision at the block end.
    order = np.argsort(neg_scores, axis=1)
    sorted_scores = np.take_along_axis(neg_scores, order, axis=1)
    sorted_targets = np.take_along_axis(targets_t, order, axis=1)

    true_positives = np.cumsum(sorted_targets, axis=1, dtype=np.float64)
    ranks = np.arange(n_images)
    # Position i ends a block when the next position has a different score (the last always
    # does).
    is_block_end = np.ones(sorted_scores.shape, dtype=bool)
    is_block_end[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
    # For every position, the index of the end of its block = the nearest block end at or after
    # it: a running minimum taken from the end of the row backwards.
    candidate = np.where(is_block_end, ranks, n_images)
    block_end = np.minimum.accumulate(candidate[:, ::-1], axis=1)[:, ::-1]
    precision_at_block_end = np.take_along_axis(true_positives, block_end, axis=1) / (block_end + 1)

    n_positives = true_positives[:, -1]
    credited = np.where(sorted_targets, precision_at_block_end, 0.0).sum(axis=1)
    # A class without positives has no defined AP; 0.0 matches the released KRT code and keeps
    # the [0, 1] range. The caller logs which classes these are.
    return _safe_divide(credited, n_positives)


def _warn_no_positives(targets: np.ndarray) -> list[int]:
    missing = [int(c) for c in np.flatnonzero(~targets.any(axis=0))]
    if missing:
        logger.warning(
            "%d class(es) have no positive image; their AP is set to 0.0: %s",
            len(missing),
            missing,
        )
    return missing


def average_precision(scores: Any, targets: Any) -> np.ndarray:
    """Per-class average precision.

    For each class the images are ranked by score, highest first, and AP is the mean, over the
    class's positive images, of the precision at the rank of each positive. Ties are handled
    independently of image order: images with equal scores form one block and every positive in
    the block is credited with the precision measured at the end of the block (counting the
    whole block). This is exactly ``sklearn.metrics.average_precision_score``, with or without
    ties.

    A class with no positive image gets AP 0.0 (as in the released KRT code) and a warning naming
    it is logged; see also :func:`classes_without_positives`.

    Args:
        scores: Real-valued scores (logits or probabilities), shape ``(images, classes)``. A 1-D
            array of shape ``(images,)`` is treated as a single class.
        targets: 0/1 flags (bool, int or float) with the same shape as ``scores``.

    Returns:
        Float64 array of shape ``(classes,)`` (``(1,)`` for 1-D inputs) with values in [0, 1].

    Raises:
        MlcilError: on shape mismatch, NaN/inf scores or non-binary targets.
    """
    scores_np, targets_np = _prepare(scores, targets)
    _warn_no_positives(targets_np)
    return _average_precision(scores_np, targets_np)


def mean_average_precision(scores: Any, targets: Any) -> float:
    """Mean of :func:`average_precision` over classes, in percent.

    Classes without positives count with AP 0.0 (and are logged), as in the KRT evaluation.

    Args:
        scores: Real-valued scores, shape ``(images, classes)`` or ``(images,)``.
        targets: 0/1 flags with the same shape.

    Returns:
        mAP in percent (0-100).

    Raises:
        MlcilError: on invalid inputs or when there are no classes (zero columns).
    """
    ap = average_precision(scores, targets)
    if ap.size == 0:
        raise MlcilError("cannot compute mAP over zero classes")
    return float(100.0 * ap.mean())


def _safe_divide(numerator: Any, denominator: Any) -> np.ndarray:
    """Element-wise ``numerator / denominator`` with 0/0 (and x/0) defined as 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def f1_scores(scores: Any, targets: Any, threshold: float = 0.8) -> dict[str, float]:
    """Threshold-based precision/recall/F1, per class (C*) and overall (O*), in percent.

    An image is predicted positive for a class when its score is ``>= threshold`` (scores are
    meant to be sigmoid probabilities; a score exactly at the threshold counts as positive).
    With TP/FP/FN counted per class c:

    - ``P_c = TP_c / (TP_c + FP_c)`` and ``R_c = TP_c / (TP_c + FN_c)``, with 0/0 defined as 0
      (a class never predicted has precision 0; a class with no positives has recall 0).
    - ``cp`` = mean of P_c, ``cr`` = mean of R_c, ``cf1 = 2 cp cr / (cp + cr)`` (0 if both 0).
    - ``op = sum TP / sum predicted``, ``or = sum TP / sum positives``,
      ``of1 = 2 op or / (op + or)``, with the same 0/0 convention.
    - ``mean_class_f1`` = mean over classes of ``2 P_c R_c / (P_c + R_c)`` (0 if both 0). The
      KRT authors' code reports this number under the name "CF1"; here it is kept apart from
      the conventional ``cf1``.

    Args:
        scores: Scores (probabilities), shape ``(images, classes)`` or ``(images,)``.
        targets: 0/1 flags with the same shape.
        threshold: Decision threshold; ``score >= threshold`` is a positive prediction.

    Returns:
        Dict with float keys ``cp, cr, cf1, op, or, of1, mean_class_f1``, all in percent.

    Raises:
        MlcilError: on invalid inputs, zero classes, or a non-finite threshold.
    """
    scores_np, targets_np = _prepare(scores, targets)
    if scores_np.shape[1] == 0:
        raise MlcilError("cannot compute F1 scores over zero classes")
    if not np.isfinite(threshold):
        raise MlcilError(f"threshold must be a finite number, got {threshold!r}")
    predicted = scores_np >= threshold

    tp = (predicted & targets_np).sum(axis=0)
    n_predicted = predicted.sum(axis=0)
    n_positive = targets_np.sum(axis=0)

    precision = _safe_divide(tp, n_predicted)
    recall = _safe_divide(tp, n_positive)
    class_f1 = _safe_divide(2.0 * precision * recall, precision + recall)

    cp = float(precision.mean())
    cr = float(recall.mean())
    op = float(_safe_divide(tp.sum(), n_predicted.sum()))
    overall_recall = float(_safe_divide(tp.sum(), n_positive.sum()))
    return {
        "cp": 100.0 * cp,
        "cr": 100.0 * cr,
        "cf1": 100.0 * float(_safe_divide(2.0 * cp * cr, cp + cr)),
        "op": 100.0 * op,
        "or": 100.0 * overall_recall,
        "of1": 100.0 * float(_safe_divide(2.0 * op * overall_recall, op + overall_recall)),
        "mean_class_f1": 100.0 * float(class_f1.mean()),
    }


def _check_columns(name: str, columns: Sequence[int], n_classes: int) -> np.ndarray:
    """Validate a list of column indices against ``n_classes`` and return it as an int array."""
    cols = to_numpy(columns)
    if cols.size == 0:
        return np.zeros(0, dtype=np.int64)
    if cols.ndim != 1 or not np.issubdtype(cols.dtype, np.integer):
        raise MlcilError(f"{name} must be a flat list of integer column indices, got {columns!r}")
    out_of_range = cols[(cols < 0) | (cols >= n_classes)]
    if out_of_range.size:
        raise MlcilError(
            f"{name} has column indices outside [0, {n_classes}): {out_of_range.tolist()}"
        )
    if np.unique(cols).size != cols.size:
        raise MlcilError(f"{name} has duplicate column indices: {cols.tolist()}")
    return cols.astype(np.int64)


def session_maps(
    scores: Any,
    targets: Any,
    base_classes: Sequence[int],
    new_classes: Sequence[int],
) -> dict[str, Any]:
    """mAP over all seen classes, the base classes and the classes new in this session.

    AP is computed once per class over all test images of the session, then averaged over the
    requested columns, so ``seen_map`` is the usual mAP and ``base_map``/``new_map`` are means of
    the same per-class APs.

    Args:
        scores: Scores for the classes seen so far, shape ``(images, seen classes)``.
        targets: 0/1 flags with the same shape.
        base_classes: Column indices of the base-session classes.
        new_classes: Column indices of the classes learned in the current session.

    Returns:
        Dict with ``seen_map``, ``base_map`` and ``new_map`` (percent floats; ``base_map`` or
        ``new_map`` is ``None`` when its class list is empty, e.g. ``new_map`` in the base
        session), ``ap`` (per-class AP fractions as a list of floats, column order) and
        ``classes_without_positives`` (list of column indices, counted with AP 0.0).

    Raises:
        MlcilError: on invalid scores/targets, or class lists with out-of-range or duplicate
            indices.
    """
    scores_np, targets_np = _prepare(scores, targets)
    n_classes = scores_np.shape[1]
    if n_classes == 0:
        raise MlcilError("cannot compute session mAPs over zero classes")
    base = _check_columns("base_classes", base_classes, n_classes)
    new = _check_columns("new_classes", new_classes, n_classes)

    missing = _warn_no_positives(targets_np)
    ap = _average_precision(scores_np, targets_np)

    def subset_map(cols: np.ndarray) -> float | None:
        return float(100.0 * ap[cols].mean()) if cols.size else None

    return {
        "seen_map": float(100.0 * ap.mean()),
        "base_map": subset_map(base),
        "new_map": subset_map(new),
        "ap": [float(v) for v in ap],
        "classes_without_positives": missing,
    }


def subset_maps(
    scores: Any,
    targets: Any,
    base_classes: Sequence[int],
    new_classes: Sequence[int],
) -> dict[str, float | None]:
    """Base and new mAP as the released KRT evaluation computes them, each on its own subset.

    For ``base``: keep only the images that show at least one base class, and only the base
    classes' columns; AP per base class over those images; mAP = their mean. Likewise for
    ``new`` with the session's new classes. :func:`session_maps` instead computes every class's
    AP over ALL the images it is given (the whole seen test set), so its ``base_map``/``new_map``
    also rank the images without any base/new class: extra negatives, which can only lower AP or
    leave it unchanged. The two agree when every image shows a class of the group. Ties are
    handled as in :func:`average_precision`; a class of the group with no positive image gets
    AP 0.0 (logged, naming its column).

    Args:
        scores: Scores for the classes seen so far, shape ``(images, seen classes)``.
        targets: 0/1 flags with the same shape.
        base_classes: Column indices of the base-session classes.
        new_classes: Column indices of the classes learned in the current session.

    Returns:
        ``{"base_map_subset": ..., "new_map_subset": ...}`` in percent; a value is ``None`` when
        its class list is empty (e.g. new classes in the base session) or no image shows any of
        its classes.

    Raises:
        MlcilError: on invalid scores/targets, zero columns, or class lists with out-of-range
            or duplicate indices.
    """
    scores_np, targets_np = _prepare(scores, targets)
    n_classes = scores_np.shape[1]
    if n_classes == 0:
        raise MlcilError("cannot compute subset mAPs over zero classes")
    groups = {
        "base_map_subset": _check_columns("base_classes", base_classes, n_classes),
        "new_map_subset": _check_columns("new_classes", new_classes, n_classes),
    }
    result: dict[str, float | None] = {}
    for key, cols in groups.items():
        group_targets = targets_np[:, cols]  # (images, group classes)
        shown = group_targets.any(axis=1)  # images that show a class of the group
        if cols.size == 0 or not shown.any():
            result[key] = None
            continue
        subset_targets = group_targets[shown]
        missing = cols[~subset_targets.any(axis=0)]
        if missing.size:
            logger.warning(
                "%s: %d class(es) have no positive image; their AP is set to 0.0: %s",
                key,
                missing.size,
                missing.tolist(),
            )
        ap = _average_precision(scores_np[np.ix_(shown, cols)], subset_targets)
        result[key] = float(100.0 * ap.mean())
    return result

"""Diagnostics that explain a continual run's numbers: pseudo-label quality and drift.

* :func:`pseudo_label_quality` compares the old-class labels a method restored (e.g. KRT's
  dynamic pseudo-labels) with the true old-class labels the protocol hid in a session.
* :func:`embedding_drift` measures how far the per-session embeddings of fixed probe images
  moved between the end of an earlier session and now (for KRT, slot ``i`` is the embedding
  ``e_i`` that the session-``i`` knowledge-retention token produces).
* :func:`logit_drift` measures how the old-class scores and decisions on the probe images moved.

Like :mod:`mlcil.metrics.multilabel`, every function is pure, takes NumPy arrays or PyTorch
tensors (recognised by duck typing, so torch is not needed at import time), computes in float64
and returns plain Python numbers and lists. Percentages are 0-100; drift values are in their
natural units (cosine distance in [0, 2], score changes in [0, 1]). A quantity with no defined
value (a precision without any predicted positive, a mean over zero images) is ``None``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlcil.errors import MlcilError
from mlcil.metrics.multilabel import to_numpy

__all__ = ["embedding_drift", "logit_drift", "pseudo_label_quality"]


def _binary_matrix(name: str, array: Any) -> np.ndarray:
    """``array`` as an ``(N, K)`` bool matrix; raises if it is not 2-D 0/1 flags."""
    values = to_numpy(array)
    if values.ndim != 2:
        raise MlcilError(f"{name} must be a 2-D (images, classes) matrix, got shape {values.shape}")
    if values.dtype == np.bool_:
        return values
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise MlcilError(f"{name} must hold 0/1 flags, got dtype {values.dtype}")
    binary = (values == 0) | (values == 1)
    if not binary.all():
        where = tuple(int(i) for i in np.argwhere(~binary)[0])
        raise MlcilError(
            f"{name} must hold only 0/1 flags; found {int((~binary).sum())} other value(s), "
            f"e.g. {values[where]!r} at (image, class) {where}"
        )
    return values == 1


def _real_array(name: str, array: Any) -> np.ndarray:
    """``array`` as finite float64; raises on non-numeric or NaN/inf entries."""
    values = to_numpy(array)
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise MlcilError(f"{name} must hold real numbers, got dtype {values.dtype}")
    values = values.astype(np.float64, copy=False)
    finite = np.isfinite(values)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise MlcilError(
            f"{name} holds {int((~finite).sum())} NaN/inf value(s), first at index {where}"
        )
    return values


def _percent(numerator: int, denominator: int) -> float | None:
    return 100.0 * numerator / denominator if denominator else None


def pseudo_label_quality(pseudo_labels: Any, hidden_labels: Any) -> dict[str, Any]:
    """How well restored old-class labels match the old-class labels the protocol hid.

    Counts are pooled over all (image, old class) pairs, so precision and recall are the
    micro-averaged ones (sklearn's ``average="micro"``).

    Args:
        pseudo_labels: ``(N, K)`` 0/1 flags: the old-class positives a method restored for the
            session's N training images over its K old classes.
        hidden_labels: ``(N, K)`` 0/1 flags: the true old-class labels of the same images,
            which the protocol did not give to the learner.

    Returns:
        ``precision``, ``recall``, ``f1`` (percent; ``None`` when undefined: precision with no
        pseudo positive, recall with no hidden positive, F1 when either is undefined; F1 is
        0.0 when both are 0), ``pseudo_positives``, ``true_positives``, ``hidden_positives``
        (ints), ``per_image`` (pseudo positives per image) and ``hidden_per_image`` (hidden
        positives per image; both ``None`` for zero images).

    Raises:
        MlcilError: when an input is not a 2-D 0/1 matrix or the shapes differ.
    """
    pseudo = _binary_matrix("pseudo_labels", pseudo_labels)
    hidden = _binary_matrix("hidden_labels", hidden_labels)
    if pseudo.shape != hidden.shape:
        raise MlcilError(
            f"pseudo_labels {pseudo.shape} and hidden_labels {hidden.shape} must have the same "
            "(images, old classes) shape"
        )
    n_pseudo = int(pseudo.sum())
    n_hidden = int(hidden.sum())
    n_true = int((pseudo & hidden).sum())
    precision = _percent(n_true, n_pseudo)
    recall = _percent(n_true, n_hidden)
    f1 = None
    if precision is not None and recall is not None:
        f1 = 2.0 * precision * recall / (precision + recall) if precision + recall else 0.0
    n_images = pseudo.shape[0]
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "pseudo_positives": n_pseudo,
        "true_positives": n_true,
        "hidden_positives": n_hidden,
        "per_image": n_pseudo / n_images if n_images else None,
        "hidden_per_image": n_hidden / n_images if n_images else None,
    }


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def _slot_means(values: np.ndarray) -> list[float | None]:
    """Means over images (axis 0) of an ``(N, S)`` array; ``None`` per slot when N is 0."""
    if values.shape[0] == 0:
        return [None] * values.shape[1]
    return [float(v) for v in values.mean(axis=0)]


def embedding_drift(before: Any, after: Any) -> dict[str, Any]:
    """How far the embeddings of the same probe images moved between two networks.

    For each image ``n`` and slot ``s`` (one slot per session's embedding), with ``b`` the
    earlier network's vector and ``a`` the current one's: cosine distance ``1 - cos(a, b)``
    (0 unchanged in direction, 1 orthogonal, 2 opposite) and relative change
    ``||a - b|| / ||b||``. Both are averaged over images per slot and over every (image, slot)
    pair overall.

    Args:
        before: ``(N, S, D)`` embeddings from the network at the end of the earlier session,
            or ``(N, D)`` for a single slot.
        after: the current network's embeddings of the same images, same shape. Slice a newer
            network's extra slots off first (``after[:, :S]``): only slots both networks have
            can be compared.

    Returns:
        ``cosine_distance`` and ``relative_l2`` (lists of S floats, one per slot),
        ``mean_cosine_distance`` and ``mean_relative_l2`` (floats; ``None`` for zero images),
        ``num_images`` and ``num_slots``.

    Raises:
        MlcilError: on mismatched or unsupported shapes, NaN/inf values, or a zero vector
            (whose direction, and for ``before`` relative change, is undefined).
    """
    old = _real_array("before", before)
    new = _real_array("after", after)
    if old.shape != new.shape:
        raise MlcilError(
            f"before {old.shape} and after {new.shape} must have the same shape; slice the newer "
            "network's embeddings to the slots (sessions) both networks have"
        )
    if old.ndim == 2:
        old, new = old[:, None, :], new[:, None, :]
    elif old.ndim != 3:
        raise MlcilError(f"embeddings must be (N, S, D) or (N, D), got shape {old.shape}")
    old_norm = np.linalg.norm(old, axis=-1)
    new_norm = np.linalg.norm(new, axis=-1)
    for name, norms in (("before", old_norm), ("after", new_norm)):
        if (norms == 0).any():
            where = tuple(int(i) for i in np.argwhere(norms == 0)[0])
            raise MlcilError(f"{name} has a zero embedding at (image, slot) {where}")
    cosine = np.einsum("nsd,nsd->ns", old, new) / (old_norm * new_norm)
    # Rounding can push |cos| a hair above 1 for (anti)parallel vectors.
    distance = 1.0 - np.clip(cosine, -1.0, 1.0)
    relative = np.linalg.norm(new - old, axis=-1) / old_norm
    return {
        "cosine_distance": _slot_means(distance),
        "relative_l2": _slot_means(relative),
        "mean_cosine_distance": _mean_or_none(distance),
        "mean_relative_l2": _mean_or_none(relative),
        "num_images": int(old.shape[0]),
        "num_slots": int(old.shape[1]),
    }


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warning for large negative logits, unlike 1 / (1 + exp(-x)).
    return 0.5 * (1.0 + np.tanh(0.5 * logits))


def logit_drift(before: Any, after: Any, threshold: float = 0.5) -> dict[str, Any]:
    """How the old-class scores and decisions on the probe images changed.

    Scores are ``sigmoid(logit)``; a pair (image, class) is decided positive when its score is
    ``>= threshold``, the convention of :func:`mlcil.metrics.multilabel.f1_scores`.

    Args:
        before: ``(N, K)`` old-class logits from the network at the end of an earlier session.
        after: ``(N, K)`` logits of the same images and classes from the current network.
        threshold: decision threshold on the sigmoid scores.

    Returns:
        ``mean_abs_score_change`` (mean of ``|sigmoid(after) - sigmoid(before)|``),
        ``flip_fraction`` (share of pairs whose decision changed, in [0, 1]), ``flipped``,
        ``turned_off`` (positive before, negative now), ``turned_on`` (the reverse) and
        ``num_pairs``; the two means are ``None`` when there is no pair.

    Raises:
        MlcilError: on shapes that differ or are not 2-D, NaN/inf logits, or a threshold
            outside (0, 1).
    """
    old = _real_array("before", before)
    new = _real_array("after", after)
    if old.shape != new.shape or old.ndim != 2:
        raise MlcilError(
            f"before {old.shape} and after {new.shape} must be (images, old classes) matrices of "
            "the same shape"
        )
    if not 0.0 < threshold < 1.0:
        raise MlcilError(f"threshold must be a score in (0, 1), got {threshold!r}")
    old_scores, new_scores = _sigmoid(old), _sigmoid(new)
    # Decide on the logits against logit(threshold): exact, whereas sigmoid rounds logits
    # within ~1e-17 of the boundary onto it.
    boundary = float(np.log(threshold) - np.log1p(-threshold))
    old_on, new_on = old >= boundary, new >= boundary
    turned_off = int((old_on & ~new_on).sum())
    turned_on = int((~old_on & new_on).sum())
    pairs = int(old.size)
    return {
        "mean_abs_score_change": _mean_or_none(np.abs(new_scores - old_scores)),
        "flip_fraction": (turned_off + turned_on) / pairs if pairs else None,
        "flipped": turned_off + turned_on,
        "turned_off": turned_off,
        "turned_on": turned_on,
        "num_pairs": pairs,
    }

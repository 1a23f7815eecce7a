"""Metrics over a class-incremental run: average/last mAP and forgetting.

These work on numbers already produced per session by :mod:`mlcil.metrics.multilabel`:
per-session mAPs (percent) and per-class AP histories (fractions in [0, 1]).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from mlcil.errors import MlcilError

logger = logging.getLogger(__name__)

__all__ = ["average_map", "forgetting", "forgetting_per_class", "last_map"]


def _check_session_maps(session_maps: Sequence[float]) -> list[float]:
    values = [float(v) for v in session_maps]
    if not values:
        raise MlcilError("session_maps is empty: need the mAP of at least one session")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise MlcilError(f"session_maps has NaN/inf values at sessions {bad}")
    return values


def average_map(session_maps: Sequence[float]) -> float:
    """Mean of the per-session mAPs, the base session included.

    Args:
        session_maps: mAP after each session, in session order (any unit; percent by
            convention).

    Returns:
        The arithmetic mean, in the same unit.

    Raises:
        MlcilError: if ``session_maps`` is empty or holds NaN/inf.
    """
    values = _check_session_maps(session_maps)
    return sum(values) / len(values)


def last_map(session_maps: Sequence[float]) -> float:
    """mAP after the final session.

    Args:
        session_maps: mAP after each session, in session order.

    Returns:
        The last value.

    Raises:
        MlcilError: if ``session_maps`` is empty or holds NaN/inf.
    """
    return _check_session_maps(session_maps)[-1]


def _check_history(ap_history: Sequence[Sequence[float]]) -> list[np.ndarray]:
    """Validate an AP history and return one float64 array per session."""
    if len(ap_history) == 0:
        raise MlcilError("ap_history is empty: need the per-class APs of at least one session")
    sessions: list[np.ndarray] = []
    for t, session in enumerate(ap_history):
        ap = np.asarray(session, dtype=np.float64)
        if ap.ndim != 1 or ap.size == 0:
            raise MlcilError(
                f"ap_history[{t}] must be a non-empty flat list of per-class APs, "
                f"got shape {ap.shape}"
            )
        if not np.isfinite(ap).all():
            raise MlcilError(f"ap_history[{t}] contains NaN/inf")
        if ap.min() < 0.0 or ap.max() > 1.0:
            # The usual mistake is passing percentages; say so.
            raise MlcilError(
                f"ap_history[{t}] has values outside [0, 1] (min {ap.min()}, max {ap.max()}); "
                "APs must be fractions, not percent"
            )
        if sessions and ap.size < sessions[-1].size:
            raise MlcilError(
                f"ap_history[{t}] has {ap.size} classes but ap_history[{t - 1}] has "
                f"{sessions[-1].size}: the number of seen classes cannot shrink"
            )
        sessions.append(ap)
    return sessions


def forgetting_per_class(ap_history: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-class forgetting: best AP before the final session minus the final AP.

    ``ap_history[t][c]`` is the AP of class ``c`` after session ``t``; class ``c`` is seen in
    session ``t`` when ``c < len(ap_history[t])``. Only classes seen before the final session
    are scored (``c < len(ap_history[-2])``); for each, the best AP over sessions ``0..T-2``
    in which it was seen is compared with its AP after the final session. A class that improved
    gets a negative value (it is not clipped, so the mean is not biased upwards).

    Args:
        ap_history: Per-session lists of per-class APs (fractions), lengths non-decreasing.

    Returns:
        Float64 array of shape ``(len(ap_history[-2]),)`` with forgetting as fractions; empty
        when there is a single session.

    Raises:
        MlcilError: on an empty history, an empty session, values outside [0, 1] or NaN, or a
            session with fewer classes than the one before.
    """
    sessions = _check_history(ap_history)
    if len(sessions) < 2:
        return np.zeros(0, dtype=np.float64)
    earlier = sessions[:-1]
    n_old = earlier[-1].size
    # Pad classes not yet seen with -inf so they never win the max.
    padded = np.full((len(earlier), n_old), -np.inf)
    for t, ap in enumerate(earlier):
        padded[t, : ap.size] = ap
    best = padded.max(axis=0)
    return best - sessions[-1][:n_old]


def forgetting(ap_history: Sequence[Sequence[float]]) -> float | None:
    """Mean forgetting over the classes seen before the final session, in percent.

    See :func:`forgetting_per_class` for the per-class definition.

    Args:
        ap_history: Per-session lists of per-class APs (fractions), lengths non-decreasing.

    Returns:
        100 x the mean per-class forgetting, or ``None`` when there is only one session
        (nothing can have been forgotten yet).

    Raises:
        MlcilError: on a malformed history (see :func:`forgetting_per_class`).
    """
    per_class = forgetting_per_class(ap_history)
    if per_class.size == 0:
        return None
    return float(100.0 * per_class.mean())

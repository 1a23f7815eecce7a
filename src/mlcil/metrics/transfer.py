"""Backward and forward transfer of a multi-label class-incremental run.

A *task* is the set of classes a session introduces, and its performance is the mean of their
per-class APs: in multi-label data an image holds classes of several sessions, so performance is
measured per class (AP over every test image) and averaged over the task's classes, never as an
accuracy over "the task's images". With sessions numbered ``0 .. T-1``, ``R[t][j]`` is the mean
AP of session ``j``'s classes measured after session ``t`` (defined for ``t >= j``: a
class-incremental network has no output for a class before its session).

Backward transfer (the definition of GEM, Lopez-Paz & Ranzato 2017, on these tasks)::

    BWT = mean over j = 0 .. T-2 of ( R[T-1][j] - R[j][j] )

how each earlier session's classes fare at the end, compared with just after they were learned.
Negative: forgetting. Positive: later sessions improved them, which multi-label data allows (a
later session's images also show old classes). Each session weighs the same whatever its number
of classes. Unlike :func:`mlcil.metrics.forgetting`, which compares every class with its *best*
AP before the end, BWT compares with the AP right after the class was learned.

Forward transfer. GEM compares the performance on a task *before* learning it with that of a
random network; without outputs for future classes that quantity does not exist in
class-incremental learning. What the earlier sessions do for a new session is measured instead
against a reference learner: ``B[j]``, the reference's mean AP over session ``j``'s classes
(the report uses joint training, every class learned at once from all the data, averaged over
its seeds: :func:`task_means` of its per-class APs)::

    FWT = mean over j = 1 .. T-1 of ( R[j][j] - B[j] )

Positive: the incremental learner learns each new session's classes better than the reference
does; negative: worse (the intransigence of Chaudhry et al. 2018, with the sign flipped).
Session 0 is left out: nothing learned earlier could transfer to it.

All values keep the unit of the APs given (percent in ``metrics.json``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from mlcil.errors import MlcilError

__all__ = ["backward_transfer", "forward_transfer", "task_means", "transfer_matrix"]


def transfer_matrix(
    ap_after: Sequence[Mapping[str, float]], session_classes: Sequence[Sequence[str]]
) -> np.ndarray:
    """The task matrix ``R``: ``R[t, j]`` = mean AP of session ``j``'s classes after session
    ``t``; NaN above the diagonal (not yet learned).

    Args:
        ap_after: per session, the AP of every class seen so far (``metrics.json``'s
            ``sessions[t].ap``).
        session_classes: per session, the classes it introduced (``sessions[t].classes``).

    Returns:
        A ``(T, T)`` float64 array.

    Raises:
        MlcilError: no session, the two lists of different lengths, a session without classes,
            or a class missing from (or not finite in) an AP table that should hold it.
    """
    if len(ap_after) != len(session_classes):
        raise MlcilError(
            f"transfer_matrix: {len(ap_after)} AP tables for {len(session_classes)} sessions"
        )
    sessions = len(ap_after)
    if sessions == 0:
        raise MlcilError("transfer_matrix: no session")
    matrix = np.full((sessions, sessions), np.nan)
    for j, classes in enumerate(session_classes):
        for t in range(j, sessions):
            matrix[t, j] = _task_mean(ap_after[t], classes, f"session {j}", f"after session {t}")
    return matrix


def task_means(ap: Mapping[str, float], session_classes: Sequence[Sequence[str]]) -> np.ndarray:
    """Per session, the mean of ``ap`` over the classes it introduced: a reference learner's
    ``B`` for :func:`forward_transfer` from its per-class APs (e.g. a joint run's).

    Raises:
        MlcilError: a session without classes, or a class without a finite AP in ``ap``.
    """
    means = [
        _task_mean(ap, classes, f"session {j}", "in the reference")
        for j, classes in enumerate(session_classes)
    ]
    return np.array(means)


def _task_mean(ap: Mapping[str, float], classes: Sequence[str], task: str, where: str) -> float:
    if not classes:
        raise MlcilError(f"transfer: {task} introduces no class")
    values = []
    for name in classes:
        value = ap.get(name)
        if value is None or not math.isfinite(value):
            raise MlcilError(f"transfer: no finite AP of class {name!r} ({task}) {where}")
        values.append(float(value))
    return sum(values) / len(values)


def _square(matrix: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(matrix, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] == 0:
        raise MlcilError(f"{name}: expected a square (T, T) task matrix, got shape {array.shape}")
    lower = array[np.tril_indices(array.shape[0])]
    if not np.isfinite(lower).all():
        raise MlcilError(f"{name}: the task matrix has NaN/inf on or below its diagonal")
    return array


def backward_transfer(matrix: np.ndarray) -> float | None:
    """BWT: the mean over sessions ``j < T-1`` of ``R[T-1, j] - R[j, j]``.

    Args:
        matrix: the task matrix of :func:`transfer_matrix`.

    Returns:
        The backward transfer, or None with a single session (nothing learned later).

    Raises:
        MlcilError: not a square matrix, or NaN/inf on or below its diagonal.
    """
    array = _square(matrix, "backward_transfer")
    last = array.shape[0] - 1
    if last == 0:
        return None
    return float(np.mean([array[last, j] - array[j, j] for j in range(last)]))


def forward_transfer(matrix: np.ndarray, reference: Sequence[float] | np.ndarray) -> float | None:
    """FWT: the mean over sessions ``j >= 1`` of ``R[j, j] - B[j]``.

    Args:
        matrix: the run's task matrix (:func:`transfer_matrix`).
        reference: ``B``: the reference learner's mean AP over each session's classes
            (:func:`task_means`), at least one value per session of the run.

    Returns:
        The forward transfer, or None with a single session.

    Raises:
        MlcilError: a matrix that is not square or not finite on its lower triangle, or a
            reference shorter than the run or not finite.
    """
    array = _square(matrix, "forward_transfer")
    sessions = array.shape[0]
    base = np.asarray(reference, dtype=np.float64)
    if base.ndim != 1 or base.size < sessions:
        raise MlcilError(
            f"forward_transfer: the reference has {base.size} session values, the run "
            f"{sessions} sessions"
        )
    if not np.isfinite(base[:sessions]).all():
        raise MlcilError("forward_transfer: the reference has NaN/inf values")
    if sessions == 1:
        return None
    return float(np.mean([array[j, j] - base[j] for j in range(1, sessions)]))

"""Memory policies: which of a session's images the exemplar memory keeps (``memory.policy``).

Every policy runs once per session, after its training, on the session's own images, and works
under the budget rules of herding (docs/method.md, memory): each new class has ``quota`` slots
(``memory.per_class``, or ``memory.total // seen classes``), so the session stores at most
``quota x new classes`` images, and under a fixed total every class is later cut to its first
slots. A policy returns, for each new class, its picks in priority order (an image labelled with
several new classes appears in each of their lists and is stored once); the first picks are the
ones a smaller budget keeps.

- ``herding`` (default, iCaRL): per class, the images whose feature mean tracks the class mean.
- ``random``: per class, a seeded random sample.
- ``prs`` (Partitioning Reservoir Sampling, Kim et al., ECCV 2020): class slots proportional to
  ``n_c ** rho`` (``n_c``: the class's images in the session), filled greedily so that one
  multi-label image counts for every class it shows.
- ``ocdm`` (Optimizing Class Distribution in Memory, Liang & Li, 2022): greedy removal of images,
  one at a time, each time the one whose removal brings the label distribution of what remains
  closest (KL divergence) to the target ``p_c ~ n_c ** rho`` (uniform with ``rho = 0``).

Randomness (sampling, tie-breaks) comes from a seed the engine derives from the run's seed and
the session, so a selection is reproducible. docs/baselines.md describes the adaptations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from mlcil.errors import MlcilError
from mlcil.registry import Registry

logger = logging.getLogger(__name__)

__all__ = [
    "MEMORY_POLICIES",
    "Candidates",
    "MemoryPolicy",
    "get_policy",
    "herding",
    "kl_to_target",
    "power_targets",
    "proportional_slots",
]


def herding(features: np.ndarray | torch.Tensor, m: int) -> list[int]:
    """iCaRL herding: greedily pick ``m`` rows whose running mean tracks the class mean.

    Rows are first L2-normalised (all-zero rows stay zero) and ``mu`` is the mean of the
    normalised rows. At step ``k`` (1-based) the row ``i`` not yet picked that minimises
    ``|| mu - (sum_picked + f_i) / k ||`` (Euclidean) is picked. Exact distance ties go to the
    smallest index, so the result is deterministic.

    Computation is in float64; each step is one matrix-vector product, ``O(N * D)``, so the
    whole selection is ``O(m * N * D)`` with no Python loop over the rows.

    Args:
        features: ``(N, D)`` features of one class's images (numpy array or torch tensor on any
            device).
        m: number of exemplars wanted.

    Returns:
        Row indices in selection order, ``min(m, N)`` of them (``[]`` when ``m <= 0``).

    Raises:
        MlcilError: when ``features`` is not 2-D or holds NaN or infinite values.
    """
    if isinstance(features, torch.Tensor):
        f = features.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise MlcilError(f"herding features must have shape (N, D), got {f.shape}")
    if not np.isfinite(f).all():
        raise MlcilError("herding features contain NaN or infinite values")
    num_rows = f.shape[0]
    count = min(m, num_rows)
    if count <= 0:
        return []

    norms = np.linalg.norm(f, axis=1, keepdims=True)  # (N, 1)
    f = np.divide(f, norms, out=np.zeros_like(f), where=norms > 0)  # (N, D)
    mu = f.mean(axis=0)  # (D,)
    sq_norms = np.einsum("nd,nd->n", f, f)  # (N,)

    picked: list[int] = []
    available = np.ones(num_rows, dtype=bool)
    running_sum = np.zeros_like(mu)  # (D,)
    for k in range(1, count + 1):
        # || a - f_i / k ||^2 with a = mu - S / k expands to ||a||^2 - 2 a.f_i / k
        # + ||f_i||^2 / k^2; dropping the constant and scaling by k leaves the same argmin and
        # avoids building an (N, D) temporary per step.
        residual = mu - running_sum / k  # (D,)
        cost = sq_norms / k - 2.0 * (f @ residual)  # (N,)
        cost[~available] = np.inf
        best = int(np.argmin(cost))  # argmin returns the first (smallest) index on ties
        picked.append(best)
        available[best] = False
        running_sum += f[best]
    logger.debug("herding picked %d of %d rows", len(picked), num_rows)
    return picked


@dataclasses.dataclass(frozen=True)
class Candidates:
    """What a policy selects from: one session's own training images.

    Attributes:
        labels: ``(n, K)`` 0/1 labels of the session's ``K`` new classes (columns in class order).
        features: ``(n, F)`` un-augmented pooled features, or None for policies that need none.
        slots: per column, the class's exemplar slots (its share of the budget).
        seed: the seed of the selection's randomness.
    """

    labels: np.ndarray
    features: np.ndarray | None
    slots: Sequence[int]
    seed: int

    @property
    def budget(self) -> int:
        """The most images the session may store: every class's slots."""
        return int(sum(self.slots))


class MemoryPolicy:
    """Base class. Subclasses set ``name`` and implement ``select``.

    Attributes:
        name: the ``memory.policy`` value.
        needs_features: the engine computes pooled features of the candidates (herding).
        needs_class_counts: the memory records each class's image count (``n_c``) for
            ``slots`` of later sessions (PRS's shares under a fixed total).
    """

    name: ClassVar[str] = ""
    needs_features: ClassVar[bool] = False
    needs_class_counts: ClassVar[bool] = False

    def __init__(self, rho: float = 0.0) -> None:
        if not math.isfinite(rho):
            raise MlcilError(f"memory.rho must be a finite number, got {rho!r}")
        self.rho = rho

    def slots(self, counts: Sequence[int], quota: int) -> list[int]:
        """Exemplar slots of each class given its image count: ``quota`` each (herding's rule)."""
        return [quota] * len(counts)

    def select(self, candidates: Candidates) -> list[list[int]]:
        """Per column of ``candidates.labels``: rows (indices into the candidates) in priority
        order, each labelled with that column's class."""
        raise NotImplementedError


MEMORY_POLICIES: Registry[MemoryPolicy] = Registry("memory policy")
register_policy = MEMORY_POLICIES.register


def get_policy(name: str, rho: float = 0.0) -> MemoryPolicy:
    """The registered policy ``name`` (an unknown name is an error listing the known ones)."""
    return MEMORY_POLICIES.get_class(name)(rho)


def _class_rows(labels: np.ndarray, column: int) -> np.ndarray:
    return np.flatnonzero(labels[:, column])


@register_policy
class Herding(MemoryPolicy):
    """Herding (iCaRL): per class, the images whose running feature mean tracks the class mean."""

    name = "herding"
    needs_features = True

    def select(self, candidates: Candidates) -> list[list[int]]:
        features = candidates.features
        if features is None:
            raise MlcilError("memory.policy=herding needs the candidates' features")
        picks = []
        for column, slots in enumerate(candidates.slots):
            rows = _class_rows(candidates.labels, column)
            picks.append([int(rows[i]) for i in herding(features[rows], slots)])
        return picks


@register_policy
class RandomPolicy(MemoryPolicy):
    """Random: per class, a seeded random sample of its images."""

    name = "random"

    def select(self, candidates: Candidates) -> list[list[int]]:
        rng = np.random.default_rng(candidates.seed)
        picks = []
        for column, slots in enumerate(candidates.slots):
            rows = rng.permutation(_class_rows(candidates.labels, column))
            picks.append([int(r) for r in rows[: max(slots, 0)]])
        return picks


def power_targets(counts: Sequence[int], rho: float) -> np.ndarray:
    """``n_c ** rho`` normalised to sum to 1 over the classes with images (0 elsewhere).

    ``rho = 0`` balances the classes; ``rho = 1`` keeps their proportions in the data."""
    n = np.asarray(counts, dtype=np.float64)
    weights = np.zeros_like(n)
    present = n > 0
    weights[present] = n[present] ** rho
    total = weights.sum()
    return weights / total if total > 0 else weights


def proportional_slots(counts: Sequence[int], total: int, rho: float) -> list[int]:
    """``total`` slots shared in proportion to ``n_c ** rho`` (PRS's partition sizes), rounded
    by largest remainder so that they add up to ``total`` exactly (ties to the lower class)."""
    shares = power_targets(counts, rho) * max(total, 0)
    slots = np.floor(shares).astype(np.int64)
    missing = round(float(shares.sum())) - int(slots.sum())
    remainders = shares - slots
    for index in sorted(range(len(slots)), key=lambda i: (-remainders[i], i))[:missing]:
        slots[index] += 1
    return [int(s) for s in slots]


@register_policy
class PartitioningReservoir(MemoryPolicy):
    """PRS: class slots proportional to n_c^rho, filled greedily with multi-label images."""

    name = "prs"
    needs_class_counts = True

    def slots(self, counts: Sequence[int], quota: int) -> list[int]:
        return proportional_slots(counts, quota * len(counts), self.rho)

    def select(self, candidates: Candidates) -> list[list[int]]:
        """Repeatedly take the class furthest below its slots (relative deficit) and add the
        image of that class that shows the fewest classes already full (the reservoir's random
        order breaks ties), until no class with images left is below its slots."""
        labels = candidates.labels.astype(bool)
        targets = np.asarray(candidates.slots, dtype=np.float64)
        order = np.random.default_rng(candidates.seed).permutation(len(labels))
        available = np.ones(len(labels), dtype=bool)
        filled = np.zeros(labels.shape[1], dtype=np.float64)
        chosen: list[int] = []
        while len(chosen) < candidates.budget:
            open_classes = labels[order][available[order]].any(axis=0) & (filled < targets)
            if not open_classes.any():
                break
            deficit = np.where(open_classes, (targets - filled) / np.maximum(targets, 1), -1.0)
            column = int(np.argmax(deficit))  # the first class on ties
            rows = order[available[order] & labels[order, column]]
            full = filled >= targets
            overshoot = labels[rows][:, full].sum(axis=1)
            best = int(rows[int(np.argmin(overshoot))])  # the earliest in the order on ties
            chosen.append(best)
            available[best] = False
            filled += labels[best]
        return [[r for r in chosen if labels[r, k]] for k in range(labels.shape[1])]


def kl_to_target(target: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``KL(target || counts / counts.sum())`` for each row of ``counts`` (``(U, K)``); infinite
    where a class the target wants has no image left."""
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    totals = counts.sum(axis=1, keepdims=True)
    wanted = target > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = counts[:, wanted] / totals
        terms = target[wanted] * (np.log(target[wanted]) - np.log(q))
    kl = terms.sum(axis=1)
    kl[~np.isfinite(kl)] = np.inf
    return kl


@register_policy
class ClassDistribution(MemoryPolicy):
    """OCDM: greedy removal towards the target label distribution (uniform with rho 0)."""

    name = "ocdm"

    def select(self, candidates: Candidates) -> list[list[int]]:
        labels = candidates.labels.astype(bool)
        ranking = self.keep_order(labels, candidates.seed)
        kept = ranking[: candidates.budget]
        return [[r for r in kept if labels[r, k]] for k in range(labels.shape[1])]

    def keep_order(self, labels: np.ndarray, seed: int) -> list[int]:
        """Every row, the last removed first: the greedy removal run until nothing is left.

        Removing an image changes the class counts only through its label pattern, so each
        step scores the distinct patterns (not every image) and removes one image of the best
        (the first pattern on ties; within a pattern, the seeded order's last image)."""
        target = power_targets(labels.sum(axis=0), self.rho)
        patterns, inverse = np.unique(labels, axis=0, return_inverse=True)
        patterns = patterns.astype(np.float64)
        order = np.random.default_rng(seed).permutation(len(labels))
        members: list[list[int]] = [[] for _ in range(len(patterns))]
        for row in order:
            members[int(inverse.reshape(-1)[row])].append(int(row))
        counts = labels.sum(axis=0).astype(np.float64)
        sizes = np.array([len(m) for m in members])
        removed: list[int] = []
        for _ in range(len(labels)):
            alive = sizes > 0
            scores = np.full(len(patterns), np.inf)
            remaining = counts[None, :] - patterns[alive]
            scores[alive] = kl_to_target(target, remaining)
            # All infinite (the last images of a class): still remove one, the first alive.
            pick = int(np.argmin(scores)) if np.isfinite(scores).any() else int(np.argmax(alive))
            removed.append(members[pick].pop())
            sizes[pick] -= 1
            counts -= patterns[pick]
        return removed[::-1]

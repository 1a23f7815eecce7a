"""What the classification loss makes of a new image's old classes (``method.old_classes``).

In every session only the session's new classes are labelled: on the session's own images the
columns of the old classes read 0 whether the object is there or not. A *rule* says what the
classification loss does with those zeros, and it moves a method's results more than most of its
other choices, so every method honours one shared setting (docs/baselines.md):

- ``negative``: the zeros are negatives; every seen column of every row is in the loss (the
  released baselines, and the tables of the literature).
- ``ignore``: the old columns of the session's own images are left out of the loss; replayed
  exemplars keep the labels stored with them (every seen column of theirs stays in).
- ``distill``: the old columns of every row, exemplars included, leave the hard-label loss and
  take the previous network's sigmoid scores as soft targets (binary cross-entropy): LwF.MC as
  iCaRL defines it. A method that distils old outputs itself (LwF, iCaRL, AGCN, BiC) keeps its
  own term for them, so the rule then only takes the old columns out of the hard-label loss.
- ``pseudo``: the old classes the previous network scores above the DPL threshold become
  positives (on every row; labels are only ever added), every other zero stays a negative
  (KRT as released).
- ``pseudo-ignore``: positives as ``pseudo``; on the session's own images an old column is a
  negative only where the previous network is confident the class is absent (its score is at
  or below the *negative threshold*) and is left out in between.
- ``pseudo-soft``: positives as ``pseudo``; every other old column of the session's own images
  takes the previous network's score as a soft target (``distill``) instead of a hard negative
  (beyond KRT's paper: docs/baselines.md says why).

The negative threshold is chosen by the same exact order statistic as the DPL threshold: the
DPL threshold makes the old positives per image match the label density prior ``rho x old
classes``; the negative threshold leaves ``negative_margin x`` that many old entries per image
above it (positives and undecided ones), so everything ranked below is a negative. With the
default margin 2 an image keeps, on average, as many undecided old entries as restored ones.

Everything here is a pure function of tensors; :mod:`mlcil.methods.base` applies it where the
classification loss is made. A masked entry contributes exactly zero loss and zero gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, get_args

import torch
from pydantic import Field

from mlcil.config.schema import Params
from mlcil.errors import MlcilError
from mlcil.pseudo_labels import apply_pseudo_labels, dpl_threshold, iterative_dpl_threshold

OldClassRule = Literal["negative", "ignore", "distill", "pseudo", "pseudo-ignore", "pseudo-soft"]
OLD_CLASS_RULES: tuple[str, ...] = get_args(OldClassRule)

# One line each, for `mlcil list` and the docs.
RULE_SUMMARIES: dict[str, str] = {
    "negative": "absent old labels are negatives",
    "ignore": "old columns of new images left out; exemplars keep their stored labels",
    "distill": "old columns take the previous network's scores as soft targets",
    "pseudo": "previous network's confident old classes become positives, the rest negatives",
    "pseudo-ignore": "pseudo positives; negatives only where the previous network is sure",
    "pseudo-soft": "pseudo positives; the previous network's scores as soft targets elsewhere",
}

# Rules that read the previous network's scores during training.
RULES_WITH_TEACHER = frozenset({"distill", "pseudo", "pseudo-ignore", "pseudo-soft"})
# Rules that need the DPL threshold chosen before each incremental session.
RULES_WITH_THRESHOLD = frozenset({"pseudo", "pseudo-ignore", "pseudo-soft"})


class PseudoLabelParams(Params):
    """How the DPL threshold of the ``pseudo`` rules is found (KRT's knobs; defaults elsewhere)."""

    threshold_search: Literal["exact", "iterative"] = "exact"  # iterative: the released search
    # Iterative search only: start each session from the previous session's threshold (0.8 in
    # the first incremental session), as the release does; False restarts at 0.8 every time.
    threshold_warm_start: bool = False
    # The iterative search's float32 rounding of the mean count: the release's formula on CPU
    # tensors ("cpu") or as its CUDA runs computed it ("cuda"); see iterative_dpl_threshold.
    threshold_arithmetic: Literal["cpu", "cuda"] = "cpu"
    # DPL prior rho, labels per image per class; None: the dataset's published value (COCO
    # 2.9/80, VOC 1.4/20), else the training split's own label density.
    label_density: Annotated[float, Field(gt=0, le=1)] | None = None
    # The images the threshold pass scores: "all" the session's training rows, replayed
    # exemplars included, as the release does; "own" the session's own images only, the ones
    # whose old labels are unknown (exemplars are old-class images: counted in, they pull the
    # threshold down and restore more labels on new images than the prior asks for).
    threshold_images: Literal["all", "own"] = "all"


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The scores that decide old columns in one session: above ``positive`` a restored
    positive; at or below ``negative`` (``pseudo-ignore`` only) a confident negative."""

    positive: float
    negative: float | None = None


@dataclasses.dataclass(frozen=True)
class OldClassTargets:
    """The classification loss's targets over the seen classes under a rule.

    Attributes:
        targets: ``(B, seen)`` 0/1 hard targets.
        mask: ``(B, seen)`` bool, True where an entry is in the hard-label loss; None: every
            entry is.
        soft_logits: ``(B, old)`` the previous network's logits, whose sigmoids are the soft
            targets of the old columns (``distill``, ``pseudo-soft``); None otherwise.
        soft_mask: ``(B, old)`` bool, the old entries that take soft targets; None: all of
            them (when ``soft_logits`` is given).
        first_column: columns before it are out of the hard-label loss on every row (the old
            ones, for ``distill`` and for ``ignore`` on a batch without exemplars): the loss is
            then taken over the remaining columns only, which is the same loss as the mask's and
            the same arithmetic as a method that slices them off.
    """

    targets: torch.Tensor
    mask: torch.Tensor | None = None
    soft_logits: torch.Tensor | None = None
    first_column: int = 0
    soft_mask: torch.Tensor | None = None

    def rows(self, selected: torch.Tensor) -> OldClassTargets:
        """The same targets for some rows (a boolean or index selection)."""
        return OldClassTargets(
            self.targets[selected],
            None if self.mask is None else self.mask[selected],
            None if self.soft_logits is None else self.soft_logits[selected],
            self.first_column,
            None if self.soft_mask is None else self.soft_mask[selected],
        )

    def kept_mask(self) -> torch.Tensor:
        """``(B, seen)`` bool: every entry in the hard-label loss."""
        kept = torch.ones(self.targets.shape, dtype=torch.bool, device=self.targets.device)
        if self.mask is not None:
            kept &= self.mask.to(dtype=torch.bool)
        kept[:, : self.first_column] = False
        return kept


def old_class_targets(
    rule: str,
    targets: torch.Tensor,
    num_old: int,
    exemplar: torch.Tensor | None = None,
    old_logits: torch.Tensor | None = None,
    thresholds: Thresholds | None = None,
) -> OldClassTargets:
    """The targets and loss mask of a batch under ``rule``.

    Args:
        rule: one of :data:`OLD_CLASS_RULES`.
        targets: ``(B, seen)`` the labels the batch carries (old columns 0 on own images).
        num_old: the old classes: the first ``num_old`` columns.
        exemplar: ``(B,)`` bool, True on replayed exemplars; None: no row is.
        old_logits: ``(B, num_old)`` the previous network's logits on the same images
            (``distill``, ``pseudo``, ``pseudo-ignore``).
        thresholds: the session's thresholds (``pseudo``, ``pseudo-ignore``).

    Raises:
        MlcilError: on an unknown rule, or a rule that needs the previous network's outputs or
            thresholds without them while there are old classes.
    """
    if rule not in OLD_CLASS_RULES:
        raise MlcilError(f"unknown old-class rule {rule!r}: one of {', '.join(OLD_CLASS_RULES)}")
    if num_old == 0 or rule == "negative":
        return OldClassTargets(targets)
    if rule in RULES_WITH_TEACHER and old_logits is None:
        raise MlcilError(f"old-class rule {rule!r} needs the previous network's outputs")
    rows = len(targets)
    own = torch.ones(rows, dtype=torch.bool, device=targets.device)
    if exemplar is not None:
        own = ~exemplar.to(device=targets.device, dtype=torch.bool)
    if rule == "ignore":
        if bool(own.all()):
            return OldClassTargets(targets, first_column=num_old)
        mask = torch.ones(targets.shape, dtype=torch.bool, device=targets.device)
        mask[:, :num_old] = ~own[:, None]
        return OldClassTargets(targets, mask)
    assert old_logits is not None
    if rule == "distill":
        return OldClassTargets(targets, soft_logits=old_logits.detach(), first_column=num_old)
    if thresholds is None:
        raise MlcilError(f"old-class rule {rule!r} needs the session's DPL threshold")
    scores = old_logits.detach().float().sigmoid()
    restored = apply_pseudo_labels(targets, scores, thresholds.positive)
    if rule == "pseudo":
        return OldClassTargets(restored)
    if rule == "pseudo-soft":
        # Own images: restored positives stay hard, every other old entry is soft; exemplar
        # rows keep hard labels everywhere (their stored ones plus the restored ones).
        hard = (scores > thresholds.positive) | ~own[:, None]
        mask = torch.ones(targets.shape, dtype=torch.bool, device=targets.device)
        mask[:, :num_old] = hard
        return OldClassTargets(restored, mask, old_logits.detach(), soft_mask=~hard)
    if thresholds.negative is None:
        raise MlcilError("old-class rule 'pseudo-ignore' needs the session's negative threshold")
    decided = (scores > thresholds.positive) | (scores <= thresholds.negative)
    mask = torch.ones(targets.shape, dtype=torch.bool, device=targets.device)
    mask[:, :num_old] = decided | ~own[:, None]
    return OldClassTargets(restored, mask)


def choose_thresholds(
    rule: str,
    old_scores: torch.Tensor,
    positives_per_image: float,
    settings: PseudoLabelParams,
    negative_margin: float,
    previous: Thresholds | None = None,
) -> Thresholds:
    """A session's thresholds from the previous network's sigmoid scores of its training images.

    Args:
        rule: ``pseudo`` or ``pseudo-ignore``.
        old_scores: ``(N, old classes)`` scores.
        positives_per_image: the DPL target, ``rho x old classes``.
        settings: the threshold search.
        negative_margin: ``pseudo-ignore``: the negative threshold leaves this many times the
            DPL target above it per image (>= 1).
        previous: the last session's thresholds (the iterative search's warm start).
    """
    if settings.threshold_search == "exact":
        positive = dpl_threshold(old_scores, positives_per_image)
    else:
        warm = settings.threshold_warm_start and previous is not None
        start = previous.positive if warm and previous is not None else 0.8
        positive = iterative_dpl_threshold(
            old_scores,
            positives_per_image,
            start=start,
            arithmetic=settings.threshold_arithmetic,
        )
    if rule != "pseudo-ignore":
        return Thresholds(positive)
    if negative_margin < 1:
        raise MlcilError(f"negative_margin must be >= 1, got {negative_margin}")
    # At most every old entry above it (then no old entry is a confident negative).
    above = min(negative_margin * positives_per_image, float(old_scores.shape[-1]))
    negative = dpl_threshold(old_scores, above)
    return Thresholds(positive, min(negative, positive))

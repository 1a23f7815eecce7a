"""iCaRL: Incremental Classifier and Representation Learning (Rebuffi et al., CVPR 2017).

- Loss: the run's classification loss on the new classes (ASL; with ``loss.gamma_neg: 0`` and
  ``loss.clip: 0`` exactly iCaRL's binary cross-entropy) plus binary distillation on the old
  classes: their sigmoid outputs are pulled to the previous network's (BCE with soft targets),
  on every image, exemplars included, since iCaRL replaces old-class labels by the old
  network's outputs. iCaRL's outputs are already sigmoids; the multi-label change is only that
  an image brings a label set instead of one label. The loss is LwF's here (this class extends
  it); what makes iCaRL is the memory and the prediction rule.
- Memory: herded exemplars (``memory.policy: herding``), required.
- Prediction (``prediction: nme``, the paper's): nearest mean of exemplars, made per class for
  multi-label outputs. With ``f`` the L2-normalised pooled features, class ``c`` has two means
  over the exemplars, each normalised: ``mu+`` of those labelled ``c`` and ``mu-`` of those not
  labelled ``c`` (labels as replay gives them). The image's score for ``c`` is
  ``(f . mu+ - f . mu-) / nme_temperature``, a logit: positive when the image is nearer the
  exemplars showing ``c`` than those without it, so each class ranks images on its own, as
  mAP needs. ``prediction: heads`` uses the sigmoid heads instead. The means are computed after
  each session's memory update and kept in the checkpoints.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from mlcil.errors import WeightsError
from mlcil.methods.base import ExemplarSet
from mlcil.methods.lwf import LwF, LwFParams
from mlcil.methods.registry import register_method

logger = logging.getLogger(__name__)


class ICaRLParams(LwFParams):
    prediction: Literal["nme", "heads"] = "nme"
    nme_temperature: Annotated[float, Field(gt=0)] = 0.1  # NME similarity gap -> logit scale


def class_means(features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, F)`` normalised means of the normalised ``features`` of the rows labelled with each
    class, and of the rows not labelled with it (zero where there is no such row)."""
    normalised = F.normalize(features.float(), dim=1)
    labelled = targets.float()
    positive = F.normalize(labelled.T @ normalised, dim=1)
    negative = F.normalize((1.0 - labelled).T @ normalised, dim=1)
    return positive, negative


def nme_logits(
    features: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``(B, C)``: per class, the cosine to its positive mean minus the one to its negative
    mean, over ``temperature``."""
    normalised = F.normalize(features.float(), dim=1)
    return (normalised @ positive.T - normalised @ negative.T) / temperature


@register_method
class ICaRL(LwF):
    """iCaRL (Rebuffi et al., CVPR 2017): distillation, herding, nearest-mean prediction."""

    name = "icarl"
    Params = ICaRLParams
    needs_memory = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.positive_means: torch.Tensor | None = None  # (seen, F)
        self.negative_means: torch.Tensor | None = None
        self.heads_fallback_logged = False

    def prepare_prediction(self, exemplars: ExemplarSet) -> None:
        if self.params.prediction != "nme":
            return
        features = exemplars.features()
        empty = [c for c in range(exemplars.targets.shape[1]) if not exemplars.targets[:, c].any()]
        if empty:
            logger.warning("NME: classes %s have no exemplar; their positive mean is 0", empty)
        self.positive_means, self.negative_means = class_means(features, exemplars.targets)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        positive, negative = self.positive_means, self.negative_means
        if self.params.prediction != "nme":
            return super().predict(images)
        if positive is None or negative is None or len(positive) < self.seen:
            # Inside a session, before its memory exists, or a checkpoint without its means
            # (an older one, or a damaged one): the heads score, and the log says so once.
            if not self.heads_fallback_logged:
                self.heads_fallback_logged = True
                known = 0 if positive is None else len(positive)
                logger.warning(
                    "iCaRL: class means for %d of %d classes: scoring with the sigmoid heads "
                    "until the session's memory gives them all",
                    known,
                    self.seen,
                )
            return super().predict(images)
        features = self.network.pooled_features(images)
        device = features.device
        means = positive.to(device), negative.to(device)
        return nme_logits(features, *means, self.params.nme_temperature)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.positive_means is None or self.negative_means is None:
            return {}
        return {"nme_positive": self.positive_means, "nme_negative": self.negative_means}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        # Both means or neither (a checkpoint inside the first session has none), one row per
        # class the network had when they were computed (at most its classes now), finite.
        names = {"nme_positive", "nme_negative"}
        if tensors and set(tensors) != names:
            raise WeightsError(
                f"iCaRL's class means: expected the tensors {sorted(names)}, found "
                f"{sorted(tensors)[:4]}"
            )
        positive, negative = tensors.get("nme_positive"), tensors.get("nme_negative")
        if positive is not None and negative is not None:
            classes = self.network.num_classes
            if (
                positive.shape != negative.shape
                or positive.ndim != 2
                or not 0 < len(positive) <= classes
                or not positive.is_floating_point()
            ):
                raise WeightsError(
                    f"iCaRL's class means have shape {tuple(positive.shape)} and "
                    f"{tuple(negative.shape)}: expected two equal (classes, features) tables "
                    f"of at most {classes} classes"
                )
        self.positive_means, self.negative_means = positive, negative

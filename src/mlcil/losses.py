"""Losses of KRT and of the baselines: asymmetric loss, token and logit distillation, PODNet.

Every function here is pure: it returns a fresh float32 scalar tensor, touches no global state,
works on whatever device its inputs live on, and is safe under ``torch.autocast`` because inputs
are upcast with ``.float()`` before any log, power or normalisation (half precision loses too much
in ``log(1 - p)`` and in the norms of long embeddings).

"Old" tensors (the frozen previous model's outputs) are always treated as constant targets: they
are detached, so a caller that forgets ``torch.no_grad()`` around the old model still cannot push
gradients into it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mlcil.errors import MlcilError

__all__ = [
    "asymmetric_loss",
    "pod_flat",
    "pod_spatial",
    "sigmoid_distillation",
    "token_distillation",
    "token_distillation_weight",
]


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Raise ``MlcilError`` unless ``a`` and ``b`` have the same shape."""
    if a.shape != b.shape:
        raise MlcilError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )


def _check_non_negative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise MlcilError(f"{name} must be a finite number >= 0, got {value!r}")


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float | None = 0.05,
    eps: float = 1e-8,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Asymmetric loss (ASL, Ridnik et al. 2021) for multi-label classification, summed.

    With ``p = sigmoid(logit)`` and the shifted negative probability
    ``p_neg = min(1 - p + clip, 1)`` (``p_neg = 1 - p`` when ``clip`` is 0 or None)::

        loss = -sum_{b, c} [y log(max(p, eps)) + (1 - y) log(max(p_neg, eps))] * w
        w    = (1 - p_t) ** gamma,  p_t = p, gamma = gamma_pos      for positives (y = 1)
                                    p_t = p_neg, gamma = gamma_neg  for negatives (y = 0)

    The focusing weight ``w`` is computed without gradient, as in the reference ASL: it scales
    each element's loss but is not itself optimised. The clip discards easy negatives entirely
    (``p <= clip`` gives ``p_neg = 1`` and a zero loss). With ``gamma_neg = gamma_pos = 0`` and
    ``clip = 0`` this is exactly the summed binary cross-entropy.

    The reduction is a SUM over batch and classes, not a mean, so the loss scale grows with the
    batch size and the number of classes; learning rates in the configs assume this.

    Args:
        logits: ``(B, C)`` raw scores, any floating dtype (upcast to float32).
        targets: ``(B, C)`` 0/1 labels, same shape as ``logits``.
        gamma_neg: focusing exponent of negatives, >= 0.
        gamma_pos: focusing exponent of positives, >= 0.
        clip: probability margin added to negatives, in ``[0, 1)``; 0 or None disables it.
        eps: floor of the probabilities inside the logs, >= 0.
        mask: ``(B, C)`` bool, the entries summed; None: all. A left-out entry adds exactly
            zero to the loss and to every gradient (its element is never summed), so entries
            whose label is unknown can be left out (mlcil.old_classes).

    Returns:
        A float32 scalar tensor.

    Raises:
        MlcilError: on mismatched shapes or out-of-range hyper-parameters.
    """
    _check_same_shape("logits", logits, "targets", targets)
    if mask is not None:
        _check_same_shape("logits", logits, "mask", mask)
    _check_non_negative("gamma_neg", gamma_neg)
    _check_non_negative("gamma_pos", gamma_pos)
    _check_non_negative("eps", eps)
    if clip is not None and not (math.isfinite(clip) and 0 <= clip < 1):
        raise MlcilError(f"clip must be None or in [0, 1), got {clip!r}")

    x = logits.float()  # (B, C)
    y = targets.float()  # (B, C)
    p = torch.sigmoid(x)  # (B, C)
    # sigmoid(-x) is 1 - p without the cancellation of 1 - sigmoid(x) for confident logits.
    p_neg = torch.sigmoid(-x)  # (B, C)
    if clip:
        p_neg = (p_neg + clip).clamp(max=1.0)

    log_pos = torch.log(p.clamp(min=eps))  # (B, C)
    log_neg = torch.log(p_neg.clamp(min=eps))  # (B, C)
    loss = y * log_pos + (1.0 - y) * log_neg  # (B, C)

    if gamma_neg > 0 or gamma_pos > 0:
        # The weight only re-balances easy vs hard elements; ASL keeps it out of the graph.
        with torch.no_grad():
            p_t = y * p + (1.0 - y) * p_neg  # (B, C)
            gamma = y * gamma_pos + (1.0 - y) * gamma_neg  # (B, C)
            weight = torch.pow(1.0 - p_t, gamma)  # (B, C)
        loss = loss * weight

    if mask is not None:
        # Selecting (not multiplying) keeps a left-out entry out of the sum and its gradient
        # exactly zero, whatever its value.
        return -loss[mask.to(device=loss.device, dtype=torch.bool)].sum()
    return -loss.sum()


def _flatten_tokens(name: str, tokens: torch.Tensor) -> torch.Tensor:
    """Return ``(B, D)`` tokens, flattening ``(B, S, D)`` to ``(B, S*D)``."""
    if tokens.ndim == 3:
        return tokens.reshape(tokens.shape[0], -1)
    if tokens.ndim != 2:
        raise MlcilError(f"{name} must have shape (B, D) or (B, S, D), got {tuple(tokens.shape)}")
    return tokens


def token_distillation(old_tokens: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
    """KRT's token distillation: mean over the batch of ``1 - cos(old_i, new_i)``.

    The caller concatenates the per-session class-embedding outputs of one image into one
    vector, so the cosine compares the whole set of old-session tokens at once. A ``(B, S, D)``
    input (``S`` tokens of width ``D``) is accepted and flattened row-major to ``(B, S*D)``,
    which is the same as concatenating the ``S`` tokens in order.

    Args:
        old_tokens: ``(B, D)`` or ``(B, S, D)`` outputs of the frozen old model (detached).
        new_tokens: same shape, outputs of the model being trained.

    Returns:
        A float32 scalar in ``[0, 2]``: 0 for parallel, 1 for orthogonal, 2 for opposite rows.

    Raises:
        MlcilError: on mismatched shapes, a wrong number of dimensions or an empty batch.
    """
    _check_same_shape("old_tokens", old_tokens, "new_tokens", new_tokens)
    old = _flatten_tokens("old_tokens", old_tokens).detach().float()  # (B, D)
    new = _flatten_tokens("new_tokens", new_tokens).float()  # (B, D)
    if old.shape[0] == 0:
        raise MlcilError("token distillation needs a non-empty batch, got B = 0")
    cosine = F.cosine_similarity(old, new, dim=1)  # (B,)
    return (1.0 - cosine).mean()


def token_distillation_weight(
    base_weight: float, num_seen_classes: int, num_new_classes: int
) -> float:
    """KRT's schedule of the token-distillation weight: ``base * sqrt(seen / new)``.

    The more old knowledge there is relative to what the session adds, the harder the
    distillation pulls.

    Args:
        base_weight: the configured lambda, >= 0.
        num_seen_classes: classes seen so far, INCLUDING the current session's classes.
        num_new_classes: classes introduced by the current session, > 0.

    Returns:
        The weight as a Python float.

    Raises:
        MlcilError: when ``num_new_classes <= 0``, ``num_seen_classes < num_new_classes`` (the
            seen classes include the new ones, so a smaller count means swapped arguments or an
            old-classes-only count) or ``base_weight`` is negative or not finite.
    """
    _check_non_negative("base_weight", base_weight)
    if num_new_classes <= 0:
        raise MlcilError(f"num_new_classes must be > 0, got {num_new_classes}")
    if num_seen_classes < num_new_classes:
        raise MlcilError(
            f"num_seen_classes ({num_seen_classes}) must include the session's "
            f"num_new_classes ({num_new_classes})"
        )
    return float(base_weight) * math.sqrt(num_seen_classes / num_new_classes)


def sigmoid_distillation(
    new_logits: torch.Tensor, old_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """LwF-style distillation for multi-label outputs, summed over batch and classes.

    Binary cross-entropy of ``sigmoid(new_logits)`` against the soft targets
    ``sigmoid(old_logits)``. Its gradient with respect to ``new_logits`` is
    ``sigmoid(new) - sigmoid(old)``, zero when the two models agree. The sum matches the scale
    of the summed :func:`asymmetric_loss`.

    Args:
        new_logits: ``(B, K)`` logits of the current model on the old classes.
        old_logits: ``(B, K)`` logits of the frozen old model (detached).
        mask: ``(B, K)`` bool, the entries summed; None: all (a left-out entry adds exactly
            zero to the loss and the gradients).

    Returns:
        A float32 scalar tensor.

    Raises:
        MlcilError: on mismatched shapes or inputs that are not 2-D.
    """
    _check_same_shape("new_logits", new_logits, "old_logits", old_logits)
    if new_logits.ndim != 2:
        raise MlcilError(f"logits must have shape (B, K), got {tuple(new_logits.shape)}")
    soft_targets = torch.sigmoid(old_logits.detach().float())  # (B, K)
    # The with-logits form uses log-sigmoid internally, stable for confident logits.
    if mask is None:
        return F.binary_cross_entropy_with_logits(new_logits.float(), soft_targets, reduction="sum")
    _check_same_shape("new_logits", new_logits, "mask", mask)
    elements = F.binary_cross_entropy_with_logits(
        new_logits.float(), soft_targets, reduction="none"
    )
    return elements[mask.to(device=elements.device, dtype=torch.bool)].sum()


def _pod_pool(features: torch.Tensor) -> torch.Tensor:
    """Width- and height-pooled descriptor of ``(B, C, H, W)`` maps, L2-normalised per image."""
    width_pooled = features.sum(dim=3).flatten(1)  # (B, C*H)
    height_pooled = features.sum(dim=2).flatten(1)  # (B, C*W)
    pooled = torch.cat([width_pooled, height_pooled], dim=1)  # (B, C*(H+W))
    return F.normalize(pooled, dim=1)


def pod_spatial(
    old_features: Sequence[torch.Tensor], new_features: Sequence[torch.Tensor]
) -> torch.Tensor:
    """PODNet's pooled-outputs distillation (POD-spatial) over backbone stages.

    For each stage the feature map is summed over its width and over its height, the two
    pooled maps are concatenated per image into a ``(C*(H+W))`` vector and L2-normalised; the
    stage's loss is the batch mean of the Euclidean distance between old and new vectors. The
    result is the mean over stages.

    Unlike PODNet's reference code the activations are NOT squared before pooling: raw
    activations are pooled (after a ReLU they are non-negative anyway, so the pooled values
    keep their meaning of "how much activation lies in this row/column").

    Args:
        old_features: per-stage ``(B, C, H, W)`` maps of the frozen old model (detached).
        new_features: the same stages of the current model, same length and shapes.

    Returns:
        A float32 scalar tensor, 0 when the features agree up to a positive scale per image.

    Raises:
        MlcilError: on empty lists, lists of different lengths, non-4-D maps or mismatched
            shapes.
    """
    if len(old_features) == 0:
        raise MlcilError("pod_spatial needs at least one stage of features, got none")
    if len(old_features) != len(new_features):
        raise MlcilError(
            f"old_features and new_features must list the same stages, got {len(old_features)} "
            f"and {len(new_features)}"
        )
    stage_losses = []
    for stage, (old, new) in enumerate(zip(old_features, new_features, strict=True)):
        _check_same_shape(f"old_features[{stage}]", old, f"new_features[{stage}]", new)
        if old.ndim != 4:
            raise MlcilError(
                f"stage {stage} features must have shape (B, C, H, W), got {tuple(old.shape)}"
            )
        old_pooled = _pod_pool(old.detach().float())  # (B, C*(H+W))
        new_pooled = _pod_pool(new.float())  # (B, C*(H+W))
        distance = torch.linalg.vector_norm(old_pooled - new_pooled, dim=1)  # (B,)
        stage_losses.append(distance.mean())
    return torch.stack(stage_losses).mean()


def pod_flat(old_embedding: torch.Tensor, new_embedding: torch.Tensor) -> torch.Tensor:
    """PODNet's POD-flat: batch mean of ``1 - cos`` between pooled ``(B, F)`` embeddings.

    This is :func:`token_distillation` restricted to 2-D inputs.

    Raises:
        MlcilError: on mismatched shapes or inputs that are not 2-D.
    """
    if old_embedding.ndim != 2 or new_embedding.ndim != 2:
        raise MlcilError(
            f"pod_flat embeddings must have shape (B, F), got {tuple(old_embedding.shape)} "
            f"and {tuple(new_embedding.shape)}"
        )
    return token_distillation(old_embedding, new_embedding)

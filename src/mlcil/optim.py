"""The default optimisation of every method (docs/method.md, optimisation): Adam with coupled
weight decay on tensors of two or more dimensions, and OneCycle per session stepped every batch."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def decay_groups(parameters: Iterable[nn.Parameter]) -> list[dict[str, Any]]:
    """Trainable parameters split for weight decay: tensors with two or more dimensions (weights,
    tokens, positional embedding) decay, 1-d ones (biases, norm scales) do not. Frozen parameters
    are left out."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for parameter in parameters:
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def one_cycle(
    optimizer: torch.optim.Optimizer,
    max_lr: float | list[float],
    total_steps: int,
    pct_start: float,
) -> torch.optim.lr_scheduler.LRScheduler:
    """OneCycle per session, stepped every batch (``max_lr``: one peak, or one per group).

    OneCycle needs a warm-up of at least two steps; a session too short for that (tiny data or
    a test run) trains at the constant ``max_lr`` instead of failing.
    """
    if pct_start * total_steps <= 2:
        logger.warning(
            "only %d steps in this session: too few for OneCycle, using a constant lr", total_steps
        )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start
    )

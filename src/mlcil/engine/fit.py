"""Fitting one session: the epochs of optimiser steps a method's loss drives.

Every epoch re-seeds python, numpy and torch from ``(run seed, session, epoch)`` and shuffles with
a loader seeded the same way, so each epoch is reproducible on its own: exact resume needs no
random-state snapshot at session boundaries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mlcil.config.schema import TrainConfig
from mlcil.engine.observers import Observer
from mlcil.errors import TrainingError
from mlcil.methods.base import Batch, Method, Optimization, SessionContext
from mlcil.runtime import derive_seed, seed_everything


class NonFiniteLossError(TrainingError):
    """A step produced a NaN or infinite loss; the weights were not updated with it."""


def fit_session(
    method: Method,
    context: SessionContext,
    train: TrainConfig,
    observer: Observer,
    interim_map: Callable[[], float] | None = None,
) -> None:
    """Train ``method`` on the session of ``context`` for the configured epochs.

    Args:
        method: the method, already past ``begin_session``.
        context: the session's training set, runtime and seed.
        train: epochs, batch size, learning rates, evaluation settings.
        observer: notified of epochs and steps.
        interim_map: scores the test set (seen mAP) for the optional per-epoch evaluation.
    """
    session, runtime = context.session, context.runtime
    epochs = train.epochs_for(session.index)
    steps = len(runtime.loader(context.train_set, train.batch_size, shuffle=True, seed=0))
    optimization = method.configure_optimization(train, session, epochs * steps)
    scaler = runtime.grad_scaler()
    for epoch in range(epochs):
        epoch_seed = derive_seed(context.seed, session.index, epoch)
        seed_everything(epoch_seed)
        method.network.train()
        observer.epoch_started(session, epoch, epochs, steps)
        loader = runtime.loader(context.train_set, train.batch_size, shuffle=True, seed=epoch_seed)
        totals: dict[str, float] = {}
        for step, (images, targets) in enumerate(loader):
            batch = Batch(images, targets).to(runtime.device)
            try:
                parts = train_step(method, batch, optimization, scaler, context)
            except NonFiniteLossError as error:
                where = f"session {session.index} epoch {epoch + 1} step {step}"
                raise NonFiniteLossError(f"{where}: {error}") from None
            for name, value in parts.items():
                totals[name] = totals.get(name, 0.0) + value
            observer.step_finished(session, epoch, step, parts, steps)
        observer.epoch_finished(
            session, epoch, epochs, {k: v / max(steps, 1) for k, v in totals.items()}
        )
        if interim_map is not None and train.eval_every_epoch and epoch < epochs - 1:
            # Logged for curiosity only: the reported model is always the last epoch's.
            observer.interim_evaluated(session, epoch, interim_map())


def train_step(
    method: Method,
    batch: Batch,
    optimization: Optimization,
    scaler: torch.amp.GradScaler,
    context: SessionContext,
) -> dict[str, float]:
    """One optimiser step; returns the loss and its parts as floats.

    Raises:
        NonFiniteLossError: before a NaN or infinite loss reaches the weights.
    """
    with context.autocast():
        output = method.training_step(batch)
    if not torch.isfinite(output.loss):
        raise NonFiniteLossError(_non_finite_message(method, output.loss, output.parts))
    optimizer = optimization.optimizer
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(output.loss).backward()
    if optimization.grad_clip_norm is not None:
        scaler.unscale_(optimizer)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, optimization.grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()
    optimization.scheduler.step()
    return {"loss": float(output.loss.detach()), **{k: float(v) for k, v in output.parts.items()}}


def _non_finite_message(method: Method, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> str:
    broken = [name for name, p in method.network.named_parameters() if not p.isfinite().all()]
    detail = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
    if broken:
        # Weights that are already NaN (a corrupt weights file, an earlier blow-up) are not a
        # learning-rate problem: say where they are instead.
        return (
            f"the loss is {float(loss.detach())} because {len(broken)} weight tensors are not "
            f"finite (e.g. {broken[0]!r}): check model.pretrained and the checkpoint"
        )
    return (
        f"the loss is {float(loss.detach())} (parts: {detail}); lower train.lr or "
        "train.incremental_lr"
    )

"""Fitting one session: the epochs of optimiser steps a method's loss drives.

Every epoch re-seeds python, numpy and torch from ``(run seed, session, epoch)`` and shuffles with
a sampler seeded the same way, so each epoch is reproducible on its own: a resume at an epoch
boundary needs no random-state snapshot; one inside an epoch (SIGTERM) restores the saved states.

One optimiser step reads ``train.batch_size`` images in all: ``world_size`` processes each run
``train.grad_accumulation`` micro-batches. Methods return per-image means; each micro-batch's loss
is multiplied by :func:`mlcil.distributed.loss_scale` so that gradient accumulation and DDP's
averaging give exactly the gradient of the mean over the global batch, whatever the layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, cast

import torch
from torch.utils.data import DataLoader

from mlcil.config.schema import TrainConfig
from mlcil.distributed import ShardSampler, all_reduce_mean, loss_scale, shard_size
from mlcil.engine.callbacks import CallbackList, StepRecord
from mlcil.engine.observers import LearningRateLog, learning_rates
from mlcil.errors import ConfigError, TrainingError
from mlcil.methods.base import (
    MAIN_PHASE,
    Batch,
    EpochInfo,
    ExtraPhase,
    Method,
    Optimization,
    SessionContext,
    StepInfo,
)
from mlcil.protocol import Session
from mlcil.runtime import Runtime, derive_seed, rng_state, set_rng_state, swapped_attribute


class NonFiniteLossError(TrainingError):
    """A step produced a NaN or infinite loss; the weights were not updated with it."""


class TrainingStoppedError(TrainingError):
    """SIGTERM arrived; the step in flight finished and a checkpoint was written."""


@dataclasses.dataclass
class FitPosition:
    """Where a session's training stands: the next optimiser step to run."""

    epoch: int = 0
    step: int = 0  # optimiser steps already done in ``epoch``


@dataclasses.dataclass
class FitProgress:
    """What a mid-session checkpoint captures, besides the run state."""

    position: FitPosition
    optimization: Optimization
    scaler: torch.amp.GradScaler
    rng: list[dict[str, Any]] | None = None  # every rank's random states (mid-epoch only)
    layout: list[int] | None = None  # [processes, accumulation, global batch]


@dataclasses.dataclass
class FitResume:
    """The training state a mid-session checkpoint gives back to :func:`fit_session`."""

    position: FitPosition
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng: list[dict[str, Any]] | None = None
    layout: list[int] | None = None


@dataclasses.dataclass(frozen=True)
class FitSchedule:
    """Which fit of a session :func:`fit_session` runs: the main one (the default), or the
    method's extra phase, whose epochs are numbered on after the main fit's.

    Attributes:
        phase: the extra phase; None: the main fit (``training_step``, ``train`` epochs).
        first_epoch: the number of the fit's first epoch.
        ends_session: False when another fit follows: its last epoch may be checkpointed too.
    """

    phase: ExtraPhase | None = None
    first_epoch: int = 0
    ends_session: bool = True

    def epochs(self, train: TrainConfig, session_index: int) -> int:
        return train.epochs_for(session_index) if self.phase is None else self.phase.epochs

    def configure(
        self, method: Method, train: TrainConfig, session: Session, total_steps: int
    ) -> Optimization:
        if self.phase is None:
            return method.configure_optimization(train, session, total_steps)
        return method.configure_phase_optimization(self.phase, train, session, total_steps)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How one global batch splits into processes and accumulation micro-batches."""

    global_batch: int
    world_size: int
    accumulation: int

    @classmethod
    def of(cls, train: TrainConfig, world_size: int) -> BatchLayout:
        layout = cls(train.batch_size, world_size, train.grad_accumulation)
        if train.batch_size % (world_size * train.grad_accumulation):
            raise ConfigError(
                f"train.batch_size={train.batch_size} (the global batch) must be a multiple of "
                f"{world_size} processes x train.grad_accumulation={train.grad_accumulation}"
            )
        return layout

    def as_list(self) -> list[int]:
        """``[processes, accumulation, global batch]``, as checkpoints record it."""
        return [self.world_size, self.accumulation, self.global_batch]

    @property
    def micro_batch(self) -> int:
        """Images per forward pass on one process."""
        return self.global_batch // (self.world_size * self.accumulation)

    def steps(self, num_images: int) -> int:
        """Optimiser steps per epoch over ``num_images`` (the last step may be partial)."""
        micro_batches = -(-shard_size(num_images, self.world_size) // self.micro_batch)
        return -(-micro_batches // self.accumulation)


def optimizer_steps(loader: Any, accumulation: int) -> Iterator[list[Any]]:
    """Group a loader's micro-batches into optimiser steps of ``accumulation`` each."""
    group: list[Any] = []
    for item in loader:
        group.append(item)
        if len(group) == accumulation:
            yield group
            group = []
    if group:
        yield group


@contextlib.contextmanager
def training_network(method: Method, runtime: Runtime) -> Iterator[None]:
    """``method.network`` is the network as prepared for training (channels-last, the
    data-parallel wrapper, ``torch.compile``) while this lasts, and the plain network again
    afterwards; the method does not know. The teacher stays as it is."""
    wrapped = runtime.prepare_for_training(method.network)
    with swapped_attribute(method, "network", wrapped):
        yield


class _StopSignal:
    """Records SIGTERM (the cluster's notice before pre-emption) instead of dying at once."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        self.received = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def fit_session(
    method: Method,
    context: SessionContext,
    train: TrainConfig,
    callbacks: CallbackList,
    interim_map: Callable[[], float] | None = None,
    resume: FitResume | None = None,
    checkpoint: Callable[[FitProgress], None] | None = None,
    schedule: FitSchedule = FitSchedule(),
) -> None:
    """Train ``method`` on the session of ``context`` for the configured epochs (or those of its
    extra phase: ``schedule``).

    Args:
        method: the method, already past ``begin_session``.
        context: the session's training set, runtime and seed.
        train: epochs, batch layout, learning rates, evaluation and checkpoint settings.
        callbacks: the run's callbacks, told of epochs and steps.
        interim_map: scores the test set (seen mAP) for the optional per-epoch evaluation.
        resume: continue from a mid-session checkpoint instead of the session's start.
        checkpoint: writes a mid-session checkpoint (every ``train.checkpoint_every_epochs``
            epochs, and on SIGTERM); called on every rank.
        schedule: the main fit, or the method's extra phase after it.

    Raises:
        TrainingStoppedError: after SIGTERM, once the checkpoint is written.
    """
    session, runtime = context.session, context.runtime
    layout = BatchLayout.of(train, runtime.world_size)
    count = schedule.epochs(train, session.index)
    steps = layout.steps(len(context.train_set))
    optimization = schedule.configure(method, train, session, count * steps)
    scaler = runtime.grad_scaler()
    epochs = schedule.first_epoch + count  # epochs are numbered on over the session's fits
    position = FitPosition(schedule.first_epoch)
    if resume is not None:
        check_resume_layout(resume, layout)
        optimization.optimizer.load_state_dict(resume.optimizer)
        optimization.scheduler.load_state_dict(resume.scheduler)
        scaler.load_state_dict(resume.scaler)
        position = resume.position
    # The run steps a stand-in for the scheduler that notes each step's learning rates for the
    # callbacks; checkpoints keep saving the scheduler itself.
    rates = LearningRateLog(optimization.scheduler)
    noting = dataclasses.replace(optimization, scheduler=cast(Any, rates))
    run = _SessionRun(
        method, context, layout, noting, scaler, callbacks, steps, learning_rates=rates
    )
    run.phase = schedule.phase
    with training_network(method, runtime), _StopSignal() as stop:
        for epoch in range(position.epoch, epochs):
            first = position.step if epoch == position.epoch else 0
            rng = resume.rng if resume is not None and first > 0 else None
            done, stopped = run.epoch(epoch, epochs, first, rng, stop)
            if stopped:  # SIGTERM: save where we are and stop
                mid_epoch = done < steps
                position = FitPosition(epoch, done) if mid_epoch else FitPosition(epoch + 1, 0)
                progress = FitProgress(position, optimization, scaler, None, layout.as_list())
                if mid_epoch:
                    progress.rng = runtime.gather_objects(rng_state())
                if checkpoint is not None:
                    checkpoint(progress)
                saved = "checkpoint written" if checkpoint is not None else "nothing saved"
                raise TrainingStoppedError(
                    f"on SIGTERM in session {session.index}, epoch {epoch + 1}, after step {done} "
                    f"({saved})"
                )
            if interim_map is not None and train.eval_every_epoch and epoch < epochs - 1:
                # Logged for curiosity only: the reported model is always the last epoch's.
                callbacks.on_interim_evaluation(session, epoch, interim_map())
            every = train.checkpoint_every_epochs
            last = epoch + 1 == epochs and schedule.ends_session
            due = every is not None and (epoch + 1) % every == 0 and not last
            if checkpoint is not None and due:  # the session's last epoch ends in a checkpoint
                position = FitPosition(epoch + 1, 0)
                checkpoint(FitProgress(position, optimization, scaler, None, layout.as_list()))


def check_resume_layout(resume: FitResume, layout: BatchLayout) -> None:
    """A checkpoint taken inside an epoch resumes only on the layout that wrote it (the sampler
    position and the random states are per process); epoch boundaries resume on any layout."""
    if resume.position.step == 0 or resume.layout is None:
        return
    if layout.as_list() != list(resume.layout):
        processes, accumulation, batch = resume.layout
        raise ConfigError(
            f"this checkpoint was written inside an epoch by {processes} process(es) with "
            f"train.grad_accumulation={accumulation} and train.batch_size={batch}: resume it "
            "with the same layout"
        )


@dataclasses.dataclass
class _SessionRun:
    method: Method
    context: SessionContext
    layout: BatchLayout
    optimization: Optimization
    scaler: torch.amp.GradScaler
    callbacks: CallbackList
    steps: int
    session_loader: DataLoader | None = None
    learning_rates: LearningRateLog | None = None  # each step's rates, for the callbacks
    phase: ExtraPhase | None = None  # the method's extra phase; None: the main fit

    @property
    def phase_name(self) -> str:
        return MAIN_PHASE if self.phase is None else self.phase.name

    def _loader(self, epoch_seed: int, start_index: int) -> DataLoader:
        """The epoch's loader: a new one (the order and worker seeds follow ``epoch_seed``), or
        on CUDA with workers the session's persistent loader, re-seeded for the epoch."""
        context, runtime, batch = self.context, self.context.runtime, self.layout.micro_batch
        if not runtime.persistent_loaders:
            return runtime.loader(context.training_data(), batch, True, epoch_seed, start_index)
        if self.session_loader is None:
            self.session_loader = runtime.session_loader(context.training_data(), batch)
        sampler = self.session_loader.sampler
        assert isinstance(sampler, ShardSampler)
        sampler.set_seed(epoch_seed, start_index)
        return self.session_loader

    def _report(
        self, pending: list[tuple[int, StepValues]], totals: dict[str, float], epoch: int
    ) -> None:
        """Read the pending steps' values (one device read), add them to the epoch's totals and
        tell the callbacks, in step order, with the learning rates each step used."""
        if not pending:
            return
        context = self.context
        try:
            read = _read_steps(pending, context.runtime)
        except NonFiniteLossError as error:
            where = f"session {context.session.index} epoch {epoch + 1}"
            raise NonFiniteLossError(f"{where}: {error}") from None
        noted = self.learning_rates
        rates = noted.take(len(pending)) if noted is not None else []
        # Without the log (a run built by hand) the steps get the optimiser's current rates.
        rates += [learning_rates(self.optimization.optimizer)] * (len(pending) - len(rates))
        session = context.session
        for (step, _), parts, used in zip(pending, read, rates, strict=True):
            for name, value in parts.items():
                totals[name] = totals.get(name, 0.0) + value
            record = StepRecord(session, epoch, step, self.steps, parts, used)
            self.callbacks.on_train_batch_end(record)
        pending.clear()

    def _hook(self, name: str, info: StepInfo | EpochInfo) -> None:
        # Tests drive a fit with stand-ins that only train (no Method base, so no hooks).
        hook = getattr(self.method, name, None)
        if hook is not None:
            hook(info)

    def _train(self, batches: list[Batch]) -> StepValues:
        """One optimiser step of the main fit or of the extra phase."""
        optimization, scaler, global_batch = (
            self.optimization,
            self.scaler,
            self.layout.global_batch,
        )
        return train_step(
            self.method, batches, optimization, scaler, self.context, global_batch, self.phase
        )

    def epoch(
        self,
        epoch: int,
        epochs: int,
        first_step: int,
        rng: list[dict[str, Any]] | None,
        stop: _StopSignal,
    ) -> tuple[int, bool]:
        """Run the epoch's steps from ``first_step``; returns the steps done and whether SIGTERM
        (on any rank) stopped the epoch after them."""
        context, runtime, session = self.context, self.context.runtime, self.context.session
        started = time.perf_counter()
        epoch_seed = derive_seed(context.seed, session.index, epoch)
        runtime.seed_process(epoch_seed)
        # A phase that trains only its own parameters keeps batch-norm statistics frozen.
        self.method.network.train(self.phase is None or self.phase.trains_network)
        self.callbacks.on_epoch_start(session, epoch, epochs, self.steps)
        layout = self.layout
        start_index = first_step * layout.accumulation * layout.micro_batch
        loader = self._loader(epoch_seed, start_index)
        if rng is not None:
            set_rng_state(rng[runtime.rank] if len(rng) == runtime.world_size else rng[0])
        totals: dict[str, float] = {}
        pending: list[tuple[int, StepValues]] = []
        stopped = False
        steps = enumerate(optimizer_steps(loader, layout.accumulation), first_step)
        for step, micro_batches in steps:
            try:
                values = self._train([Batch.from_items(items) for items in micro_batches])
            except NonFiniteLossError as error:
                where = f"session {session.index} epoch {epoch + 1} step {step}"
                raise NonFiniteLossError(f"{where}: {error}") from None
            pending.append((step, values))
            self._hook("after_step", StepInfo(session, self.phase_name, epoch, step, self.steps))
            if len(pending) < runtime.log_every_steps:
                continue  # CUDA: nothing is read from the device between reports
            self._report(pending, totals, epoch)
            stopped = runtime.any_rank(stop.received)  # every rank stops at the same step
            if stopped and step + 1 < self.steps:
                return step + 1, True
        if pending:  # steps not reported yet (CUDA): read them, and look for SIGTERM once more
            self._report(pending, totals, epoch)
            stopped = runtime.any_rank(stop.received)
        done = max(self.steps - first_step, 1)
        means = {k: v / done for k, v in totals.items()}
        runtime.synchronize()
        images = min(done * layout.global_batch, len(context.train_set))
        self.callbacks.on_phase_end(session, "epoch", time.perf_counter() - started, images)
        self.callbacks.on_epoch_end(session, epoch, epochs, means)
        self._hook("after_epoch", EpochInfo(session, self.phase_name, epoch, epochs, means))
        return self.steps, stopped


@dataclasses.dataclass
class StepValues:
    """What one optimiser step reports: the loss and its parts, image-weighted over the step's
    micro-batches, as floats, or (``runtime.deferred_reads``) as device scalars read later with
    ``nonfinite``, the device flag of a NaN or infinite loss."""

    parts: dict[str, Any]
    nonfinite: torch.Tensor | None = None


def _read_steps(pending: list[tuple[int, StepValues]], runtime: Runtime) -> list[dict[str, float]]:
    """The steps' values as floats, read from the device at once; raises when a loss among
    them was not finite (on any rank)."""
    flags = [values.nonfinite for _, values in pending if values.nonfinite is not None]
    if flags and runtime.any_rank(bool(torch.stack(flags).any())):
        first, last = pending[0][0], pending[-1][0]
        raise NonFiniteLossError(
            f"a loss among steps {first}-{last} was NaN or infinite (read every "
            "train.log_every_steps steps on CUDA; no checkpoint holds the weights it updated); "
            "lower train.lr or train.incremental_lr"
        )
    names = list(pending[0][1].parts)
    if not any(isinstance(values.parts[names[0]], torch.Tensor) for _, values in pending):
        return [values.parts for _, values in pending]
    rows = torch.stack([torch.stack([v.parts[n] for n in names]) for _, v in pending]).tolist()
    return [dict(zip(names, row, strict=True)) for row in rows]


def train_step(
    method: Method,
    micro_batches: list[Batch],
    optimization: Optimization,
    scaler: torch.amp.GradScaler,
    context: SessionContext,
    global_batch: int | None = None,
    phase: ExtraPhase | None = None,
) -> StepValues:
    """One optimiser step over this process's micro-batches; returns the loss and its parts
    (image-weighted means over the micro-batches).

    On the CPU every value is read at once and a NaN or infinite loss raises before it reaches
    the weights. With ``runtime.deferred_reads`` (CUDA) nothing waits for the device: the values
    stay device scalars and the finite-loss flag is read every ``train.log_every_steps`` steps
    (:class:`_SessionRun`), before any checkpoint can hold weights updated with such a loss.

    ``global_batch`` is the configured ``train.batch_size``; None: the images the step holds.
    ``phase``: a step of the method's extra phase (``phase_step``) instead of the main fit.
    The objective of a step is ``(1 / global_batch) x`` the sum of its images' losses, so a
    partial last step (fewer images) is a proportionally smaller step: on it the ASL term keeps
    the release's sum semantics (``R x ASL_sum / global batch``; with ``R`` = the batch, exactly
    mlcil's former ``ASL_sum``) while the other terms shrink with the step.

    Each micro-batch's per-image-mean loss is scaled by ``its images x world_size / global
    batch`` (:func:`mlcil.distributed.loss_scale` per image); gradients add up over micro-batches
    (synchronised across processes only on the last one) and DDP averages them over processes.

    Raises:
        NonFiniteLossError: before a NaN or infinite loss reaches the weights.
    """
    runtime = context.runtime
    local_images = sum(len(batch.images) for batch in micro_batches)
    if global_batch is None:
        global_batch = local_images * runtime.world_size  # every rank reads as many (padding)
    optimizer = optimization.optimizer
    optimizer.zero_grad(set_to_none=True)
    logged: dict[str, Any] = {}
    deferred = runtime.deferred_reads
    nonfinite = torch.zeros((), dtype=torch.bool, device=runtime.device) if deferred else None
    for index, batch in enumerate(micro_batches):
        batch = dataclasses.replace(batch, images=runtime.images_to_device(batch.images)).to(
            runtime.device
        )
        last = index == len(micro_batches) - 1
        with contextlib.ExitStack() as stack:
            if not last:
                stack.enter_context(runtime.no_sync(method.network))
            with context.autocast():
                output = (
                    method.training_step(batch)
                    if phase is None
                    else method.phase_step(phase, batch)
                )
            if nonfinite is not None:
                nonfinite |= ~torch.isfinite(output.loss.detach())
            elif runtime.any_rank(not bool(torch.isfinite(output.loss))):
                raise NonFiniteLossError(_non_finite_message(method, output.loss, output.parts))
            # The method's loss is a per-image mean: times the micro-batch's images, it is the
            # sum that loss_scale weighs.
            images = len(batch.images)
            scale = images * loss_scale(images, global_batch, runtime.world_size)
            scaler.scale(output.loss * scale).backward()
        weight = len(batch.images) / local_images
        values = {"loss": output.loss, **output.parts}
        for name, value in values.items():
            term = value.detach().float() if deferred else float(value.detach())
            logged[name] = logged.get(name, 0.0) + weight * term
    if phase is not None and not phase.trains_network and runtime.world_size > 1:
        average_gradients(optimizer)  # DDP averages the network's; these are the phase's own
    # Unscaled once (a no-op but under fp16): the hook and the clipping see true gradients.
    scaler.unscale_(optimizer)
    hook = getattr(method, "before_optimizer_step", None)  # stand-ins in tests have none
    if hook is not None:
        hook(optimizer, micro_batches)
    if optimization.grad_clip_norm is not None:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, optimization.grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()
    optimization.scheduler.step()
    return StepValues(logged, nonfinite)


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Replace every gradient of ``optimizer``'s parameters by its mean over processes."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.grad is not None:
                parameter.grad.copy_(all_reduce_mean(parameter.grad))


def _non_finite_message(method: Method, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> str:
    network = cast(torch.nn.Module, method.network)
    broken = [name for name, p in network.named_parameters() if not p.isfinite().all()]
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

"""Callbacks: the one way anything outside the training loop takes part in a run.

Logs, progress bars, the experiment trackers, phase timers and the features built above the
engine (diagnostics, ``--overwrite``, pretrained-weights provenance) are all :class:`Callback`
objects. Every hook has a no-op default and receives a :class:`RunView` first: the run as it
stands, read-only (its settings, data view, runtime, folder and state). A callback overrides the
hooks it needs; they are called in the order the callbacks were given, on every process (one
that writes files checks ``run.runtime.is_main``). The loop never depends on what they do,
except where a hook says it may add to what it is given (``on_session_evaluated``'s result,
``on_metrics_header``'s header).

The two older vocabularies, :class:`Observer` (also importable from
:mod:`mlcil.engine.observers`) and :class:`SessionCallback`, still work: :func:`as_callback`
adapts them (``observers=`` of ``mlcil.train`` and the runners takes either kind).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlcil.protocol import Session

if TYPE_CHECKING:
    from mlcil.config.schema import RunConfig
    from mlcil.engine.checkpoint import RunState
    from mlcil.engine.inputs import RunData
    from mlcil.rundir import RunDir
    from mlcil.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One optimiser step as :meth:`Callback.on_train_batch_end` reports it.

    Attributes:
        session: the session being learned.
        epoch: the epoch (0-based).
        step: the step in the epoch (0-based).
        steps: steps per epoch.
        parts: the loss and its named parts.
        learning_rates: the rate of every optimiser parameter group during this step.
    """

    session: Session
    epoch: int
    step: int
    steps: int
    parts: dict[str, float]
    learning_rates: tuple[float, ...]

    @property
    def session_step(self) -> int:
        """Optimiser steps done in the session once this one is done (1 for the first). It
        follows from the position alone, so a resumed session counts on where it stopped."""
        return self.epoch * self.steps + self.step + 1


@dataclasses.dataclass(frozen=True)
class RunView:
    """A run as its callbacks see it; nothing here may be changed through it.

    Attributes:
        data: the frozen data view (splits, class names, sessions, seed).
        runtime: device, precision, processes.
        config: the run's settings (None outside a run, e.g. a pretraining).
        folder: the run folder (None outside a run).
    """

    data: RunData
    runtime: Runtime
    config: RunConfig | None = None
    folder: RunDir | None = None
    current_state: Callable[[], RunState | None] = lambda: None

    @property
    def state(self) -> RunState | None:
        """What the run has learned so far (method, memory, results); None before it starts."""
        return self.current_state()


class Callback:
    """Hooks into a run (all no-ops by default), in the order the loop reaches them."""

    def on_session_start(self, run: RunView, session: Session, summary: str, resumed: bool) -> None:
        """A session begins, before the method's ``begin_session``; ``summary`` names its
        classes and image counts; ``resumed``: inside it, from a mid-session checkpoint (the
        network already holds the session's growth)."""

    def on_epoch_start(
        self, run: RunView, session: Session, epoch: int, epochs: int, steps: int
    ) -> None:
        """Epoch ``epoch`` (0-based) of ``epochs`` begins, with ``steps`` optimiser steps."""

    def on_train_batch_end(self, run: RunView, record: StepRecord) -> None:
        """One optimiser step is done: its loss parts, learning rates and place."""

    def on_epoch_end(
        self, run: RunView, session: Session, epoch: int, epochs: int, means: dict[str, float]
    ) -> None:
        """An epoch is done; ``means`` are the loss parts averaged over its steps."""

    def on_interim_evaluation(
        self, run: RunView, session: Session, epoch: int, seen_map: float
    ) -> None:
        """The optional per-epoch evaluation (logged only, never used to select a model)."""

    def on_phase_end(
        self, run: RunView, session: Session, phase: str, seconds: float, images: int
    ) -> None:
        """A timed phase of ``session`` is done: ``begin_session`` (growth and the method's
        own passes), ``epoch``, ``evaluation``, ``after_evaluation`` (diagnostics), the memory
        policy's name (``herding``) or ``checkpoint``; ``images``: how many it read (0: none)."""

    def on_session_evaluated(
        self, run: RunView, session: Session, own: np.ndarray, result: dict[str, Any]
    ) -> None:
        """After the session's memory update and evaluation, before the method's end of
        session; ``result`` (the session's ``metrics.json`` entry) may be added to."""

    def on_session_end(self, run: RunView, result: dict[str, Any]) -> None:
        """A session is evaluated and recorded; ``result`` is its ``metrics.json`` entry."""

    def on_checkpoint_saved(self, run: RunView, folder: Path) -> None:
        """After a checkpoint folder is complete and ``latest`` names it (main process)."""

    def on_metrics_header(self, run: RunView, header: dict[str, Any]) -> None:
        """Before ``metrics.json`` is assembled; ``header`` (its first keys) may be added to."""

    def teardown(self, run: RunView) -> None:
        """The run stops (finished, interrupted or failed)."""


class Observer:
    """The older notifications (every one a no-op unless overridden), adapted to a
    :class:`Callback` by :func:`as_callback`; new code subclasses ``Callback``."""

    def session_started(self, session: Session, summary: str) -> None:
        """A session begins; ``summary`` names its classes and image counts."""

    def epoch_started(self, session: Session, epoch: int, epochs: int, steps: int) -> None:
        """Epoch ``epoch`` (0-based) of ``epochs`` begins, with ``steps`` batches."""

    def step_finished(
        self, session: Session, epoch: int, step: int, parts: dict[str, float], steps: int
    ) -> None:
        """One optimiser step is done; ``parts`` are the loss and its named parts."""

    def step_recorded(self, record: StepRecord) -> None:
        """The same step with its learning rates and place in the session (right after
        ``step_finished``); what trackers read."""

    def epoch_finished(
        self, session: Session, epoch: int, epochs: int, means: dict[str, float]
    ) -> None:
        """An epoch is done; ``means`` are the loss parts averaged over its steps."""

    def interim_evaluated(self, session: Session, epoch: int, seen_map: float) -> None:
        """The optional per-epoch evaluation (logged only, never used to select a model)."""

    def session_finished(self, result: dict[str, Any]) -> None:
        """A session is evaluated; ``result`` is its ``metrics.json`` entry."""

    def phase_finished(self, session: Session, phase: str, seconds: float, images: int) -> None:
        """A timed phase of ``session`` is done: ``begin_session`` (growth and the method's
        own passes, e.g. KRT's threshold pass over its teacher), ``epoch``, ``evaluation``,
        ``after_evaluation`` (diagnostics), ``herding`` or ``checkpoint``; ``images`` is how
        many images it read (0 when none)."""

    def close(self) -> None:
        """The run stops (finished, interrupted or failed)."""


class SessionCallback:
    """The older hooks of the features above the engine (all no-ops by default); adapted to a
    :class:`Callback` by :func:`as_callback`. New code subclasses :class:`Callback`."""

    def session_starting(
        self, run: RunDir, state: RunState, session: Session, resumed: bool
    ) -> None:
        """Before the method begins ``session``."""

    def session_evaluated(
        self, state: RunState, session: Session, own: np.ndarray, result: dict[str, Any]
    ) -> None:
        """After the session's memory update and evaluation; ``result`` may be added to."""

    def checkpoint_written(self, folder: Path) -> None:
        """After a checkpoint folder is complete (main process)."""

    def header_ready(self, header: dict[str, Any]) -> None:
        """Before ``metrics.json`` is assembled; ``header`` may be added to."""


class _SessionCallbackAdapter(Callback):
    def __init__(self, callback: SessionCallback) -> None:
        self.callback = callback

    def on_session_start(self, run: RunView, session: Session, summary: str, resumed: bool) -> None:
        assert run.folder is not None and run.state is not None
        self.callback.session_starting(run.folder, run.state, session, resumed)

    def on_session_evaluated(
        self, run: RunView, session: Session, own: np.ndarray, result: dict[str, Any]
    ) -> None:
        assert run.state is not None
        self.callback.session_evaluated(run.state, session, own, result)

    def on_checkpoint_saved(self, run: RunView, folder: Path) -> None:
        self.callback.checkpoint_written(folder)

    def on_metrics_header(self, run: RunView, header: dict[str, Any]) -> None:
        self.callback.header_ready(header)


class _ObserverAdapter(Callback):
    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    def on_session_start(self, run: RunView, session: Session, summary: str, resumed: bool) -> None:
        self.observer.session_started(session, summary)

    def on_epoch_start(
        self, run: RunView, session: Session, epoch: int, epochs: int, steps: int
    ) -> None:
        self.observer.epoch_started(session, epoch, epochs, steps)

    def on_train_batch_end(self, run: RunView, record: StepRecord) -> None:
        session, epoch, step = record.session, record.epoch, record.step
        self.observer.step_finished(session, epoch, step, record.parts, record.steps)
        self.observer.step_recorded(record)

    def on_epoch_end(
        self, run: RunView, session: Session, epoch: int, epochs: int, means: dict[str, float]
    ) -> None:
        self.observer.epoch_finished(session, epoch, epochs, means)

    def on_interim_evaluation(
        self, run: RunView, session: Session, epoch: int, seen_map: float
    ) -> None:
        self.observer.interim_evaluated(session, epoch, seen_map)

    def on_phase_end(
        self, run: RunView, session: Session, phase: str, seconds: float, images: int
    ) -> None:
        self.observer.phase_finished(session, phase, seconds, images)

    def on_session_end(self, run: RunView, result: dict[str, Any]) -> None:
        self.observer.session_finished(result)

    def teardown(self, run: RunView) -> None:
        self.observer.close()


def as_callback(hooks: Callback | SessionCallback | Observer) -> Callback:
    """``hooks`` as a :class:`Callback` (an older observer or session callback adapted)."""
    if isinstance(hooks, Callback):
        return hooks
    if isinstance(hooks, SessionCallback):
        return _SessionCallbackAdapter(hooks)
    if isinstance(hooks, Observer):
        return _ObserverAdapter(hooks)
    raise TypeError(
        f"{type(hooks).__name__} is not a callback: subclass mlcil.engine.callbacks.Callback "
        "(or the older mlcil.engine.observers.Observer or SessionCallback)"
    )


class CallbackList:
    """A run's callbacks, bound to its view: the loop calls these methods, each calls the
    callbacks' hook of the same name, in order, with the view first."""

    def __init__(
        self, run: RunView, callbacks: Sequence[Callback | SessionCallback | Observer] = ()
    ) -> None:
        self.run = run
        self.callbacks = [as_callback(callback) for callback in callbacks]

    def on_session_start(self, session: Session, summary: str, resumed: bool) -> None:
        for callback in self.callbacks:
            callback.on_session_start(self.run, session, summary, resumed)

    def on_epoch_start(self, session: Session, epoch: int, epochs: int, steps: int) -> None:
        for callback in self.callbacks:
            callback.on_epoch_start(self.run, session, epoch, epochs, steps)

    def on_train_batch_end(self, record: StepRecord) -> None:
        for callback in self.callbacks:
            callback.on_train_batch_end(self.run, record)

    def on_epoch_end(
        self, session: Session, epoch: int, epochs: int, means: dict[str, float]
    ) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(self.run, session, epoch, epochs, means)

    def on_interim_evaluation(self, session: Session, epoch: int, seen_map: float) -> None:
        for callback in self.callbacks:
            callback.on_interim_evaluation(self.run, session, epoch, seen_map)

    def on_phase_end(self, session: Session, phase: str, seconds: float, images: int) -> None:
        for callback in self.callbacks:
            callback.on_phase_end(self.run, session, phase, seconds, images)

    def on_session_evaluated(
        self, session: Session, own: np.ndarray, result: dict[str, Any]
    ) -> None:
        for callback in self.callbacks:
            callback.on_session_evaluated(self.run, session, own, result)

    def on_session_end(self, result: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_session_end(self.run, result)

    def on_checkpoint_saved(self, folder: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint_saved(self.run, folder)

    def on_metrics_header(self, header: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_metrics_header(self.run, header)

    def teardown(self) -> None:
        for callback in self.callbacks:
            callback.teardown(self.run)

"""A session's parts around the session loop: the context a method trains in, the fits it runs
(the main one, then the method's extra phase, on rows held out of it or not), and what follows them
(the memory update and the method's preparation of its prediction rule, before evaluation).

Nothing here names a method: every step is a hook of :class:`mlcil.methods.base.Method` with a
default that does nothing, so a method without an extra phase, exemplar data or a prediction rule
of its own runs exactly as before these hooks existed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np

from mlcil.config.schema import TrainConfig
from mlcil.engine.callbacks import CallbackList
from mlcil.engine.evaluate import exemplar_set, update_memory
from mlcil.engine.fit import FitPosition, FitResume, FitSchedule
from mlcil.engine.inputs import RunData, RunInputs
from mlcil.engine.observers import timed
from mlcil.errors import ConfigError
from mlcil.memory import ExemplarMemory
from mlcil.methods.base import ExtraPhase, Method, SessionContext
from mlcil.protocol import Session
from mlcil.runtime import Runtime

logger = logging.getLogger(__name__)


def session_context(
    data: RunData, runtime: Runtime, method: Method, session: Session, memory: ExemplarMemory
) -> tuple[SessionContext, int]:
    """The context of ``session``: its own images, then the exemplars with the labels replay
    gives them (and, for a method that stores exemplar data, their rows); and how many of its
    training images are the session's own."""
    train_set, own_images = data.train_set(session, memory)
    context = data.context(session, train_set, runtime)
    rows = None
    if method.stores_exemplar_data:
        exemplars = memory.data_matrix(train_set.indices[own_images:])
        if exemplars is not None:
            rows = np.full((len(train_set), exemplars.shape[1]), np.nan, dtype=np.float32)
            rows[own_images:] = exemplars
    return dataclasses.replace(context, own_images=own_images, exemplar_data=rows), own_images


@dataclasses.dataclass
class SessionFit:
    """One call of :func:`mlcil.engine.fit.fit_session`: its rows, schedule and resume point."""

    context: SessionContext
    schedule: FitSchedule
    resume: FitResume | None

    def interim(self, interim_map: Callable[[], float] | None) -> Callable[[], float] | None:
        """The per-epoch evaluation, for the main fit only."""
        return interim_map if self.schedule.phase is None else None


def session_fits(
    method: Method, context: SessionContext, train: TrainConfig, resume: FitResume | None
) -> list[SessionFit]:
    """The fits a session still runs: the main one on every row, or, when the method has an
    extra phase, the main one on every row it does not hold out, then the phase on its rows.

    A resume point inside the phase skips the main fit; one at the phase's very start (the main
    fit's last checkpoint) starts the phase afresh, since it holds the main fit's optimiser."""
    phase = method.extra_phase(context)
    if phase is None:
        return [SessionFit(context, FitSchedule(), resume)]
    phase_rows = check_phase_rows(phase, context)
    every_row = np.arange(len(context.train_set))
    main_rows = np.setdiff1d(every_row, phase_rows) if phase.holds_out else every_row
    main_epochs = train.epochs_for(context.session.index)
    in_phase = resume is not None and resume.position.epoch >= main_epochs
    fits = []
    if not in_phase:
        main = FitSchedule(None, 0, ends_session=False)
        main_context = context.restricted(main_rows) if phase.holds_out else context
        fits.append(SessionFit(main_context, main, resume))
    at_start = resume is not None and resume.position == FitPosition(main_epochs, 0)
    phase_resume = resume if in_phase and not at_start else None
    schedule = FitSchedule(phase, main_epochs, ends_session=True)
    fits.append(SessionFit(context.restricted(phase_rows), schedule, phase_resume))
    logger.info(
        "session %d: %d training rows, then %d %s for the %s phase",
        context.session.index,
        len(main_rows),
        len(phase_rows),
        "held out" if phase.holds_out else "of them",
        phase.name,
    )
    return fits


def check_phase_rows(phase: ExtraPhase, context: SessionContext) -> np.ndarray:
    """The phase's rows, sorted; an error unless they are distinct rows of the training set
    that give the phase at least one and, held out, leave the main fit at least one."""
    rows = np.asarray(phase.rows, dtype=np.int64)
    total = len(context.train_set)
    held_out = np.unique(rows)
    most = total - 1 if phase.holds_out else total
    if len(held_out) != len(rows) or not 0 < len(held_out) <= most:
        limit = "and fewer than all (held out)" if phase.holds_out else "and at most all"
        raise ConfigError(
            f"extra phase {phase.name!r}: {len(rows)} rows ({len(held_out)} distinct) of a "
            f"training set of {total}: it needs distinct rows, at least one, {limit}"
        )
    if held_out[0] < 0 or held_out[-1] >= total:
        raise ConfigError(f"extra phase {phase.name!r}: rows outside 0..{total - 1}")
    if phase.epochs <= 0:
        raise ConfigError(
            f"extra phase {phase.name!r}: epochs must be positive, not {phase.epochs}"
        )
    return held_out


def after_fits(
    run: RunInputs,
    method: Method,
    memory: ExemplarMemory,
    session: Session,
    own: np.ndarray,
    hooks: CallbackList,
) -> ExemplarMemory:
    """Once the session is trained and before it is evaluated: the memory update (the policy's
    selection, the method's exemplar data), then ``Method.prepare_prediction``."""
    data, runtime, settings = run.data, run.runtime, run.config.memory
    if memory.enabled:
        phase = settings.policy  # "herding": the phase's name as it always was
        with timed(hooks, session, phase, runtime, len(own)):
            memory = update_memory(data, runtime, settings, method, memory, session, own)
    method.prepare_prediction(exemplar_set(data, runtime, method, memory, session))
    return memory

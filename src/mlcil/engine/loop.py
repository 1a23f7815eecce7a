"""The session loop: runs a whole protocol for any registered method and writes ``runs/<name>/``.

``Trainer`` only orchestrates. Its inputs (data view, runtime, method factory) come from
:class:`mlcil.engine.inputs.RunInputs`, fitting a session from :func:`mlcil.engine.fit.fit_session`,
run state and checkpoints from :mod:`mlcil.engine.checkpoint`, the folder from
:class:`mlcil.rundir.RunDir`; logging, progress bars, the trackers and the features above the
engine (diagnostics, ``--overwrite``, provenance) take part as callbacks. ``resume=True``
rebuilds the state from the newest checkpoint and continues exactly as an uninterrupted run
(every session and epoch re-seeds from its indices).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlcil.config.schema import RunConfig
from mlcil.engine.callbacks import Callback, CallbackList, Observer, RunView, SessionCallback
from mlcil.engine.checkpoint import (
    RunState,
    restore_run,
    save_checkpoint,
    save_progress_checkpoint,
    state_tensor_files,
)
from mlcil.engine.evaluate import evaluate_session, session_result
from mlcil.engine.fit import FitProgress, NonFiniteLossError, TrainingStoppedError, fit_session
from mlcil.engine.inputs import RunInputs
from mlcil.engine.observers import run_callbacks, timed
from mlcil.engine.session import after_fits, session_context, session_fits
from mlcil.protocol import Session
from mlcil.record import RunMetrics, SessionResult
from mlcil.results import run_header, summarize, write_results
from mlcil.rundir import RunDir
from mlcil.runtime import derive_seed, seed_everything

logger = logging.getLogger(__name__)

# The random stream of a session's growth step (new head, new tokens), apart from epochs.
GROWTH_STREAM = "engine/growth"


class Trainer:
    """Runs a protocol, writing ``runs/<name>/``.

    Args:
        run: the run's inputs (``Experiment.inputs``): settings, data view, runtime, method.
        run_dir: output folder (a path or the ``RunDir`` whose lock the caller holds); default
            ``<output_dir>/<run name>``.
        resume: continue from the latest checkpoint in ``run_dir``.
        observers: extra callbacks (or older observers), called after the built-in ones.
        callbacks: callbacks of the features above the engine, called after those.
    """

    def __init__(
        self,
        run: RunInputs,
        run_dir: str | Path | RunDir | None = None,
        resume: bool = False,
        observers: Sequence[Callback | Observer] = (),
        callbacks: Sequence[Callback | SessionCallback] = (),
    ) -> None:
        self.inputs, self.runtime = run, run.runtime
        self.config: RunConfig = run.config
        if isinstance(run_dir, RunDir):
            self.run_folder = run_dir
        elif run_dir:
            self.run_folder = RunDir(run_dir)
        else:
            self.run_folder = RunDir.inside(self.config.output_dir, self.config.run_name)
        self.resume = resume
        self.extra_callbacks = [*observers, *callbacks]
        self.view = RunView(run.data, run.runtime, run.config, self.run_folder, lambda: self.state)
        self.hooks = CallbackList(self.view, self.extra_callbacks)
        self.state: RunState | None = None
        self.stopped: str | None = None  # why run() stopped early (SIGTERM), after a checkpoint
        self._final_scores: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def run_dir(self) -> Path:
        return self.run_folder.path

    @property
    def next_session(self) -> int:
        return self.state.next_session if self.state is not None else 0

    def run(self, max_sessions: int | None = None) -> RunMetrics | None:
        """Learn the remaining sessions (at most ``max_sessions`` of them); ``metrics.json`` is
        written after each one, marked unfinished until the last.

        Returns:
            The run's record once every session is done, else None.
        """
        runtime, sessions = self.runtime, self.inputs.data.sessions
        # Lock the folder unless the caller (mlcil.runs) holds its lock for longer than this run.
        owns_lock = runtime.is_main and not self.run_folder.holds_lock
        if owns_lock:
            self.run_folder.acquire_lock()
        built_in = run_callbacks(self.run_folder, self.config, runtime.is_main)
        self.hooks = hooks = CallbackList(self.view, [*built_in, *self.extra_callbacks])
        try:
            state = self._begin()
            remaining = sessions[state.next_session :]
            for session in remaining[:max_sessions] if max_sessions is not None else remaining:
                try:
                    self._run_session(state, session, hooks)
                except TrainingStoppedError as stop:
                    self.stopped = str(stop)
                    logger.warning("stopped %s; resume with --resume", stop)
                    return None
            if state.next_session < len(sessions):
                return None
            return self._finish(state)
        finally:
            hooks.teardown()
            if owns_lock:
                self.run_folder.release_lock()

    def _begin(self) -> RunState:
        """A fresh run state, or the one restored from the latest checkpoint."""
        run = self.run_folder
        if self.runtime.is_main:
            run.check_own_files()  # no planted link among the names the run writes
        folder = run.latest()
        if self.resume and folder is not None:
            self.state = restore_run(self.inputs, folder)
            logger.info("resumed %s after session %d", self.run_dir, self.next_session - 1)
            return self.state
        run.check_fresh_start(resuming=self.resume)
        self.state = RunState(self.inputs.build_method(), self.inputs.new_memory())
        self.runtime.main_writes(lambda: run.write_config(self.config.to_yaml()))
        return self.state

    def _run_session(self, state: RunState, session: Session, hooks: CallbackList) -> None:
        """Learn one session (its fits), update the memory, evaluate and checkpoint it all."""
        data, runtime, method = self.inputs.data, self.runtime, state.method
        started = time.perf_counter()
        context, own_images = session_context(data, runtime, method, session, state.memory)
        names = ", ".join(data.class_names[c] for c in session.new_classes)
        exemplars = len(context.train_set) - own_images
        resume, state.resume = state.resume, None
        summary = f"classes {names}, {own_images} training images + {exemplars} exemplars"
        hooks.on_session_start(session, summary, resume is not None)
        if resume is None:  # else the network is grown, loaded and the method state restored
            with timed(hooks, session, "begin_session", runtime):
                seed_everything(derive_seed(data.seed, session.index, GROWTH_STREAM))
                method.begin_session(context)
                method.network.to(runtime.device)
                runtime.synchronize_parameters(method.network)  # new head, tokens
        save = functools.partial(self._save_progress, state)
        interim = self._interim_map(session)
        train = self.config.train
        try:
            for part in session_fits(method, context, train, resume):
                fit = (part.interim(interim), part.resume, save, part.schedule)
                fit_session(method, part.context, train, hooks, *fit)
        except NonFiniteLossError as error:
            # The previous session's checkpoint stays the latest, so the run can resume.
            raise NonFiniteLossError(
                f"{error}; {self.run_folder.describe_kept()}, but a resumed run keeps its "
                "settings: a lower learning rate is a new run (--overwrite or another --run-dir)"
            ) from None
        train_time = time.perf_counter() - started
        own = context.train_set.indices[:own_images]
        state.memory = after_fits(self.inputs, method, state.memory, session, own, hooks)
        with timed(hooks, session, "evaluation", runtime) as phase:
            scores, targets = evaluate_session(data, runtime, method, session)
            phase.images = len(scores)
        result = self._result(scores, targets, session)
        result.train_images, result.memory_images = own_images, exemplars
        result.train_time_s, result.method_state = round(train_time, 3), method.state_dict()
        entry = result.plain()  # callbacks add to it, then read it; so does the checkpoint
        with timed(hooks, session, "after_evaluation", runtime):
            hooks.on_session_evaluated(session, own, entry)
        method.end_session(context)
        state.results.append(entry)
        state.next_session = session.index + 1
        state.elapsed_s += time.perf_counter() - started
        self._final_scores = (scores, targets)
        hooks.on_session_end(entry)
        with timed(hooks, session, "checkpoint", runtime):
            self._save(state, session)

    def _result(self, scores: np.ndarray, targets: np.ndarray, session: Session) -> SessionResult:
        base, names = self.inputs.data.sessions[0], self.inputs.data.class_names
        return session_result(scores, targets, session, base, names)

    def _interim_map(self, session: Session) -> Any:
        assert self.state is not None
        method = self.state.method

        def seen_map() -> float:
            scores, targets = evaluate_session(self.inputs.data, self.runtime, method, session)
            return float(self._result(scores, targets, session).seen_map)

        return seen_map

    def _save(self, state: RunState, session: Session) -> None:
        def write() -> None:
            network, memory = state.method.network, state.memory.to_dict()
            payload, tensors = self._payload(state), state_tensor_files(state)
            run, index = self.run_folder, session.index
            folder = save_checkpoint(run, index, network, payload, memory, tensors)
            self.hooks.on_checkpoint_saved(folder)
            if state.next_session < len(self.inputs.data.sessions):  # else _finish writes it
                write_results(self.run_dir, self._summary(state))  # marked unfinished

        self.runtime.main_writes(write)

    def _payload(self, state: RunState) -> dict[str, Any]:
        config = self.config
        return state.to_json(config.run_name, config.method.name, len(self.inputs.data.sessions))

    def _save_progress(self, state: RunState, progress: FitProgress) -> None:
        def write() -> None:
            payload = self._payload(state)
            folder = save_progress_checkpoint(self.run_folder, state, payload, progress)
            self.hooks.on_checkpoint_saved(folder)

        self.runtime.main_writes(write)

    def _finish(self, state: RunState) -> RunMetrics:
        if self._final_scores is None:  # resumed after the last session: score again
            last = self.inputs.data.sessions[-1]
            self._final_scores = evaluate_session(
                self.inputs.data, self.runtime, state.method, last
            )
        metrics = self._summary(state)
        self.runtime.main_writes(lambda: write_results(self.run_dir, metrics))
        return metrics

    def _summary(self, state: RunState) -> RunMetrics:  # F1 on the last session's scores
        assert self._final_scores is not None
        scores, targets = self._final_scores
        header = run_header(self.config, self.runtime.device)
        self.hooks.on_metrics_header(header)
        f1, planned = self.config.train.f1_threshold, len(self.inputs.data.sessions)
        return summarize(state.results, scores, targets, f1, header, state.elapsed_s, planned)

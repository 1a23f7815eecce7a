"""The session loop: runs a whole protocol for any registered method and writes ``runs/<name>/``.

``Trainer`` only orchestrates. The experiment (data, sessions, transforms, runtime) comes from
:class:`mlcil.experiment.Experiment`, fitting a session from :func:`mlcil.engine.fit.fit_session`,
run state and checkpoints from :mod:`mlcil.engine.checkpoint`, logging, progress bars and
TensorBoard from observers. ``resume=True`` rebuilds the state from the newest checkpoint and
continues exactly as an uninterrupted run (every session and epoch re-seeds from its indices).
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlcil.config.schema import RunConfig
from mlcil.diagnostics import SessionDiagnostics
from mlcil.engine.checkpoint import (
    RunState,
    latest_checkpoint,
    restore_run,
    save_checkpoint,
    save_progress_checkpoint,
)
from mlcil.engine.evaluate import evaluate_session, session_result, update_memory
from mlcil.engine.fit import FitProgress, NonFiniteLossError, TrainingStoppedError, fit_session
from mlcil.engine.observers import (
    LogObserver,
    Observer,
    Observers,
    ProgressObserver,
    TensorBoardObserver,
)
from mlcil.errors import ConfigError
from mlcil.experiment import Experiment
from mlcil.fileio import write_text_atomic
from mlcil.methods.base import Method
from mlcil.pretrain import cached_provenance, resolve_pretrained
from mlcil.protocol import Session
from mlcil.results import run_header, summarize, write_results
from mlcil.runtime import derive_seed, seed_everything

logger = logging.getLogger(__name__)

# Offset that keeps the seed of a session's growth step (new head, new tokens) apart from epochs.
_GROWTH_PHASE = 1_000_001
RESULT_FILES = ("config.yaml", "metrics.json", "metrics.csv", "map_per_session.png", "train.log")


class Trainer:
    """Runs a protocol, writing ``runs/<name>/``.

    Args:
        config: the resolved run configuration, or an ``Experiment`` built from one.
        run_dir: output folder; default ``<output_dir>/<run name>``.
        resume: continue from the latest checkpoint in ``run_dir``.
        observers: extra observers, notified after the built-in ones.
    """

    def __init__(
        self,
        config: RunConfig | Experiment,
        run_dir: str | Path | None = None,
        resume: bool = False,
        observers: Sequence[Observer] = (),
    ) -> None:
        self.experiment = config if isinstance(config, Experiment) else Experiment(config)
        self.config = self.experiment.config
        self.run_dir = (
            Path(run_dir) if run_dir else Path(self.config.output_dir) / self.config.run_name
        )
        self.resume = resume
        self.extra_observers = list(observers)
        self.state: RunState | None = None
        self.stopped: str | None = None  # why run() stopped early (SIGTERM), after a checkpoint
        self._final_scores: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def next_session(self) -> int:
        return self.state.next_session if self.state is not None else 0

    def clear_run_dir(self) -> None:
        """Delete the result files and checkpoints of an earlier run in ``run_dir``."""
        for name in ("checkpoints", "tensorboard") if self.experiment.runtime.is_main else ():
            shutil.rmtree(self.run_dir / name, ignore_errors=True)
        for name in RESULT_FILES if self.experiment.runtime.is_main else ():
            (self.run_dir / name).unlink(missing_ok=True)
        self.experiment.runtime.barrier()

    def run(self, max_sessions: int | None = None) -> dict[str, Any] | None:
        """Learn the remaining sessions (at most ``max_sessions`` of them).

        Returns:
            The ``metrics.json`` content once every session is done, else None.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        observer = self._observers()
        try:
            state = self._begin()
            remaining = self.experiment.sessions[state.next_session :]
            for session in remaining[:max_sessions] if max_sessions is not None else remaining:
                try:
                    self._run_session(state, session, observer)
                except TrainingStoppedError as stop:
                    self.stopped = str(stop)
                    logger.warning("stopped %s; resume with --resume", stop)
                    return None
            if state.next_session < len(self.experiment.sessions):
                return None
            return self._finish(state)
        finally:
            observer.close()

    def _observers(self) -> Observers:
        train, is_main = self.config.train, self.experiment.runtime.is_main
        observers: list[Observer] = [LogObserver(self.run_dir / "train.log")] if is_main else []
        if train.progress and is_main:
            observers.append(ProgressObserver())
        if train.tensorboard and is_main:
            observers.append(TensorBoardObserver(self.run_dir / "tensorboard"))
        return Observers([*observers, *self.extra_observers])

    def build_fresh_method(self) -> Method:
        """The method with its starting weights (``pretrain:`` names resolved, made on first
        use)."""
        model, _ = resolve_pretrained(self.config.model, self.config.data.image_size)
        return self.experiment.build_method(model=model)

    def _begin(self) -> RunState:
        """A fresh run state, or the one restored from the latest checkpoint."""
        folder = latest_checkpoint(self.run_dir)
        if self.resume:
            if folder is None:
                raise ConfigError(
                    f"--resume: no checkpoint found in {self.run_dir / 'checkpoints'}"
                )
            self.state = restore_run(self.experiment, folder)
            logger.info("resumed %s after session %d", self.run_dir, self.next_session - 1)
            return self.state
        if folder is not None:
            raise ConfigError(
                f"{self.run_dir} already holds a run: resume it with --resume, or choose another "
                "name/output_dir"
            )
        self.state = RunState(self.build_fresh_method(), self.experiment.new_memory())
        if self.experiment.runtime.is_main:
            write_text_atomic(self.run_dir / "config.yaml", self.config.to_yaml())
        return self.state

    def _run_session(self, state: RunState, session: Session, observer: Observer) -> None:
        """Learn one session, evaluate it, update the memory and checkpoint everything."""
        experiment, method = self.experiment, state.method
        started = time.perf_counter()
        train_set, own_images = experiment.train_set(session, state.memory)
        names = ", ".join(experiment.class_names[c] for c in session.new_classes)
        exemplars = len(train_set) - own_images
        observer.session_started(
            session, f"classes {names}, {own_images} training images + {exemplars} exemplars"
        )
        context = experiment.context(session, train_set)
        resume, state.resume = state.resume, None
        diagnostics = SessionDiagnostics(experiment) if self.config.train.diagnostics else None
        if diagnostics is not None:  # resumed inside the session: the session start is on disk
            diagnostics.before(method, self.run_dir if resume is not None else None, session)
        if resume is None:  # else the network is grown, loaded and the method state restored
            seed_everything(derive_seed(self.config.seed, session.index, _GROWTH_PHASE))
            method.begin_session(context)
            method.network.to(experiment.runtime.device)
            experiment.runtime.synchronize_parameters(method.network)  # new head and tokens
        save = functools.partial(self._save_progress, state)
        interim = self._interim_map(session)
        try:
            fit_session(method, context, self.config.train, observer, interim, resume, save)
        except NonFiniteLossError as error:
            # The previous session's checkpoint stays the latest, so the run can resume.
            raise NonFiniteLossError(f"{error}; then resume {self.run_dir}") from None
        train_time = time.perf_counter() - started
        scores, targets = evaluate_session(experiment, method, session)
        result = self._result(scores, targets, session)
        result.update(
            train_images=own_images,
            memory_images=exemplars,
            train_time_s=round(train_time, 3),
            method_state=method.state_dict(),
        )
        own = train_set.indices[:own_images]
        if diagnostics is not None:
            result["diagnostics"] = diagnostics.after(method, session, own)
        if state.memory.enabled:
            state.memory = update_memory(experiment, method, state.memory, session, own)
        method.end_session(context)
        state.results.append(result)
        state.next_session = session.index + 1
        state.elapsed_s += time.perf_counter() - started
        self._final_scores = (scores, targets)
        observer.session_finished(result)
        self._save(state, session)

    def _result(self, scores: np.ndarray, targets: np.ndarray, session: Session) -> dict[str, Any]:
        experiment = self.experiment
        return session_result(
            scores, targets, session, experiment.sessions[0], experiment.class_names
        )

    def _interim_map(self, session: Session) -> Any:
        assert self.state is not None
        method = self.state.method

        def seen_map() -> float:
            scores, targets = evaluate_session(self.experiment, method, session)
            return float(self._result(scores, targets, session)["seen_map"])

        return seen_map

    def _save(self, state: RunState, session: Session) -> None:
        if self.experiment.runtime.is_main:
            network, memory = state.method.network, state.memory.to_dict()
            save_checkpoint(self.run_dir, session.index, network, self._payload(state), memory)
        self.experiment.runtime.barrier()

    def _payload(self, state: RunState) -> dict[str, Any]:
        config = self.config
        return state.to_json(config.run_name, config.method.name, len(self.experiment.sessions))

    def _save_progress(self, state: RunState, progress: FitProgress) -> None:
        if self.experiment.runtime.is_main:
            save_progress_checkpoint(self.run_dir, state, self._payload(state), progress)
        self.experiment.runtime.barrier()

    def _finish(self, state: RunState) -> dict[str, Any]:
        if self._final_scores is None:  # resumed after the last session: score again
            last = self.experiment.sessions[-1]
            self._final_scores = evaluate_session(self.experiment, state.method, last)
        scores, targets = self._final_scores
        header = run_header(self.config, self.experiment.runtime.device)
        header["pretrained"] = cached_provenance(self.config.model, self.config.data.image_size)
        threshold = self.config.train.f1_threshold
        metrics = summarize(state.results, scores, targets, threshold, header, state.elapsed_s)
        if self.experiment.runtime.is_main:
            write_results(self.run_dir, metrics)
        return metrics

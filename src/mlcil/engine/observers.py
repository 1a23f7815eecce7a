"""The built-in callbacks of a run: log lines and the log file, progress bars, the experiment
trackers, phase timers (:class:`mlcil.engine.callbacks.Callback` objects).

The experiment trackers (TensorBoard, CSV, W&B, MLflow, or one registered with
:func:`mlcil.trackers.register_tracker`) are the backends of one :class:`TrackingCallback`, which
names the scalars and places them on a global step. :class:`Observer` is the older vocabulary of
notifications, still accepted wherever callbacks are (adapted by
:func:`mlcil.engine.callbacks.as_callback`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from mlcil.config.schema import RunConfig, TrainConfig
from mlcil.engine.callbacks import Callback, CallbackList, RunView
from mlcil.engine.callbacks import Observer as Observer  # where it always was
from mlcil.engine.callbacks import StepRecord as StepRecord
from mlcil.errors import ConfigError, MlcilError, clip
from mlcil.fileio import OwnFileHandler
from mlcil.protocol import Session
from mlcil.trackers import Tracker, TrackingTarget, check_trackers, make_trackers

if TYPE_CHECKING:
    from mlcil.rundir import RunDir
    from mlcil.runtime import Runtime

logger = logging.getLogger("mlcil.engine")


@dataclasses.dataclass
class Phase:
    """A phase being timed; ``images`` may be set inside the ``with`` block."""

    images: int = 0


def learning_rates(optimizer: torch.optim.Optimizer) -> tuple[float, ...]:
    """The current learning rate of each parameter group."""
    return tuple(float(group["lr"]) for group in optimizer.param_groups)


class LearningRateLog:
    """Notes the learning rates each optimiser step used, for :class:`StepRecord`.

    It stands in for a session's scheduler: the engine calls ``scheduler.step()`` once right
    after each optimiser step, and this reads the rates (the ones that step used) before the
    schedule moves them. Reports take them in step order, however many steps a report covers
    (on CUDA, ``train.log_every_steps``), without reading anything from the device. Everything
    else (``state_dict``, ``get_last_lr``) is the wrapped scheduler's own.
    """

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.scheduler = scheduler
        self.used: collections.deque[tuple[float, ...]] = collections.deque()

    def step(self) -> None:
        self.used.append(learning_rates(self.scheduler.optimizer))
        self.scheduler.step()

    def take(self, count: int) -> list[tuple[float, ...]]:
        """The rates of the ``count`` oldest steps not taken yet (fewer if fewer were noted)."""
        return [self.used.popleft() for _ in range(min(count, len(self.used)))]

    def __getattr__(self, name: str) -> Any:
        if name == "scheduler":  # not set yet (a copy being built): no endless lookup
            raise AttributeError(name)
        return getattr(self.scheduler, name)


@contextlib.contextmanager
def timed(
    callbacks: CallbackList, session: Session, phase: str, runtime: Runtime, images: int = 0
) -> Iterator[Phase]:
    """Time the ``with`` block as ``phase`` of ``session`` (the device is synchronised at the
    end, once per phase, so queued GPU work is counted where it was issued)."""
    record = Phase(images)
    started = time.perf_counter()
    yield record
    runtime.synchronize()
    callbacks.on_phase_end(session, phase, time.perf_counter() - started, record.images)


def run_callbacks(run: RunDir, config: RunConfig | TrainConfig, is_main: bool) -> list[Callback]:
    """A run's built-in callbacks: its log file, progress bars and ``train.trackers`` (on the
    main process only).

    Args:
        run: the run folder.
        config: the resolved config (logged by the trackers); given only its ``train`` section,
            the trackers log that section.
        is_main: whether this process writes the run's files.

    Raises:
        ConfigError: an unknown tracker, or one whose package is not installed (before any
            training).
    """
    train = config.train if isinstance(config, RunConfig) else config
    callbacks: list[Callback] = [LogCallback(run.log_file)] if is_main else []
    if train.progress and is_main:
        callbacks.append(ProgressCallback())
    names = active_trackers(train)
    if names and is_main:
        callbacks.append(TrackingCallback(names, run, config))
    return callbacks


def active_trackers(train: TrainConfig) -> list[str]:
    """``train.trackers``, without tensorboard when ``train.tensorboard`` is false (the older
    switch, which existing configs use to turn TensorBoard off)."""
    return [name for name in train.trackers if name != "tensorboard" or train.tensorboard]


def _fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{value:5.2f}"


class LogCallback(Callback):
    """The run's story as log lines (and, with ``log_file``, in ``train.log`` too)."""

    def __init__(self, log_file: Path | None = None) -> None:
        self.handler: logging.Handler | None = None
        if log_file is not None:
            self.handler = OwnFileHandler(log_file)  # a link planted at train.log is refused
            self.handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
            self.handler.setLevel(logging.INFO)
            root = logging.getLogger("mlcil")
            root.addHandler(self.handler)
            if root.level == logging.NOTSET or root.level > logging.INFO:
                root.setLevel(logging.INFO)

    def on_session_start(self, run: RunView, session: Session, summary: str, resumed: bool) -> None:
        logger.info("session %d: %s", session.index, summary)

    def on_epoch_end(
        self, run: RunView, session: Session, epoch: int, epochs: int, means: dict[str, float]
    ) -> None:
        parts = ", ".join(f"{k} {v:.4g}" for k, v in means.items())
        logger.info("session %d epoch %d/%d: %s", session.index, epoch + 1, epochs, parts)

    def on_interim_evaluation(
        self, run: RunView, session: Session, epoch: int, seen_map: float
    ) -> None:
        logger.info(
            "session %d epoch %d: seen mAP %.2f (not used for selection)",
            session.index,
            epoch + 1,
            seen_map,
        )

    def on_session_end(self, run: RunView, result: dict[str, Any]) -> None:
        logger.info(
            "session %d done: seen mAP %s | base %s | new %s | %d test images | %.1f s",
            result["index"],
            _fmt(result["seen_map"]),
            _fmt(result["base_map"]),
            _fmt(result["new_map"]),
            result["test_images"],
            result["train_time_s"],
        )
        if result["classes_without_positives"]:
            logger.warning(
                "session %d: classes without a positive test image (AP counted as 0): %s",
                result["index"],
                ", ".join(result["classes_without_positives"]),
            )

    def teardown(self, run: RunView) -> None:
        self.close()

    def close(self) -> None:
        if self.handler is not None:
            logging.getLogger("mlcil").removeHandler(self.handler)
            self.handler.close()
            self.handler = None


class ProgressCallback(Callback):
    """A tqdm bar per epoch with the running mean of each loss part."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.totals: dict[str, float] = {}

    def on_epoch_start(
        self, run: RunView, session: Session, epoch: int, epochs: int, steps: int
    ) -> None:
        # disable=None lets tqdm hide itself when stderr is not a terminal (logs, CI).
        self.bar = tqdm(
            total=steps,
            desc=f"session {session.index} epoch {epoch + 1}/{epochs}",
            disable=None,
            leave=False,
            dynamic_ncols=True,
        )
        self.totals = {}

    def on_train_batch_end(self, run: RunView, record: StepRecord) -> None:
        for name, value in record.parts.items():
            self.totals[name] = self.totals.get(name, 0.0) + value
        if self.bar is None:
            return
        self.bar.update(1)
        step = record.step
        if step % 10 == 0 or step == record.steps - 1:
            self.bar.set_postfix({k: f"{v / (step + 1):.3g}" for k, v in self.totals.items()})

    def on_epoch_end(
        self, run: RunView, session: Session, epoch: int, epochs: int, means: dict[str, float]
    ) -> None:
        self.close()

    def teardown(self, run: RunView) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrackingCallback(Callback):
    """The one tracking callback: feeds the run's experiment trackers (its backends,
    :mod:`mlcil.trackers`) on one global step.

    The global step counts the optimiser steps since the run began: step ``i`` (1-based) of a
    session comes after every step of the earlier sessions. It is derived from counts, never
    from how many notifications arrived, so it continues across ``--resume`` where the run
    stopped: the earlier sessions' steps are read back from the checkpoint's session results
    (their training images, the batch size and their epochs). Session metrics sit at the
    session's last step. A tracker that fails while logging is switched off with a warning: a
    lost dashboard never stops a training run.

    Args:
        names: the ``train.trackers`` to feed (checked now, built when the first session
            starts, once the run folder holds the run).
        run: the run folder.
        config: the resolved config, or only its ``train`` section.
    """

    def __init__(self, names: Sequence[str], run: RunDir, config: RunConfig | TrainConfig) -> None:
        check_trackers(names)
        self.names = list(names)
        self.run = run
        self.config = config
        self.train = config.train if isinstance(config, RunConfig) else config
        self.trackers: dict[str, Tracker] | None = None
        self.session_steps: dict[int, int] = {}  # all optimiser steps of each session
        self.epoch_steps: dict[int, int] = {}  # optimiser steps per epoch of each session

    def _target(self) -> TrackingTarget:
        if isinstance(self.config, RunConfig):
            name, config = self.config.run_name, self.config.to_dict()
        else:
            name, config = self.run.path.name, {"train": self.config.model_dump()}
        return TrackingTarget(
            self.run.path, name, run_id(self.run), config, self.run.tensorboard, self.run.tracking
        )

    def on_session_start(self, run: RunView, session: Session, summary: str, resumed: bool) -> None:
        if self.trackers is None:
            self.trackers = self._start_trackers()
        if any(index not in self.session_steps for index in range(session.index)):
            for index, steps in finished_session_steps(self.run, self.train).items():
                self.session_steps.setdefault(index, steps)

    def _start_trackers(self) -> dict[str, Tracker]:
        """Every tracker, started one by one: one that cannot start (a refused login, a server
        that does not answer) stops the run, naming it, and the ones started are closed."""
        started: dict[str, Tracker] = {}
        target = self._target()
        for name in self.names:
            try:
                started[name] = make_trackers([name], target)[0]
            except Exception as error:
                for tracker in started.values():
                    with contextlib.suppress(Exception):
                        tracker.close()
                if isinstance(error, MlcilError):
                    raise
                reason = clip(" ".join(str(error).split()) or type(error).__name__, 300)
                raise ConfigError(
                    f"train.trackers: tracker {name!r} could not start ({reason}); fix its "
                    "setup or remove it from train.trackers, then run the same command again"
                ) from None
        return started

    def on_epoch_start(
        self, run: RunView, session: Session, epoch: int, epochs: int, steps: int
    ) -> None:
        self.session_steps[session.index] = epochs * steps
        self.epoch_steps[session.index] = steps

    def global_step(self, session: int, session_step: int) -> int:
        """The run's step for step ``session_step`` (1-based) of session ``session``."""
        return sum(self.session_steps.get(i, 0) for i in range(session)) + session_step

    def on_train_batch_end(self, run: RunView, record: StepRecord) -> None:
        scalars = {f"train/{name}": value for name, value in record.parts.items()}
        rates = record.learning_rates
        if len(set(rates)) == 1:
            scalars["train/lr"] = rates[0]
        else:  # groups on their own schedules: one curve each
            scalars.update({f"train/lr_group{i}": rate for i, rate in enumerate(rates)})
        self._log(scalars, self.global_step(record.session.index, record.session_step))

    def on_epoch_end(
        self, run: RunView, session: Session, epoch: int, epochs: int, means: dict[str, float]
    ) -> None:
        done = (epoch + 1) * self.epoch_steps.get(session.index, 0)
        scalars = {f"train_epoch/{name}": value for name, value in means.items()}
        self._log(scalars, self.global_step(session.index, done))

    def on_interim_evaluation(
        self, run: RunView, session: Session, epoch: int, seen_map: float
    ) -> None:
        done = (epoch + 1) * self.epoch_steps.get(session.index, 0)
        self._log({"eval/epoch_seen_map": seen_map}, self.global_step(session.index, done))

    def on_session_end(self, run: RunView, result: dict[str, Any]) -> None:
        index = result["index"]
        keys = ("seen_map", "base_map", "new_map", "base_map_subset", "new_map_subset")
        scalars = {f"eval/{k}": result[k] for k in keys if result.get(k) is not None}
        scalars.update({"eval/session": index, "eval/num_seen": result["num_seen"]})
        scalars.update({f"eval_ap/{name}": ap for name, ap in (result.get("ap") or {}).items()})
        self._log(scalars, self.global_step(index, self.session_steps.get(index, 0)))
        for name, tracker in list((self.trackers or {}).items()):
            self._guard(name, tracker.flush)

    def _log(self, scalars: Mapping[str, float], step: int) -> None:
        for name, tracker in list((self.trackers or {}).items()):
            self._guard(name, tracker.log, scalars, step)

    def _guard(self, name: str, call: Callable[..., None], *args: Any) -> None:
        try:
            call(*args)
        except Exception as error:  # any backend failure: keep training, drop the tracker
            logger.warning("tracker %s failed (%s); it is off for the rest of the run", name, error)
            if self.trackers is not None:
                self.trackers.pop(name, None)

    def teardown(self, run: RunView) -> None:
        self.close()

    def close(self) -> None:
        trackers, self.trackers = self.trackers or {}, None
        for name, tracker in trackers.items():
            try:
                tracker.close()
            except Exception as error:  # closing one must not keep the others open
                logger.warning("tracker %s did not close cleanly: %s", name, error)


def run_id(run: RunDir) -> str:
    """A tracking id stable across ``--resume`` of ``run``: from the folder's absolute path and
    its run marker, which ``--overwrite`` writes anew (so a replaced run gets a new id)."""
    digest = hashlib.sha1(str(run.path.resolve()).encode())
    if run.marker.is_file():
        digest.update(run.marker.read_bytes())
    return digest.hexdigest()[:16]


def finished_session_steps(run: RunDir, train: TrainConfig) -> dict[int, int]:
    """Optimiser steps of each session finished in ``run``'s latest checkpoint: its epochs times
    ``ceil(images / train.batch_size)`` (what the engine's batch layout gives for any number of
    processes and accumulation steps), from the training and exemplar images it recorded."""
    try:
        folder = run.latest()
        if folder is None:
            return {}
        results = json.loads((folder / "state.json").read_text(encoding="utf-8"))["results"]
        steps = {}
        for result in results:
            images = int(result["train_images"]) + int(result["memory_images"])
            epoch_steps = -(-images // train.batch_size)
            steps[int(result["index"])] = train.epochs_for(int(result["index"])) * epoch_steps
        return steps
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("trackers: earlier sessions' steps unknown (%s): steps restart", error)
        return {}


class PhaseTimer(Callback):
    """Collects every timed phase with the process's peak memory (for benchmarks/scale.py).

    Attributes:
        records: one dict per phase: ``session``, ``phase``, ``seconds``, ``images``,
            ``images_per_s``, ``peak_rss_mb`` (the process's peak resident memory so far) and
            ``peak_gpu_mb`` (peak CUDA memory allocated during the phase, None without CUDA).
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_phase_end(
        self, run: RunView, session: Session, phase: str, seconds: float, images: int
    ) -> None:
        import resource

        import torch

        gpu = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            gpu = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            torch.cuda.reset_peak_memory_stats()
        self.records.append(
            {
                "session": session.index,
                "phase": phase,
                "seconds": round(seconds, 4),
                "images": images,
                "images_per_s": round(images / seconds, 1) if images and seconds > 0 else None,
                # ru_maxrss is in KiB on Linux.
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "peak_gpu_mb": gpu,
            }
        )

"""Observers the training loop notifies: log lines, the log file, progress bars, TensorBoard.

The loop calls every observer at the same few moments and never depends on what they do; an
observer only reads what it is given. Adding one (a CSV logger, a W&B bridge) touches no loop code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from mlcil.config.schema import TrainConfig
from mlcil.protocol import Session

if TYPE_CHECKING:
    from mlcil.rundir import RunDir
    from mlcil.runtime import Runtime

logger = logging.getLogger("mlcil.engine")


class Observer:
    """Base class: every notification is a no-op unless overridden."""

    def session_started(self, session: Session, summary: str) -> None:
        """A session begins; ``summary`` names its classes and image counts."""

    def epoch_started(self, session: Session, epoch: int, epochs: int, steps: int) -> None:
        """Epoch ``epoch`` (0-based) of ``epochs`` begins, with ``steps`` batches."""

    def step_finished(
        self, session: Session, epoch: int, step: int, parts: dict[str, float], steps: int
    ) -> None:
        """One optimiser step is done; ``parts`` are the loss and its named parts."""

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


@dataclasses.dataclass
class Phase:
    """A phase being timed; ``images`` may be set inside the ``with`` block."""

    images: int = 0


@contextlib.contextmanager
def timed(
    observer: Observer, session: Session, phase: str, runtime: Runtime, images: int = 0
) -> Iterator[Phase]:
    """Time the ``with`` block as ``phase`` of ``session`` (the device is synchronised at the
    end, once per phase, so queued GPU work is counted where it was issued)."""
    record = Phase(images)
    started = time.perf_counter()
    yield record
    runtime.synchronize()
    observer.phase_finished(session, phase, time.perf_counter() - started, record.images)


class Observers(Observer):
    """Forwards every notification to a list of observers, in order."""

    def __init__(self, observers: Sequence[Observer] = ()) -> None:
        self.observers = list(observers)

    def session_started(self, session: Session, summary: str) -> None:
        for observer in self.observers:
            observer.session_started(session, summary)

    def epoch_started(self, session: Session, epoch: int, epochs: int, steps: int) -> None:
        for observer in self.observers:
            observer.epoch_started(session, epoch, epochs, steps)

    def step_finished(
        self, session: Session, epoch: int, step: int, parts: dict[str, float], steps: int
    ) -> None:
        for observer in self.observers:
            observer.step_finished(session, epoch, step, parts, steps)

    def epoch_finished(
        self, session: Session, epoch: int, epochs: int, means: dict[str, float]
    ) -> None:
        for observer in self.observers:
            observer.epoch_finished(session, epoch, epochs, means)

    def interim_evaluated(self, session: Session, epoch: int, seen_map: float) -> None:
        for observer in self.observers:
            observer.interim_evaluated(session, epoch, seen_map)

    def session_finished(self, result: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.session_finished(result)

    def phase_finished(self, session: Session, phase: str, seconds: float, images: int) -> None:
        for observer in self.observers:
            observer.phase_finished(session, phase, seconds, images)

    def close(self) -> None:
        for observer in self.observers:
            observer.close()


def run_observers(
    run: RunDir, train: TrainConfig, is_main: bool, extra: Sequence[Observer] = ()
) -> Observers:
    """A run's observers: its log file, progress bars and TensorBoard as configured (on the main
    process only), then ``extra``."""
    observers: list[Observer] = [LogObserver(run.log_file)] if is_main else []
    if train.progress and is_main:
        observers.append(ProgressObserver())
    if train.tensorboard and is_main:
        observers.append(TensorBoardObserver(run.tensorboard))
    return Observers([*observers, *extra])


def _fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{value:5.2f}"


class LogObserver(Observer):
    """The run's story as log lines (and, with ``log_file``, in ``train.log`` too)."""

    def __init__(self, log_file: Path | None = None) -> None:
        self.handler: logging.Handler | None = None
        if log_file is not None:
            self.handler = logging.FileHandler(log_file)
            self.handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
            self.handler.setLevel(logging.INFO)
            root = logging.getLogger("mlcil")
            root.addHandler(self.handler)
            if root.level == logging.NOTSET or root.level > logging.INFO:
                root.setLevel(logging.INFO)

    def session_started(self, session: Session, summary: str) -> None:
        logger.info("session %d: %s", session.index, summary)

    def epoch_finished(
        self, session: Session, epoch: int, epochs: int, means: dict[str, float]
    ) -> None:
        parts = ", ".join(f"{k} {v:.4g}" for k, v in means.items())
        logger.info("session %d epoch %d/%d: %s", session.index, epoch + 1, epochs, parts)

    def interim_evaluated(self, session: Session, epoch: int, seen_map: float) -> None:
        logger.info(
            "session %d epoch %d: seen mAP %.2f (not used for selection)",
            session.index,
            epoch + 1,
            seen_map,
        )

    def session_finished(self, result: dict[str, Any]) -> None:
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

    def close(self) -> None:
        if self.handler is not None:
            logging.getLogger("mlcil").removeHandler(self.handler)
            self.handler.close()
            self.handler = None


class ProgressObserver(Observer):
    """A tqdm bar per epoch with the running mean of each loss part."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.totals: dict[str, float] = {}

    def epoch_started(self, session: Session, epoch: int, epochs: int, steps: int) -> None:
        # disable=None lets tqdm hide itself when stderr is not a terminal (logs, CI).
        self.bar = tqdm(
            total=steps,
            desc=f"session {session.index} epoch {epoch + 1}/{epochs}",
            disable=None,
            leave=False,
            dynamic_ncols=True,
        )
        self.totals = {}

    def step_finished(
        self, session: Session, epoch: int, step: int, parts: dict[str, float], steps: int
    ) -> None:
        for name, value in parts.items():
            self.totals[name] = self.totals.get(name, 0.0) + value
        if self.bar is None:
            return
        self.bar.update(1)
        if step % 10 == 0 or step == steps - 1:
            self.bar.set_postfix({k: f"{v / (step + 1):.3g}" for k, v in self.totals.items()})

    def epoch_finished(
        self, session: Session, epoch: int, epochs: int, means: dict[str, float]
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TensorBoardObserver(Observer):
    """Loss parts every 10 steps and the evaluation scalars, under ``<run>/tensorboard``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writer: Any = None

    def _write(self, tag: str, value: float, step: int) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder))
        self.writer.add_scalar(tag, value, step)

    def step_finished(
        self, session: Session, epoch: int, step: int, parts: dict[str, float], steps: int
    ) -> None:
        if step % 10 == 0 or step == steps - 1:
            for name, value in parts.items():
                self._write(f"train/session_{session.index}/{name}", value, epoch * steps + step)

    def interim_evaluated(self, session: Session, epoch: int, seen_map: float) -> None:
        self._write("eval/epoch_seen_map", seen_map, session.index * 1000 + epoch)

    def session_finished(self, result: dict[str, Any]) -> None:
        for key in ("seen_map", "base_map", "new_map"):
            if result[key] is not None:
                self._write(f"eval/{key}", result[key], result["index"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class PhaseTimer(Observer):
    """Collects every timed phase with the process's peak memory (for benchmarks/scale.py).

    Attributes:
        records: one dict per phase: ``session``, ``phase``, ``seconds``, ``images``,
            ``images_per_s``, ``peak_rss_mb`` (the process's peak resident memory so far) and
            ``peak_gpu_mb`` (peak CUDA memory allocated during the phase, None without CUDA).
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def phase_finished(self, session: Session, phase: str, seconds: float, images: int) -> None:
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

"""Observers the training loop notifies: log lines, the log file, progress bars, TensorBoard.

The loop calls every observer at the same few moments and never depends on what they do; an
observer only reads what it is given. Adding one (a CSV logger, a W&B bridge) touches no loop code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mlcil.protocol import Session

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

    def close(self) -> None:
        """The run stops (finished, interrupted or failed)."""


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

    def close(self) -> None:
        for observer in self.observers:
            observer.close()


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

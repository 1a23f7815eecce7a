"""The Python API of a trained run: ``model = mlcil.load("runs/<name>")``, ``model.predict(...)``.

``load`` rebuilds the run exactly as ``mlcil train --resume`` and ``mlcil eval`` do (its config,
its added sessions, :func:`mlcil.engine.checkpoint.restore_run` on the latest checkpoint), so the
model predicts with the classes it has seen so far and the run's own evaluation transform. The
run's data must still be readable: the exemplar memory is checked against it on restore.

Example::

    import mlcil

    model = mlcil.load("runs/digits_B0-C2_krt_s0")
    print(model.classes)                       # ['0', '1', ..., in arrival order]
    for prediction in model.predict(["scene.png", "more_scenes/"]):
        print(prediction.image, prediction.labels, prediction.scores["3"])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mlcil.engine.checkpoint import RunState
from mlcil.errors import ConfigError
from mlcil.experiment import Experiment
from mlcil.inference import infer
from mlcil.predict import (
    Prediction,
    Problem,
    gather_images,
    iter_image_batches,
    make_predictions,
    read_thresholds,
)
from mlcil.runs import open_run

ImageInput = str | Path | Image.Image
logger = logging.getLogger(__name__)


class TrainedModel:
    """A run's network after its latest checkpoint, ready to label images.

    Attributes:
        run_dir: the run folder.
        experiment: the run's experiment (config, data, sessions, transforms, runtime).
        state: the restored run state (method, memory, results).
        classes: the classes the model has seen, in arrival order (its score columns).
        skipped: ``(path or input, reason)`` of what the last ``predict`` call skipped.
        checkpoint: the checkpoint folder the weights come from (``session_03``: the run's last
            finished session).
    """

    def __init__(
        self, run_dir: Path, experiment: Experiment, state: RunState, checkpoint: str = ""
    ) -> None:
        self.run_dir = run_dir
        self.experiment = experiment
        self.state = state
        self.checkpoint = checkpoint
        session = experiment.sessions[state.next_session - 1]
        self.classes = [experiment.class_names[c] for c in session.seen_classes]
        self.skipped: list[Problem] = []

    def __repr__(self) -> str:
        return (
            f"TrainedModel({str(self.run_dir)!r}, {len(self.classes)} classes, "
            f"{self.state.next_session} sessions, checkpoint {self.checkpoint}, device "
            f"{self.experiment.runtime.device})"
        )

    @property
    def threshold(self) -> float:
        """The run's default decision threshold (``train.f1_threshold``)."""
        return float(self.experiment.config.train.f1_threshold)

    def thresholds(
        self, threshold: float | None = None, thresholds_file: str | Path | None = None
    ) -> float | np.ndarray:
        """One threshold, the per-class ones of a file, or the run's default."""
        if threshold is not None and thresholds_file is not None:
            raise ConfigError("predict: give one threshold or a thresholds file, not both")
        if thresholds_file is not None:
            return read_thresholds(thresholds_file, self.classes)
        if threshold is None:
            return self.threshold
        if isinstance(threshold, bool) or not (math.isfinite(threshold) and 0 < threshold < 1):
            raise ConfigError(f"predict: threshold {threshold!r} must be strictly between 0 and 1")
        return float(threshold)

    def scores(self, images: torch.Tensor) -> np.ndarray:
        """``(N, classes)`` sigmoid scores of a batch of transformed images."""
        method, num_classes = self.state.method, len(self.classes)

        def step(batch: torch.Tensor, _: object) -> dict[str, torch.Tensor]:
            return {"scores": method.predict(batch).float().sigmoid()[:, :num_classes]}

        runtime = self.experiment.runtime
        return infer([(images, None)], step, runtime, method.network)["scores"]

    def predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        threshold: float | None = None,
        thresholds_file: str | Path | None = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> list[Prediction]:
        """Label images: PIL images, image files, or folders (searched recursively).

        Args:
            images: one input or several; PIL images are predicted first (named ``image[i]``
                after their position in ``images``), then the files in the order given.
            threshold: a class is predicted when its score is above it; default the run's
                ``train.f1_threshold``.
            thresholds_file: per-class thresholds (CSV ``class,threshold`` or JSON), instead.
            batch_size: images per forward pass.
            progress: show a progress bar (tqdm) over the batches.

        Returns:
            One prediction per image that could be read. Inputs that do not exist, folders
            without images and files that do not decode are skipped and listed in ``skipped``.
        """
        limits = self.thresholds(threshold, thresholds_file)
        items = [images] if isinstance(images, str | Path | Image.Image) else list(images)
        pictures = [(i, item) for i, item in enumerate(items) if isinstance(item, Image.Image)]
        paths, self.skipped = gather_images(
            [item for item in items if not isinstance(item, Image.Image)]
        )
        names: list[str] = []
        chunks: list[np.ndarray] = []
        total = math.ceil(len(pictures) / batch_size) + math.ceil(len(paths) / batch_size)
        for batch, batch_names in _with_progress(
            self._batches(pictures, paths, batch_size), total, progress
        ):
            chunks.append(self.scores(batch))
            names.extend(batch_names)
        if not chunks:
            return []
        return make_predictions(names, np.concatenate(chunks), self.classes, limits)

    def _batches(
        self, pictures: Sequence[tuple[int, Image.Image]], paths: Sequence[Path], batch_size: int
    ) -> Iterator[tuple[torch.Tensor, list[str]]]:
        transform = self.experiment.eval_transform
        if batch_size < 1:
            raise ConfigError(f"predict: batch size must be at least 1, got {batch_size}")
        for start in range(0, len(pictures), batch_size):
            chunk = pictures[start : start + batch_size]
            tensors = [transform(picture.convert("RGB")) for _, picture in chunk]
            yield torch.stack(tensors), [f"image[{i}]" for i, _ in chunk]
        for batch, batch_paths in iter_image_batches(paths, transform, batch_size, self.skipped):
            yield batch, [str(path) for path in batch_paths]


def _with_progress(iterable: Iterable[Any], total: int, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, unit="batch", desc="predict", leave=False)


def load(run_dir: str | Path, device: str | None = None) -> TrainedModel:
    """Load a run for prediction: the checkpoint of its last *finished* session (the one
    ``mlcil eval`` scores; a run stopped inside a session predicts with the session before).

    Args:
        run_dir: the run folder (``runs/<name>``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default the run's ``train.device``.

    Raises:
        ConfigError: when the folder is not a run or has no finished session yet.
        WeightsError: when the checkpoint is damaged or does not fit the run's config.
    """
    overrides = [] if device is None else [f"train.device={device}"]
    opened, _ = open_run(run_dir, overrides)
    folder, state = opened.restore(session_end=True)
    logger.info("%s: predicting with checkpoint %s", opened.run.path, folder.name)
    return TrainedModel(opened.run.path, opened.experiment, state, folder.name)

"""The Python API: ``mlcil.train(...)`` runs a protocol, ``model = mlcil.load("runs/<name>")`` and
``model.predict(...)`` label images with a trained run.

``train`` is ``mlcil train`` without the command line: the same checks before anything is written
(:func:`mlcil.runs.start_run`), the same run folder, errors raised as exceptions (never
``sys.exit``), so it can run in a notebook::

    import mlcil

    run = mlcil.train("digits-b0-c2", overrides={"train.epochs": 1}, run_dir="runs/try")
    print(run.metrics.last_map)
    model = run.load()

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

import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from PIL import Image

from mlcil.config.loading import apply_overrides
from mlcil.config.schema import RunConfig
from mlcil.engine.callbacks import Callback, Observer
from mlcil.engine.checkpoint import RunState
from mlcil.errors import ConfigError
from mlcil.experiment import Experiment, build_config, load_config, params_lookup
from mlcil.inference import infer
from mlcil.predict import (
    Prediction,
    Problem,
    gather_images,
    iter_image_batches,
    make_predictions,
    read_thresholds,
)
from mlcil.record import RunMetrics
from mlcil.results import read_metrics
from mlcil.runs import Launch, import_config_plugins, open_run, resume_run, start_run
from mlcil.safety import MAX_BATCH_SIZE, check_bounded

ImageInput = str | Path | Image.Image
ConfigInput: TypeAlias = str | Path | Sequence[str | Path] | RunConfig | Mapping[str, Any]
"""A config file or shipped config name, several of them stacked (later wins), a ``RunConfig``,
or a plain mapping in the YAML layout (``{"protocol": "B0-C2", "data": {...}}``)."""
Overrides: TypeAlias = Sequence[str] | Mapping[str, Any]
"""``["train.epochs=2"]`` as on the command line, or ``{"train.epochs": 2}`` with Python values."""
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
        metrics: the run's record (``metrics.json``: ``metrics.last_map``,
            ``metrics.sessions[0].ap``...; ``metrics.finished`` is False for a run stopped
            early), None when the folder holds none.
    """

    def __init__(
        self,
        run_dir: Path,
        experiment: Experiment,
        state: RunState,
        checkpoint: str = "",
        metrics: RunMetrics | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.experiment = experiment
        self.state = state
        self.checkpoint = checkpoint
        self.metrics = metrics
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
        check_bounded(batch_size, 1, MAX_BATCH_SIZE, "predict: batch_size")
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
        ConfigError: when the folder is not a run or has no finished session yet (a damaged
            ``metrics.json`` is only logged: ``metrics`` is then None).
        WeightsError: when the checkpoint is damaged or does not fit the run's config.
    """
    overrides = [] if device is None else [f"train.device={device}"]
    opened, _ = open_run(run_dir, overrides)
    try:
        metrics = read_metrics(opened.run.path)
    except ConfigError as error:  # the weights predict all the same
        logger.warning("%s; model.metrics is None", error)
        metrics = None
    folder, state = opened.restore(session_end=True)
    logger.info("%s: predicting with checkpoint %s", opened.run.path, folder.name)
    return TrainedModel(opened.run.path, opened.experiment, state, folder.name, metrics)


# --- training ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """What :func:`train` and :func:`resume` return: the run folder and how far it got.

    Attributes:
        run_dir: the run folder (``config.yaml``, ``metrics.json``, ``checkpoints/``...).
        config: the run's resolved config.
        metrics: the run's record, as in ``metrics.json`` (``metrics.last_map``,
            ``metrics.sessions[-1].seen_map``...), once every session is done; None when the
            run stopped earlier (``max_sessions``, a SIGTERM) and can be continued with
            :func:`resume` (its ``metrics.json`` then holds the sessions done, unfinished).
        sessions_done: the sessions learned so far.
        stopped: why the run stopped early (None when it did not, or only ``max_sessions``).
    """

    run_dir: Path
    config: RunConfig
    metrics: RunMetrics | None
    sessions_done: int
    stopped: str | None = None

    @property
    def finished(self) -> bool:
        """Whether every session of the protocol is learned."""
        return self.metrics is not None

    def load(self, device: str | None = None) -> TrainedModel:
        """The model of the last finished session, ready to predict (:func:`load`)."""
        return load(self.run_dir, device=device)


def _override_strings(overrides: Overrides) -> list[str]:
    if isinstance(overrides, str):
        raise ConfigError(
            f"overrides: give a list of key=value strings or a dict, not {overrides!r}"
        )
    if isinstance(overrides, Mapping):
        # JSON is YAML: the config loader reads each value back with its Python type.
        return [f"{key}={json.dumps(value, default=str)}" for key, value in overrides.items()]
    return [str(item) for item in overrides]


def _check_max_sessions(max_sessions: int | None) -> None:
    # Checked before the run folder is locked: a Launch must be run to release it.
    if max_sessions is not None and (
        isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1
    ):
        raise ConfigError(f"max_sessions must be at least 1 (or None: all), got {max_sessions!r}")


def resolve_config(config: ConfigInput, overrides: Overrides = ()) -> RunConfig:
    """The validated config :func:`train` runs (what ``mlcil train --print-config`` shows).

    Raises:
        ConfigError: for a missing file or an unknown name, key or value, naming it.
    """
    changes = _override_strings(overrides)
    if isinstance(config, RunConfig | Mapping):
        raw = config.to_dict() if isinstance(config, RunConfig) else dict(config)
        where = "mlcil.train config" + (" with overrides" if changes else "")
        return build_config(apply_overrides(raw, changes, params_lookup), where)
    import_config_plugins([config] if isinstance(config, str | Path) else config)
    return load_config(config, changes)


def _finish(launch: Launch, max_sessions: int | None) -> TrainedRun:
    metrics = launch.run(max_sessions=max_sessions)
    trainer = launch.trainer
    return TrainedRun(
        trainer.run_dir, trainer.config, metrics, trainer.next_session, trainer.stopped
    )


def train(
    config: ConfigInput,
    overrides: Overrides = (),
    run_dir: str | Path | None = None,
    observers: Sequence[Callback | Observer] = (),
    *,
    overwrite: bool = False,
    max_sessions: int | None = None,
) -> TrainedRun:
    """Train a new run, as ``mlcil train --config ...`` does, and return it.

    Args:
        config: a config file or a shipped config's short name (``"digits-pretrained-b0-c2"``),
            a list of them stacked (later wins), a ``RunConfig``, or a mapping in the YAML
            layout.
        overrides: ``{"train.epochs": 2}`` or ``["train.epochs=2"]``, applied last.
        run_dir: the run folder (default ``<output_dir>/<run name>``); it must not hold a run
            unless ``overwrite``.
        observers: extra :class:`mlcil.engine.callbacks.Callback` objects (or older
            :class:`mlcil.engine.observers.Observer` ones) called at every step, epoch and session
            (after the built-in log, progress bar and tracking callbacks).
        overwrite: replace a run already in ``run_dir`` (kept until the new run's first
            checkpoint, and put back if the new run fails before it).
        max_sessions: stop after this many sessions (continue with :func:`resume`).

    Returns:
        The run: its folder, config, record (``metrics``, None until every session is learned)
        and ``load()`` for predictions.

    Raises:
        MlcilError: (``ConfigError``, ``DataError``, ``WeightsError``) naming the file, key or
            value at fault; nothing of an earlier run is touched when a check fails.
    """
    _check_max_sessions(max_sessions)
    resolved = resolve_config(config, overrides)
    launch = start_run(resolved, run_dir, overwrite=overwrite, observers=observers)
    return _finish(launch, max_sessions)


def resume(
    run_dir: str | Path,
    overrides: Overrides = (),
    observers: Sequence[Callback | Observer] = (),
    *,
    max_sessions: int | None = None,
) -> TrainedRun:
    """Continue a run from its newest checkpoint, as ``mlcil train --resume`` does.

    Args:
        run_dir: the run folder.
        overrides: only settings that cannot change the results (``train.device``,
            ``train.progress``, ``data.root``...).
        observers: extra observers, as for :func:`train`.
        max_sessions: stop after this many more sessions.
    """
    _check_max_sessions(max_sessions)
    launch = resume_run(run_dir, _override_strings(overrides), observers=observers)
    return _finish(launch, max_sessions)

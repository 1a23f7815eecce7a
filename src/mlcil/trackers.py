"""Experiment trackers: the backends a run's scalars are sent to (``train.trackers``).

A tracker only stores what it is given: the resolved config once, then named scalars at a global
step (optimiser steps since the run began, continuing across sessions and ``--resume``). What is
logged and when is decided in one place, the run's one tracking callback
(:class:`mlcil.engine.observers.TrackingCallback`), whose backends the trackers are, so every
backend receives the same tags:

- ``train/lr`` (``train/lr_group<i>`` when parameter groups differ), ``train/loss`` and the
  method's loss parts after every optimiser step; ``train_epoch/<part>``: the epoch's means;
- ``eval/seen_map``, ``eval/base_map``, ``eval/new_map`` (and the release's subset variants),
  ``eval/session``, ``eval/num_seen`` and ``eval_ap/<class>`` at the end of each session.

Built in: ``tensorboard`` (``<run>/tensorboard``), ``csv`` (``<run>/tracking/scalars.csv`` and
``params.csv``), ``wandb`` (``<run>/tracking/wandb``; ``WANDB_MODE=offline`` keeps it local) and
``mlflow`` (a SQLite store in ``<run>/tracking/mlflow`` unless ``MLFLOW_TRACKING_URI`` names
another). Only the chosen trackers' packages are imported. Others register with
:func:`register_tracker`.

:func:`check_trackers` runs before any work (and in ``--dry-run``): every name is known, its
package is installed, and with ``start=True`` the tracker's start-up check passes (TensorBoard
imports, MLflow reaches the store ``MLFLOW_TRACKING_URI`` names), so a run never trains, or
pretrains, only to stop at its first session.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mlcil.config import flatten
from mlcil.errors import ConfigError
from mlcil.fileio import write_text_atomic
from mlcil.registry import Entries

logger = logging.getLogger(__name__)

# The key W&B plots every scalar against (its own step counter must only grow within a process).
STEP_KEY = "global_step"


@dataclasses.dataclass(frozen=True)
class TrackingTarget:
    """What a tracker needs to know about the run it records.

    Attributes:
        run_dir: the run folder.
        run_name: the run's name (shown by W&B and MLflow).
        run_id: stable for the run folder across ``--resume`` (a new one after
            ``--overwrite``), so a resumed run continues the same W&B / MLflow run.
        config: the resolved config as plain nested data.
        tensorboard_dir: where TensorBoard's event files go.
        folder: where the csv, wandb and mlflow trackers write (``<run>/tracking``).
    """

    run_dir: Path
    run_name: str
    run_id: str
    config: dict[str, Any]
    tensorboard_dir: Path
    folder: Path

    def config_yaml(self) -> str:
        return yaml.safe_dump(self.config, sort_keys=False)


class Tracker:
    """A backend. Constructed when the run's first session starts (the config is logged then);
    ``log`` may be called many times per second, so backends buffer as they see fit."""

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        """Record ``scalars`` (tag -> value) at global step ``step``."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make what was logged durable (called at the end of every session)."""

    def close(self) -> None:
        """The run stops (finished, interrupted or failed); release files and connections."""


TrackerFactory = Callable[[TrackingTarget], Tracker]


@dataclasses.dataclass(frozen=True)
class TrackerSpec:
    """A registered tracker: how to build it, which optional package it needs, and how to check
    before any work that it can start."""

    factory: TrackerFactory
    package: str | None = None  # importable module the tracker needs, checked before training
    extra: str | None = None  # the mlcil extra that installs it
    # Raises when the tracker could not start (a broken install, an unreachable store); writes
    # nothing in the run folder. Called before any work and by --dry-run.
    probe: Callable[[], None] | None = None


# The one registry's shape (mlcil.registry): built-in trackers below, others from plugins.
TRACKERS: Entries[TrackerSpec] = Entries("tracker")


def register_tracker(
    name: str,
    factory: TrackerFactory,
    package: str | None = None,
    extra: str | None = None,
    probe: Callable[[], None] | None = None,
) -> None:
    """Make ``name`` usable in ``train.trackers``.

    Args:
        name: the name configs use.
        factory: builds the tracker for a run (called on the main process only).
        package: a module the tracker imports; when it is missing the run stops before training
            with an error naming ``extra`` (or the package).
        extra: the ``pip install 'mlcil[<extra>]'`` that provides ``package``.
        probe: checks, before any work, that the tracker can start (raising any exception when
            it cannot); it must not write into the run folder.
    """
    TRACKERS.add(name, TrackerSpec(factory, package, extra, probe), replace=True)


def tracker_names() -> list[str]:
    """Every registered tracker name, sorted."""
    return sorted(TRACKERS)


def check_trackers(names: Sequence[str], start: bool = False) -> None:
    """Refuse unknown tracker names and trackers whose package is not installed; with
    ``start``, also trackers whose start-up check fails.

    Raises:
        ConfigError: naming ``train.trackers``, the tracker and what to install or fix.
    """
    for name in names:
        spec = TRACKERS.get(name)
        if spec is None:
            raise ConfigError(
                f"train.trackers: unknown tracker {name!r}; known: {', '.join(tracker_names())}"
            )
        if spec.package is not None and importlib.util.find_spec(spec.package) is None:
            raise ConfigError(_missing_package(name, spec))
        if start and spec.probe is not None:
            try:
                spec.probe()
            except ConfigError:
                raise
            except ImportError as error:  # installed but broken (a dependency of its own)
                message = f"{_missing_package(name, spec)}; importing it failed: {_short(error)}"
                raise ConfigError(message) from error
            except Exception as error:
                raise ConfigError(_cannot_start(name, error)) from error


def _short(error: BaseException, limit: int = 300) -> str:
    """An exception as one line of at most ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cannot_start(name: str, error: BaseException) -> str:
    return (
        f"train.trackers: {name!r} cannot start: {type(error).__name__}: {_short(error)} "
        f"(fix it, or remove {name!r} from train.trackers)"
    )


def _missing_package(name: str, spec: TrackerSpec) -> str:
    install = f"pip install 'mlcil[{spec.extra}]'" if spec.extra else f"pip install {spec.package}"
    return (
        f"train.trackers lists {name!r}, which needs the {spec.package} package: {install} "
        f"(or remove {name!r} from train.trackers)"
    )


def make_trackers(names: Sequence[str], target: TrackingTarget) -> list[Tracker]:
    """Build the named trackers for ``target`` (see :func:`check_trackers` for the errors)."""
    check_trackers(names)
    trackers: list[Tracker] = []
    try:
        for name in names:
            spec = TRACKERS[name]
            try:
                trackers.append(spec.factory(target))
            except ConfigError:
                raise
            except ImportError as error:  # installed but broken (a dependency of its own)
                message = f"{_missing_package(name, spec)}; importing it failed: {_short(error)}"
                raise ConfigError(message) from error
            except Exception as error:  # a login, a store or a server that refuses
                raise ConfigError(_cannot_start(name, error)) from error
    except BaseException:
        for tracker in trackers:  # the ones already started are not left open
            tracker.close()
        raise
    return trackers


def plain_params(config: Mapping[str, Any], limit: int = 6000) -> dict[str, str]:
    """The config flattened to ``section.key -> text`` (lists as JSON), each value cut to
    ``limit`` characters: the form of parameter stores (CSV, MLflow)."""
    params = {}
    for key, value in flatten(config).items():
        text = value if isinstance(value, str) else json.dumps(value)
        params[key] = text[:limit]
    return params


class TensorBoardTracker(Tracker):
    """Scalars as TensorBoard events; the config as a text summary."""

    def __init__(self, target: TrackingTarget) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(target.tensorboard_dir))
        # Indented by four spaces: TensorBoard renders text as markdown, this keeps the YAML.
        block = "\n".join("    " + line for line in target.config_yaml().splitlines())
        self.writer.add_text("config", block, 0)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class CsvTracker(Tracker):
    """``tracking/scalars.csv``: one row per scalar (``step,tag,value,wall_time``), appended
    across ``--resume``; ``tracking/params.csv``: the flattened config (``key,value``).

    The long format keeps every tag in one column, so a method whose loss parts change between
    sessions still writes one well-formed file (pivot it on ``tag`` to get a table).
    """

    COLUMNS = ("step", "tag", "value", "wall_time")

    def __init__(self, target: TrackingTarget) -> None:
        folder = target.folder
        folder.mkdir(parents=True, exist_ok=True)
        params = io.StringIO()
        table = csv.writer(params)
        table.writerow(("key", "value"))
        table.writerows(plain_params(target.config).items())
        write_text_atomic(folder / "params.csv", params.getvalue())
        self.path = folder / "scalars.csv"
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.handle = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (run-long)
        self.writer = csv.writer(self.handle)
        if new:
            self.writer.writerow(self.COLUMNS)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        now = f"{time.time():.3f}"
        self.writer.writerows([step, tag, f"{value:.9g}", now] for tag, value in scalars.items())

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class WandbTracker(Tracker):
    """A Weights & Biases run in ``tracking/wandb``; every scalar is plotted against
    ``global_step``. ``WANDB_MODE=offline`` keeps everything on disk (``wandb sync`` uploads it
    later); ``WANDB_PROJECT`` names the project (default ``mlcil``)."""

    def __init__(self, target: TrackingTarget) -> None:
        import wandb

        target.folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            dir=str(target.folder),
            project=os.environ.get("WANDB_PROJECT", "mlcil"),
            name=target.run_name,
            id=target.run_id,
            resume="allow",  # a resumed mlcil run continues its W&B run
            config=target.config,
            # Its console capture and banners stay off: one line in mlcil's log says where
            # the run is (and -q quiets it with the rest).
            settings=wandb.Settings(console="off", silent=True),
        )
        where = Path(self.run.dir).parent if self.run.offline else self.run.url
        logger.info("W&B run %s: %s", self.run.id, where)
        self.run.define_metric(STEP_KEY)
        # A custom step, unlike W&B's own, may repeat: steps redone after a mid-epoch resume.
        self.run.define_metric("*", step_metric=STEP_KEY)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log({**scalars, STEP_KEY: step})

    def close(self) -> None:
        self.run.finish()


# MLflow accepts letters, digits and _ - . space : / in metric names.
_MLFLOW_UNSAFE = re.compile(r"[^\w\-. :/]")


class MlflowTracker(Tracker):
    """An MLflow run: by default in a SQLite store in ``tracking/mlflow`` (MLflow's file store
    is deprecated), or in ``MLFLOW_TRACKING_URI``'s store (a ``file:`` folder, a server),
    under the experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``mlcil``). The run is tagged
    ``mlcil.run_id``: a resumed mlcil run continues it. Metrics are sent in batches."""

    BATCH = 500  # metrics per request (MLflow takes at most 1000)

    def __init__(self, target: TrackingTarget) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:
            store = target.folder / "mlflow"
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{(store / 'mlflow.db').resolve()}"
            artifacts = (store / "artifacts").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mlcil")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self._run(experiment_id, target)
        self.pending: list[Any] = []

    def _run(self, experiment_id: str, target: TrackingTarget) -> str:
        from mlflow.entities import Param

        earlier = self.client.search_runs(
            [experiment_id], f"tags.`mlcil.run_id` = '{target.run_id}'", max_results=1
        )
        if earlier:
            run_id = str(earlier[0].info.run_id)
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        tags = {"mlcil.run_id": target.run_id, "mlcil.run_dir": str(target.run_dir.resolve())}
        run = self.client.create_run(experiment_id, run_name=target.run_name, tags=tags)
        run_id = str(run.info.run_id)
        params = [Param(k, v) for k, v in plain_params(target.config).items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 params per request
            self.client.log_batch(run_id, params=params[start : start + 100])
        self.client.log_text(run_id, target.config_yaml(), "resolved-config.yaml")
        return run_id

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for tag, value in scalars.items():
            self.pending.append(Metric(_MLFLOW_UNSAFE.sub("_", tag), float(value), now, step))
        if len(self.pending) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[: self.BATCH], self.pending[self.BATCH :]
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id)


def _tensorboard_starts() -> None:
    # torch's writer imports tensorboard and its protobuf: a mismatched install fails here.
    import torch.utils.tensorboard  # noqa: F401


def _mlflow_starts() -> None:
    """The store a run would use answers: a SQLite store in the run folder needs sqlalchemy and
    alembic (the full mlflow, not mlflow-skinny); a ``MLFLOW_TRACKING_URI`` is opened and asked
    for the experiment (MLflow 3 refuses a ``file:`` store here, before any work)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        for module in ("sqlalchemy", "alembic"):
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"train.trackers lists 'mlflow', whose local SQLite store needs the {module} "
                    "package: pip install 'mlcil[mlflow]' (the full mlflow, not mlflow-skinny), "
                    "or set MLFLOW_TRACKING_URI to a tracking server"
                )
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).get_experiment_by_name(
            os.environ.get("MLFLOW_EXPERIMENT_NAME", "mlcil")
        )
    except Exception as error:
        raise ConfigError(
            f"train.trackers: 'mlflow' cannot start with MLFLOW_TRACKING_URI={uri}: "
            f"{type(error).__name__}: {_short(error)}"
        ) from error


register_tracker(
    "tensorboard",
    TensorBoardTracker,
    package="tensorboard",
    extra="tensorboard",
    probe=_tensorboard_starts,
)
register_tracker("csv", CsvTracker)
register_tracker("wandb", WandbTracker, package="wandb", extra="wandb")
register_tracker("mlflow", MlflowTracker, package="mlflow", extra="mlflow", probe=_mlflow_starts)

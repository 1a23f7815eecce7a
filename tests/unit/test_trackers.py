"""Experiment trackers: the registry, the global step across sessions and --resume, the learning
rate of every step, and each backend's files (W&B offline, MLflow in a local store)."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from mlcil import trackers
from mlcil.config.schema import TrainConfig
from mlcil.engine.observers import (
    LearningRateLog,
    StepRecord,
    TrackingCallback,
    active_trackers,
    run_callbacks,
    run_id,
)
from mlcil.errors import ConfigError
from mlcil.protocol import Session
from mlcil.rundir import RunDir
from mlcil.trackers import (
    CsvTracker,
    MlflowTracker,
    TensorBoardTracker,
    Tracker,
    TrackerSpec,
    TrackingTarget,
    WandbTracker,
    check_trackers,
)


class Recording(Tracker):
    """Keeps every (step, tag, value) it is given."""

    def __init__(self, target: TrackingTarget) -> None:
        self.target = target
        self.rows: list[tuple[int, str, float]] = []
        self.closed = False

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.rows.extend((step, tag, value) for tag, value in scalars.items())

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> list[Recording]:
    """Register the ``recording`` tracker; the list collects every instance built."""
    built: list[Recording] = []

    def factory(target: TrackingTarget) -> Recording:
        built.append(Recording(target))
        return built[-1]

    monkeypatch.setitem(trackers.TRACKERS, "recording", TrackerSpec(factory))
    return built


def target(tmp_path: Path, config: dict[str, Any] | None = None) -> TrackingTarget:
    run = tmp_path / "run"
    config = config or {"train": {"batch_size": 16, "trackers": ["csv"]}, "seed": 3}
    return TrackingTarget(run, "tiny_run", "abc123", config, run / "tensorboard", run / "tracking")


VIEW: Any = None  # the tracking callback reads nothing of the run view


def session_of(callback: TrackingCallback, index: int, epochs: int, steps: int) -> None:
    """Tell ``callback`` a session of ``epochs`` x ``steps`` optimiser steps (lr 0.1 x step)."""
    session = Session(index, [index], list(range(index + 1)))
    callback.on_session_start(VIEW, session, "", False)
    for epoch in range(epochs):
        callback.on_epoch_start(VIEW, session, epoch, epochs, steps)
        for step in range(steps):
            rate = 0.1 * (step + 1)
            record = StepRecord(session, epoch, step, steps, {"loss": 1.0 / (step + 1)}, (rate,))
            callback.on_train_batch_end(VIEW, record)
        callback.on_epoch_end(VIEW, session, epoch, epochs, {"loss": 0.5})
    result = {"index": index, "num_seen": index + 1, "seen_map": 90.0 - index, "base_map": 95.0}
    callback.on_session_end(VIEW, {**result, "new_map": None, "ap": {"cat": 80.0}})


def steps_of(rows: list[tuple[int, str, float]], tag: str) -> list[int]:
    return [step for step, name, _ in rows if name == tag]


def test_unknown_trackers_and_missing_packages_are_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="train.trackers: unknown tracker 'tensorbord'; known:"):
        check_trackers(["tensorbord"])
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name)
    )
    with pytest.raises(ConfigError, match=r"'wandb'.*pip install 'mlcil\[wandb\]'"):
        check_trackers(["csv", "wandb"])
    # The run stops before any training: the callbacks are made first.
    train = TrainConfig(trackers=["csv", "wandb"], progress=False)
    with pytest.raises(ConfigError, match=r"mlcil\[wandb\]"):
        run_callbacks(RunDir(tmp_path), train, is_main=True)
    check_trackers(["csv", "tensorboard"])  # installed: no error


def test_the_older_tensorboard_switch_still_turns_it_off(tmp_path: Path) -> None:
    # The default needs no package beyond the base install.
    assert active_trackers(TrainConfig()) == ["csv"]
    assert active_trackers(TrainConfig(tensorboard=False)) == ["csv"]
    assert active_trackers(TrainConfig(tensorboard=False, trackers=["tensorboard"])) == []
    assert active_trackers(TrainConfig(tensorboard=False, trackers=["tensorboard", "csv"])) == [
        "csv"
    ]
    run = RunDir(tmp_path)
    off = TrainConfig(tensorboard=False, trackers=["tensorboard"])
    for train, tracking in ((TrainConfig(), True), (off, False)):
        callbacks = run_callbacks(run, train, is_main=True)
        kinds = [type(c).__name__ for c in callbacks]
        for callback in callbacks:
            callback.teardown(VIEW)
        assert ("TrackingCallback" in kinds) == tracking
    assert run_callbacks(run, TrainConfig(), is_main=False) == []  # rank > 0


def test_the_global_step_runs_on_across_sessions(
    recording: list[Recording], tmp_path: Path
) -> None:
    observer = TrackingCallback(["recording"], RunDir(tmp_path / "run"), TrainConfig())
    session_of(observer, 0, epochs=2, steps=3)
    session_of(observer, 1, epochs=1, steps=2)
    observer.teardown(VIEW)
    (tracker,) = recording
    rows = tracker.rows
    assert steps_of(rows, "train/loss") == [1, 2, 3, 4, 5, 6, 7, 8]  # no restart at session 1
    assert [v for s, t, v in rows if t == "train/lr"][:4] == pytest.approx([0.1, 0.2, 0.3, 0.1])
    assert steps_of(rows, "train_epoch/loss") == [3, 6, 8]
    # Session metrics sit at the session's last step; base/new only where measured.
    assert steps_of(rows, "eval/seen_map") == [6, 8]
    assert steps_of(rows, "eval/new_map") == []
    assert steps_of(rows, "eval_ap/cat") == [6, 8] and steps_of(rows, "eval/session") == [6, 8]
    assert tracker.closed and tracker.target.config == {"train": TrainConfig().model_dump()}


def test_the_global_step_survives_resume(recording: list[Recording], tmp_path: Path) -> None:
    train = TrainConfig(batch_size=16, base_epochs=2, epochs=1)
    straight = TrackingCallback(["recording"], RunDir(tmp_path / "straight"), train)
    # Session 0: 40 images in batches of 16 = 3 steps per epoch, 2 epochs.
    session_of(straight, 0, epochs=2, steps=3)
    session_of(straight, 1, epochs=1, steps=2)
    # A second process resumes another run after session 0: the checkpoint holds its results.
    run = RunDir(tmp_path / "resumed")
    folder = run.checkpoints / "session_00"
    folder.mkdir(parents=True)
    results = [{"index": 0, "train_images": 30, "memory_images": 10}]
    (folder / "state.json").write_text(json.dumps({"results": results}))
    (run.checkpoints / "latest").write_text("session_00\n")
    resumed = TrackingCallback(["recording"], run, train)
    session_of(resumed, 1, epochs=1, steps=2)
    first, second = recording
    session_1 = [row for row in first.rows if row[0] > 6]
    assert second.rows == session_1 and steps_of(second.rows, "train/loss") == [7, 8]


def test_a_failing_tracker_is_switched_off_and_the_others_go_on(
    recording: list[Recording],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(Tracker):
        calls = 0

        def log(self, scalars: Mapping[str, float], step: int) -> None:
            Broken.calls += 1
            raise OSError("disk full")

    monkeypatch.setitem(trackers.TRACKERS, "broken", TrackerSpec(lambda target: Broken()))
    observer = TrackingCallback(["broken", "recording"], RunDir(tmp_path / "run"), TrainConfig())
    with caplog.at_level(logging.WARNING, logger="mlcil"):
        session_of(observer, 0, epochs=1, steps=2)
    assert "tracker broken failed (disk full); it is off" in caplog.text
    assert Broken.calls == 1  # not asked again
    assert steps_of(recording[0].rows, "train/loss") == [1, 2]


def test_learning_rates_are_the_ones_each_step_used() -> None:
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([{"params": [weight]}, {"params": [], "lr": 0.5}], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: 1.0 / (s + 1), lambda s: 1])
    rates = LearningRateLog(scheduler)
    used = []
    for _ in range(4):
        used.append(tuple(group["lr"] for group in optimizer.param_groups))
        optimizer.step()
        rates.step()  # what train_step calls after the optimiser step
    assert rates.take(3) == used[:3] and rates.take(5) == used[3:]
    assert used[1] == (0.05, 0.5)
    assert rates.state_dict() == scheduler.state_dict()  # the rest is the scheduler's own


def test_the_run_id_is_stable_until_the_run_is_replaced(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.mark()
    first = run_id(run)
    assert run_id(RunDir(tmp_path / "run")) == first and len(first) == 16
    run.marker.write_text('{"created": "later"}')  # what --overwrite does
    assert run_id(run) != first


def test_csv_tracker_appends_across_resume(tmp_path: Path) -> None:
    where = target(tmp_path)
    tracker = CsvTracker(where)
    tracker.log({"train/loss": 0.5, "train/lr": 1e-4}, 1)
    tracker.close()
    again = CsvTracker(where)  # a resumed run
    again.log({"train/loss": 0.25}, 2)
    again.close()
    with open(where.folder / "scalars.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", "tag", "value", "wall_time"]
    assert [r[:3] for r in rows[1:]] == [
        ["1", "train/loss", "0.5"],
        ["1", "train/lr", "0.0001"],
        ["2", "train/loss", "0.25"],
    ]
    with open(where.folder / "params.csv", newline="") as handle:
        params = dict(csv.reader(handle))
    assert params["train.batch_size"] == "16" and params["train.trackers"] == '["csv"]'


def test_tensorboard_tracker_writes_the_global_steps(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    where = target(tmp_path)
    tracker = TensorBoardTracker(where)
    for step in (1, 2, 7):
        tracker.log({"train/lr": 0.01 * step}, step)
    tracker.close()
    events = EventAccumulator(str(where.tensorboard_dir))
    events.Reload()
    scalars = events.Scalars("train/lr")
    assert [e.step for e in scalars] == [1, 2, 7]
    assert [e.value for e in scalars] == pytest.approx([0.01, 0.02, 0.07])
    assert "config" in "".join(events.Tags()["tensors"])


@pytest.fixture
def offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """W&B offline, its settings and caches inside tmp_path: nothing leaves the machine."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)


def test_wandb_offline_run_is_written_in_the_run_folder(
    offline_wandb: None, tmp_path: Path
) -> None:
    where = target(tmp_path)
    tracker = WandbTracker(where)
    tracker.log({"train/lr": 0.001, "train/loss": 2.5}, 1)
    tracker.log({"eval/seen_map": 88.5}, 2)
    tracker.close()
    import wandb

    wandb.teardown()  # the W&B service writes the run's records by the time it has stopped
    (folder,) = (where.folder / "wandb").glob("offline-run-*-abc123")
    (records,) = folder.glob("run-abc123.wandb")
    content = records.read_bytes()
    for text in (b"train/lr", b"eval/seen_map", b"global_step", b"tiny_run", b"batch_size"):
        assert text in content, text


def test_mlflow_run_in_a_local_store_continues_on_resume(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    where = target(tmp_path)
    first = MlflowTracker(where)
    first.log({"train/lr": 0.001, "eval_ap/traffic light?": 50.0}, 1)
    first.close()
    second = MlflowTracker(where)  # the resumed run
    second.log({"train/lr": 0.002}, 2)
    second.close()
    store = where.folder / "mlflow" / "mlflow.db"
    assert store.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("mlcil")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == first.run_id == second.run_id
    history = client.get_metric_history(run.info.run_id, "train/lr")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.001), (2, 0.002)]
    assert run.data.metrics["eval_ap/traffic light_"] == 50.0  # '?' is not allowed in a name
    assert run.data.params["train.batch_size"] == "16" and run.data.tags["mlcil.run_id"] == "abc123"
    artifacts = where.folder / "mlflow" / "artifacts"
    assert "batch_size: 16" in next(artifacts.rglob("resolved-config.yaml")).read_text()


def test_mlflow_file_store_uri_inside_the_run_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    where = target(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (where.folder / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 deprecates the file store
    tracker = MlflowTracker(where)
    tracker.log({"train/loss": 0.75}, 3)
    tracker.close()
    (metric,) = (where.folder / "mlruns").rglob("metrics/train/loss")
    value, step = metric.read_text().split()[1:3]
    assert float(value) == 0.75 and step == "3"

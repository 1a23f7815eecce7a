"""The method surface, driven by the engine with a method defined here on an in-memory source:
the step and epoch hooks, an extra phase on held-out rows, exemplar data stored and replayed,
the prediction hook before evaluation, method tensors in checkpoints, and resume."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mlcil.config.schema import ModelConfig, TrainConfig
from mlcil.data.base import ArrayImageSource, ImageSource
from mlcil.data.catalog import DATASETS, DatasetSpec
from mlcil.engine.callbacks import (
    Callback,
    Observer,
    RunView,
    SessionCallback,
    StepRecord,
    as_callback,
)
from mlcil.engine.checkpoint import restore_run
from mlcil.errors import ConfigError
from mlcil.experiment import load_config
from mlcil.methods.base import (
    Batch,
    EpochInfo,
    ExemplarSet,
    ExtraPhase,
    Method,
    Optimization,
    SessionContext,
    StepInfo,
    StepOutput,
)
from mlcil.methods.registry import METHODS, register_method
from mlcil.models.base import IncrementalNetwork, NetworkOutput
from mlcil.protocol import Session
from tiny import experiment_of, in_memory_context, trainer_of

CLASSES = 4


def split(config: Any, name: str) -> ImageSource:
    """24 training / 12 test images of 8x8 pixels; every class has positives in both."""
    rng = np.random.default_rng(0 if name == "train" else 1)
    count = 24 if name == "train" else 12
    labels = (rng.random((count, CLASSES)) < 0.4).astype(np.uint8)
    labels[np.arange(count), np.arange(count) % CLASSES] = 1
    images = rng.integers(0, 256, size=(count, 8, 8, 3), dtype=np.uint8)
    names = [f"c{i}" for i in range(CLASSES)]
    return ArrayImageSource(
        dataset="memory", split=name, class_names=names, images=images, labels=labels
    )


class Tiny(IncrementalNetwork):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 5, kernel_size=3, padding=1))  # type: ignore[arg-type]

    def _make_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(5, num_classes)

    def forward(self, images: torch.Tensor, stage_indices: Any = None) -> NetworkOutput:
        pooled = self.backbone(images).mean(dim=(2, 3))
        return NetworkOutput(self.classify(pooled[:, None]), pooled[:, None], pooled)


class Surface(Method):
    """Fine-tuning that uses every optional hook and records how the engine calls them."""

    name = "test-surface"
    needs_memory = True
    stores_exemplar_data = True
    log: ClassVar[list[tuple[Any, ...]]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.ones(()))  # the extra phase's own parameter
        self.marker = torch.zeros(0)

    @classmethod
    def build_network(
        cls, model: ModelConfig, image_size: int, load_weights: bool = True
    ) -> IncrementalNetwork:
        return Tiny()

    def begin_session(self, context: SessionContext) -> None:
        self.log.append(("begin", context.session.index, len(context.train_set)))
        super().begin_session(context)

    def configure_optimization(
        self, train: TrainConfig, session: Session, total_steps: int
    ) -> Optimization:
        optimizer = torch.optim.SGD(self.network.parameters(), lr=0.05)
        return Optimization(optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, 0))

    def training_step(self, batch: Batch) -> StepOutput:
        data = batch.exemplar_data
        replayed = None if data is None else data[torch.isfinite(data).all(dim=1)].tolist()
        self.log.append(("step", len(batch.images), self.network.training, replayed))
        logits = self.network(batch.images).logits
        loss = self.classification_loss(logits, batch.targets[:, : self.seen])
        return StepOutput(loss, {"asl": loss.detach()})

    def after_step(self, step: StepInfo) -> None:
        self.log.append(("after_step", step.phase, step.epoch, step.step, step.steps))

    def after_epoch(self, epoch: EpochInfo) -> None:
        self.log.append(("after_epoch", epoch.phase, epoch.epoch, epoch.epochs))

    def extra_phase(self, context: SessionContext) -> ExtraPhase | None:
        if self.num_old == 0:
            return None
        own = context.own_images
        assert own is not None and len(context.exemplar_rows)
        return ExtraPhase("calibrate", np.array([0, own]), epochs=2)  # one own row, one exemplar

    def configure_phase_optimization(
        self, phase: ExtraPhase, train: TrainConfig, session: Session, total_steps: int
    ) -> Optimization:
        optimizer = torch.optim.SGD([self.scale], lr=0.001)
        return Optimization(optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, 0))

    def phase_step(self, phase: ExtraPhase, batch: Batch) -> StepOutput:
        self.log.append(("phase_step", len(batch.images), self.network.training))
        with torch.no_grad():
            logits = self.network(batch.images).logits
        targets = batch.targets[:, : self.seen]
        loss = F.binary_cross_entropy_with_logits(self.scale * logits, targets)
        return StepOutput(loss, {"calibration": loss.detach()})

    @torch.no_grad()
    def exemplar_data(self, images: torch.Tensor) -> torch.Tensor:
        means = images.mean(dim=(1, 2, 3))
        return torch.stack([means, torch.full_like(means, float(self.seen))], dim=1)

    def prepare_prediction(self, exemplars: ExemplarSet) -> None:
        self.log.append(("prepare", exemplars.positions.tolist(), tuple(exemplars.targets.shape)))
        self.marker = torch.tensor(exemplars.positions, dtype=torch.float32)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.log.append(("predict",))
        return self.scale.detach() * self.network(images).logits

    def end_session(self, context: SessionContext) -> None:
        self.log.append(("end", context.session.index))
        super().end_session(context)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": float(self.scale.detach())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = nn.Parameter(torch.tensor(state["scale"]))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"marker": self.marker}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.marker = tensors["marker"]


@pytest.fixture
def surface(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(DATASETS, "memory", DatasetSpec("memory", split))
    register_method(Surface)
    Surface.log.clear()
    yield
    METHODS.pop(Surface.name)


def config(*overrides: str) -> Any:
    settings = ["data.dataset=memory", "data.image_size=8", "data.augment=[]"]
    settings += ["data.num_workers=0", "protocol=B0-C2", "method.name=test-surface"]
    settings += ["memory.per_class=2", "train.epochs=2", "train.batch_size=4"]
    settings += ["train.progress=false", "train.tensorboard=false", "train.diagnostics=false"]
    return load_config(None, [*settings, *overrides])


def events(kind: str) -> list[tuple[Any, ...]]:
    return [entry for entry in Surface.log if entry[0] == kind]


def test_hooks_phases_and_exemplar_data_as_the_engine_calls_them(
    surface: None, tmp_path: Path
) -> None:
    metrics = trainer_of(config(), run_dir=tmp_path / "run").run()
    assert metrics is not None
    kinds = [entry[0] for entry in Surface.log]
    # Session 1: the main fit, then the phase, then the prediction hook, evaluation, the end.
    second = kinds[kinds.index("end") + 1 :]
    assert second.index("phase_step") > max(i for i, k in enumerate(second) if k == "step")
    assert second.index("prepare") > second.index("phase_step")
    assert second.index("predict") > second.index("prepare") and second[-1] == "end"

    total = events("begin")[1][2]  # session 1's own images + exemplars
    steps = [e for e in Surface.log if e[0] == "step"]
    session1 = steps[len(steps) - 2 * -(-(total - 2) // 4) :]
    # The main fit never sees the 2 held-out rows; the phase sees only them, network frozen.
    assert sum(e[1] for e in session1) == 2 * (total - 2)
    assert all(e[2] for e in steps) and [e[1:] for e in events("phase_step")] == [(2, False)] * 2

    # Every step is followed by its hook; the phase's epochs are numbered after the main fit's.
    assert len(events("after_step")) == len(steps) + 2
    epochs = [e[1:] for e in events("after_epoch")]
    assert epochs == [
        ("main", 0, 2), ("main", 1, 2), ("main", 0, 2), ("main", 1, 2),
        ("calibrate", 2, 4), ("calibrate", 3, 4),
    ]  # fmt: skip

    # Exemplar data: stored after session 0 (2 seen classes), replayed in session 1's batches.
    memory = json.loads((tmp_path / "run/checkpoints/session_00/memory.json").read_text())
    stored = load_file(str(tmp_path / "run/checkpoints/session_00/memory.safetensors"))
    positions = [entry["index"] for entry in memory["exemplars"]]
    assert sorted(int(p) for p in stored) == positions
    assert all(float(row[1]) == 2.0 for row in stored.values())
    replayed = [row for e in session1 for row in e[3]]
    assert len(replayed) == 2 * (len(positions) - 1)  # one exemplar row is held out
    assert all(row[1] == 2.0 for row in replayed)
    assert events("step")[0][3] is None  # session 0: no exemplar data yet

    # The prediction hook sees the memory after the session's update; its tensors are saved.
    assert events("prepare")[0][1:] == (positions, (len(positions), 2))
    marker = load_file(str(tmp_path / "run/checkpoints/session_00/method.safetensors"))["marker"]
    assert marker.tolist() == positions


def test_restore_and_resume_keep_method_tensors_and_exemplar_data(
    surface: None, tmp_path: Path
) -> None:
    straight = trainer_of(config(), run_dir=tmp_path / "straight").run()
    assert trainer_of(config(), run_dir=tmp_path / "split").run(max_sessions=1) is None
    folder = tmp_path / "split/checkpoints/session_00"
    state = restore_run(experiment_of(config()).inputs, folder)
    assert isinstance(state.method, Surface)
    assert state.method.marker.tolist() == sorted(state.memory.labels)
    assert state.memory.data and set(state.memory.data) == set(state.memory.labels)
    resumed = trainer_of(config(), run_dir=tmp_path / "split", resume=True).run()
    assert straight is not None and resumed is not None
    straight, resumed = straight.plain(), resumed.plain()  # as metrics.json holds them

    def comparable(metrics: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in s.items() if k != "train_time_s"} for s in metrics["sessions"]]

    assert comparable(resumed) == comparable(straight)
    assert resumed["sessions"][1]["method_state"]["scale"] != 1.0  # the phase learned


def test_a_phase_holding_out_every_row_is_refused(
    surface: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def everything(self: Surface, context: SessionContext) -> ExtraPhase | None:
        rows = np.arange(len(context.train_set))
        return ExtraPhase("all", rows, epochs=1) if self.num_old else None

    monkeypatch.setattr(Surface, "extra_phase", everything)
    with pytest.raises(ConfigError, match=r"extra phase 'all'.*fewer than all \(held out\)"):
        trainer_of(config(), run_dir=tmp_path / "run").run()


def test_a_phase_that_holds_nothing_out_follows_a_main_fit_on_every_row(
    surface: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def again(self: Surface, context: SessionContext) -> ExtraPhase | None:
        rows = np.arange(len(context.train_set))  # every row: refused when held out
        return ExtraPhase("again", rows, epochs=1, holds_out=False) if self.num_old else None

    monkeypatch.setattr(Surface, "extra_phase", again)
    assert trainer_of(config(), run_dir=tmp_path / "run").run() is not None
    total = events("begin")[1][2]  # session 1's own images + exemplars
    steps = events("step")
    session1 = steps[len(steps) - 2 * -(-total // 4) :]  # 2 epochs of batches of 4
    assert sum(e[1] for e in session1) == 2 * total  # the main fit saw every row
    assert sum(e[1] for e in events("phase_step")) == total  # and the phase saw them again
    epochs = [e[1:] for e in events("after_epoch")][-3:]
    assert epochs == [("main", 0, 2), ("main", 1, 2), ("again", 2, 3)]


class EditedGradients(Surface):
    """Replaces every gradient by a constant before the optimiser steps."""

    seen_gradients: ClassVar[list[bool]] = []

    def before_optimizer_step(
        self, optimizer: torch.optim.Optimizer, batches: Sequence[Batch]
    ) -> None:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        # Called after the backward passes: every parameter the loss reaches has a gradient.
        self.seen_gradients.append(all(p.grad is not None for p in parameters))
        assert len(batches) == 2  # the step's two micro-batches
        for parameter in parameters:
            parameter.grad = torch.full_like(parameter, 0.5)


def test_before_optimizer_step_edits_the_gradients_the_step_uses() -> None:
    from mlcil.config.schema import LossConfig
    from mlcil.engine.fit import train_step

    sessions = [Session(0, [0, 1], [0, 1])]
    labels = np.eye(2, dtype=np.uint8)[np.arange(8) % 2]
    context = in_memory_context(sessions[0], sessions, labels, image_size=8, batch_size=4)
    EditedGradients.seen_gradients.clear()
    method = EditedGradients(Surface.Params(), Tiny(), LossConfig())
    method.begin_session(context)
    optimization = method.configure_optimization(TrainConfig(), sessions[0], 1)  # SGD, lr 0.05
    before = [p.detach().clone() for p in method.network.parameters()]
    loader = torch.utils.data.DataLoader(context.training_data(), batch_size=4)
    batches = [Batch.from_items(items) for items in loader]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(method, batches, optimization, scaler, context)
    assert EditedGradients.seen_gradients == [True]
    for old, new in zip(before, method.network.parameters(), strict=True):
        # The step used the edited gradient (0.5 everywhere), not the loss's own.
        assert torch.allclose(new.detach(), old - 0.05 * 0.5)


class Recorder(Callback):
    """Records every hook with what the run view shows at that moment."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_session_start(self, run: RunView, session: Session, summary: str, resumed: bool) -> None:
        assert run.state is not None and run.folder is not None
        self.calls.append(("session_start", session.index, run.state.next_session, resumed))

    def on_epoch_start(
        self, run: RunView, session: Session, epoch: int, epochs: int, steps: int
    ) -> None:
        self.calls.append(("epoch_start", session.index, epoch))

    def on_train_batch_end(self, run: RunView, record: StepRecord) -> None:
        self.calls.append(("batch_end", record.session.index, record.session_step))

    def on_epoch_end(
        self, run: RunView, session: Session, epoch: int, epochs: int, means: dict[str, float]
    ) -> None:
        self.calls.append(("epoch_end", session.index, epoch))

    def on_session_evaluated(
        self, run: RunView, session: Session, own: np.ndarray, result: dict[str, Any]
    ) -> None:
        result["recorded_by"] = "callback"  # a callback may add to the session's entry
        self.calls.append(("evaluated", session.index, len(run.data.class_names)))

    def on_session_end(self, run: RunView, result: dict[str, Any]) -> None:
        self.calls.append(("session_end", result["index"], result["recorded_by"]))

    def on_checkpoint_saved(self, run: RunView, folder: Path) -> None:
        self.calls.append(("checkpoint", folder.name))

    def on_metrics_header(self, run: RunView, header: dict[str, Any]) -> None:
        header["by_callback"] = True

    def teardown(self, run: RunView) -> None:
        self.calls.append(("teardown",))


class OlderObserver(Observer):
    def __init__(self) -> None:
        self.steps = 0
        self.records = 0
        self.closed = False

    def step_finished(self, *args: Any) -> None:
        self.steps += 1

    def step_recorded(self, record: StepRecord) -> None:
        self.records += 1

    def close(self) -> None:
        self.closed = True


class OlderSessionCallback(SessionCallback):
    def __init__(self) -> None:
        self.started: list[int] = []
        self.headers = 0

    def session_starting(self, run: Any, state: Any, session: Session, resumed: bool) -> None:
        self.started.append(session.index)

    def header_ready(self, header: dict[str, Any]) -> None:
        self.headers += 1


def test_one_callback_vocabulary_with_a_read_only_view_and_the_older_kinds_adapted(
    surface: None, tmp_path: Path
) -> None:
    recorder, observer, older = Recorder(), OlderObserver(), OlderSessionCallback()
    trainer = trainer_of(config(), tmp_path / "run", observers=[observer], callbacks=[older])
    trainer.extra_callbacks.append(recorder)  # after the older ones
    metrics = trainer.run()
    assert metrics is not None and metrics.plain()["by_callback"] is True
    kinds = [call[0] for call in recorder.calls]
    assert kinds[0] == "session_start" and kinds[-1] == "teardown"
    assert recorder.calls[0] == ("session_start", 0, 0, False)
    # Session 0: 2 epochs (each opened and closed), its steps, evaluation, end, checkpoint.
    first = kinds[: kinds.index("checkpoint") + 1]
    assert first.count("epoch_start") == first.count("epoch_end") == 2
    assert first[-3:] == ["evaluated", "session_end", "checkpoint"]
    assert ("session_end", 1, "callback") in recorder.calls  # the entry the callback added to
    assert ("evaluated", 0, CLASSES) in recorder.calls
    batches = kinds.count("batch_end")
    # The older observer hears every step twice over (both of its step notifications) and is
    # closed; the older session callback hears each session start and each metrics.json header
    # (after session 0, marked unfinished, and at the end).
    assert observer.steps == observer.records == batches and observer.closed
    assert older.started == [0, 1] and older.headers == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        trainer.view.runtime = None  # type: ignore[misc]
    with pytest.raises(TypeError, match="is not a callback: subclass mlcil.engine.callbacks"):
        as_callback(object())  # type: ignore[arg-type]

"""The engine driven by methods defined here, on an in-memory source: hook order, a method's own
network and optimisation, the non-finite-loss guard, frozen parameters and resume."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mlcil.config.schema import ModelConfig, Params, TrainConfig
from mlcil.data.base import ArrayImageSource, ImageSource
from mlcil.data.catalog import DATASETS, DatasetSpec
from mlcil.errors import TrainingError
from mlcil.experiment import load_config
from mlcil.methods.base import Batch, Method, Optimization, SessionContext, StepOutput
from mlcil.methods.registry import METHODS, register_method
from mlcil.models.base import IncrementalNetwork, NetworkOutput
from mlcil.protocol import Session
from tiny import trainer_of

NUM_CLASSES = 4


def memory_split(config: Any, split: str) -> ImageSource:
    """24 training / 12 test images of 8x8 pixels; every class has positives in both."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    count = 24 if split == "train" else 12
    labels = (rng.random((count, NUM_CLASSES)) < 0.5).astype(np.uint8)
    labels[np.arange(count), np.arange(count) % NUM_CLASSES] = 1
    images = rng.integers(0, 256, size=(count, 8, 8, 3), dtype=np.uint8)
    return ArrayImageSource(
        dataset="memory",
        split=split,
        class_names=[f"c{i}" for i in range(NUM_CLASSES)],
        images=images,
        labels=labels,
    )


class TinyNetwork(IncrementalNetwork):
    """A network that is not in the network registry: one conv as its backbone."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 6, kernel_size=3, padding=1))  # type: ignore[arg-type]

    def _make_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(6, num_classes)

    def forward(self, images: torch.Tensor, stage_indices: Any = None) -> NetworkOutput:
        pooled = self.backbone(images).mean(dim=(2, 3))  # (B, 6)
        embeddings = pooled[:, None, :]
        return NetworkOutput(self.classify(embeddings), embeddings, pooled)


class RecordingParams(Params):
    nan_at_session: int = -1  # make the loss NaN at the 2nd step of this session


class RecordingMethod(Method):
    """Fine-tuning that records the engine's calls, with its own network and plain SGD."""

    name = "test-recording"
    Params = RecordingParams
    calls: ClassVar[list[str]] = []

    @classmethod
    def build_network(
        cls, model: ModelConfig, image_size: int, load_weights: bool = True
    ) -> IncrementalNetwork:
        cls.calls.append("build_network")
        return TinyNetwork()

    def begin_session(self, context: SessionContext) -> None:
        self.calls.append(f"begin_session {context.session.index}")
        self.steps_in_session = 0
        super().begin_session(context)

    def configure_optimization(
        self, train: TrainConfig, session: Session, total_steps: int
    ) -> Optimization:
        self.calls.append(f"configure_optimization {session.index} steps={total_steps}")
        self.weights_before_fit = {k: v.clone() for k, v in self.network.state_dict().items()}
        optimizer = torch.optim.SGD(self.network.parameters(), lr=train.lr_for(session.index))
        constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return Optimization(optimizer, constant, grad_clip_norm=train.grad_clip_norm)

    def training_step(self, batch: Batch) -> StepOutput:
        self.calls.append("training_step")
        self.steps_in_session += 1
        logits = self.network(batch.images).logits
        loss = self.classification_loss(logits, batch.targets[:, : self.seen])
        session = self.session.index if self.session is not None else -1
        if session == self.params.nan_at_session and self.steps_in_session == 2:
            loss = loss * float("nan")
        return StepOutput(loss, {"asl": loss.detach()})

    def end_session(self, context: SessionContext) -> None:
        self.calls.append(f"end_session {context.session.index}")
        super().end_session(context)


@pytest.fixture
def engine_setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Register the in-memory dataset and the recording method for one test."""
    monkeypatch.setitem(DATASETS, "memory", DatasetSpec("memory", memory_split))
    register_method(RecordingMethod)
    RecordingMethod.calls.clear()
    yield
    METHODS.pop(RecordingMethod.name)


def config(*overrides: str) -> Any:
    return load_config(
        None,
        [
            "data.dataset=memory",
            "data.image_size=8",
            "data.augment=[]",
            "data.num_workers=0",
            "protocol=B0-C2",
            "method.name=test-recording",
            "train.epochs=2",
            "train.batch_size=8",
            "train.lr=0.05",
            "train.incremental_lr=0.05",
            "train.progress=false",
            "train.tensorboard=false",
            *overrides,
        ],
    )


def test_hooks_run_in_order_with_the_methods_own_network_and_optimiser(
    engine_setup: None, tmp_path: Path
) -> None:
    metrics = trainer_of(config(), run_dir=tmp_path / "run").run()
    assert metrics is not None and [s.num_seen for s in metrics.sessions] == [2, 4]
    calls = [c for c in RecordingMethod.calls if c != "training_step"]
    # 24 images hold each pair of classes; 2 epochs of ceil(n / 8) steps per session.
    steps = [int(c.split("steps=")[1]) for c in calls if c.startswith("configure")]
    assert calls == [
        "build_network",
        "begin_session 0",
        f"configure_optimization 0 steps={steps[0]}",
        "end_session 0",
        "begin_session 1",
        f"configure_optimization 1 steps={steps[1]}",
        "end_session 1",
    ]
    assert RecordingMethod.calls.count("training_step") == sum(steps)
    assert steps[0] == 2 * -(-(metrics.sessions[0].train_images or 0) // 8)


def test_gradient_clipping_of_the_methods_optimisation_bounds_each_step(
    engine_setup: None, tmp_path: Path
) -> None:
    # SGD with lr 0.05: an update is lr x gradient, so clipping the gradient norm to 1e-3 bounds
    # every parameter change by 5e-5 in norm. Without clipping the first step moves far more.
    def first_step_change(run: str, *overrides: str) -> float:
        settings = config("train.epochs=1", "train.batch_size=64", *overrides)
        trainer = trainer_of(settings, tmp_path / run)
        trainer.run(max_sessions=1)
        assert trainer.state is not None
        method = trainer.state.method
        assert isinstance(method, RecordingMethod)
        after = method.network.state_dict()
        before = method.weights_before_fit
        return float(torch.cat([(after[k] - v).flatten() for k, v in before.items()]).norm())

    assert first_step_change("clipped", "train.grad_clip_norm=0.001") <= 0.05 * 0.001 + 1e-7
    assert first_step_change("free") > 0.05 * 0.001 * 10


def test_a_non_finite_loss_stops_before_the_weights_change(
    engine_setup: None, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    trainer = trainer_of(config("method.nan_at_session=1"), run_dir=run_dir)
    with pytest.raises(TrainingError, match=r"session 1 epoch 1 step 1: the loss is nan"):
        trainer.run()
    # The first session's checkpoint stays the latest; nothing of session 1 was saved.
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "session_00"
    assert not (run_dir / "checkpoints" / "session_01").exists()
    # The guard fired before backward: no NaN reached the weights.
    assert trainer.state is not None
    assert all(p.isfinite().all() for p in trainer.state.method.network.parameters())


def test_old_heads_stay_frozen_and_resume_equals_an_uninterrupted_run(
    engine_setup: None, tmp_path: Path
) -> None:
    straight = trainer_of(config(), run_dir=tmp_path / "straight").run()
    first = load_file(str(tmp_path / "straight/checkpoints/session_00/model.safetensors"))
    last = load_file(str(tmp_path / "straight/checkpoints/session_01/model.safetensors"))
    # The session-0 head is frozen during session 1; the shared backbone keeps learning.
    for key in ("heads.0.weight", "heads.0.bias"):
        assert torch.equal(first[key], last[key]), key
    assert not torch.equal(first["backbone.weight"], last["backbone.weight"])

    assert trainer_of(config(), run_dir=tmp_path / "split").run(max_sessions=1) is None
    resumed = trainer_of(config(), run_dir=tmp_path / "split", resume=True).run()
    assert straight is not None and resumed is not None
    straight, resumed = straight.plain(), resumed.plain()  # as metrics.json holds them
    for key in ("sessions", "final", "avg_map", "last_map"):
        if key == "sessions":
            strip = [{k: v for k, v in s.items() if k != "train_time_s"} for s in straight[key]]
            again = [{k: v for k, v in s.items() if k != "train_time_s"} for s in resumed[key]]
            assert strip == again
        else:
            assert straight[key] == resumed[key]
    saved = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert saved["last_map"] == straight["last_map"]

"""Data-parallel training through the real engine and KRT: 2 gloo processes against 1 process.

The network's batch norms are frozen (eval mode, a test observer) and augmentation is off, so that
what a process computes for an image does not depend on which other images share its batch; the
learning rate is ~0 so that the sampler's padding (a partial last batch read twice) cannot move
the weights. What is left to differ is exactly what data parallelism could break:

- the evaluation (gathered in dataset order) equals one process scoring the same weights;
- the DPL threshold (from every rank's scores) and the exemplar memory (rank 0, broadcast);
- the gradient of one global batch of 16: 1 process x 16, 1 process x 2 accumulation steps of 8
  and 2 processes x 8 (DDP) give the same gradient (the batch-independent objective).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from mlcil.config.schema import RunConfig
from mlcil.data.base import ArrayImageSource, ImageSource
from mlcil.data.catalog import DATASETS, DatasetSpec
from mlcil.distributed import DistributedContext
from mlcil.engine.checkpoint import latest_checkpoint, restore_run
from mlcil.engine.fit import (
    BatchLayout,
    FitPosition,
    optimizer_steps,
    train_step,
    training_network,
)
from mlcil.engine.loop import Trainer
from mlcil.engine.observers import Observer
from mlcil.experiment import load_config
from mlcil.methods.base import Batch, SessionContext
from mlcil.protocol import Session
from spawn import free_port, join_as_torchrun
from tiny import experiment_of, trainer_of

NUM_CLASSES = 6
_WORLD = 2
_DEADLINE_S = 240.0


def memory_split(config: Any, split: str) -> ImageSource:
    """45 training / 24 test images of 16x16 pixels, 6 classes, each with positives."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    count = 45 if split == "train" else 24
    labels = (rng.random((count, NUM_CLASSES)) < 0.3).astype(np.uint8)
    labels[np.arange(count), np.arange(count) % NUM_CLASSES] = 1
    images = rng.integers(0, 256, size=(count, 16, 16, 3), dtype=np.uint8)
    names = [f"c{i}" for i in range(NUM_CLASSES)]
    return ArrayImageSource(
        dataset="pmemory", split=split, class_names=names, images=images, labels=labels
    )


def run_config(run_dir: Path) -> RunConfig:
    DATASETS["pmemory"] = DatasetSpec("pmemory", memory_split)
    return load_config(
        None,
        [
            "data.dataset=pmemory",
            "data.image_size=32",
            "data.augment=[]",
            "data.num_workers=0",
            "protocol=B0-C2",
            "model.backbone=resnet18",
            "model.feature_stage=2",
            "model.pretrained=null",
            "model.embed_dim=16",
            "model.num_heads=2",
            "method.name=krt",
            "method.token_loss_weight=3",
            "memory.per_class=2",
            "loss.reference_images=16",
            "train.epochs=2",
            "train.checkpoint_every_epochs=1",
            "train.batch_size=16",
            "train.lr=1e-20",
            "train.incremental_lr=1e-20",
            "train.device=cpu",
            "train.progress=false",
            "train.tensorboard=false",
            f"output_dir={run_dir}",
            "name=run",
        ],
    )


class FrozenBatchNorm(Observer):
    """Puts every batch norm of the trained network in eval mode at each epoch's start, and
    keeps a copy of session 1's mid-session checkpoint (written inside the DDP-wrapped fit)."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def epoch_started(self, session: Session, epoch: int, epochs: int, steps: int) -> None:
        trainer = self.trainer
        assert trainer is not None and trainer.state is not None
        freeze_batch_norm(trainer.state.method.network)
        if session.index == 1 and epoch == 1 and trainer.runtime.is_main:
            folder = latest_checkpoint(trainer.run_dir)
            assert folder is not None and folder.name == "session_01_epoch_001_step_000000"
            shutil.copytree(folder, trainer.run_dir.parent / f"mid_{trainer.run_dir.name}")


def freeze_batch_norm(network: nn.Module) -> None:
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.eval()


def first_step_gradients(trainer: Trainer, accumulation: int) -> dict[str, Any]:
    """Begin the next session and return the gradient of its first global batch (and the DPL
    threshold), computed by the engine's own step on this process's layout."""
    data, state = trainer.inputs.data, trainer.state
    assert state is not None
    method, runtime = state.method, trainer.runtime
    session = data.sessions[state.next_session]
    train_set, _ = data.train_set(session, state.memory)
    sessions = list(data.sessions)
    context = SessionContext(session, sessions, train_set, data.train_source, runtime, 0, 8)
    # With lr ~0 the layouts' runs leave their zero-initialised weights (timm's last batch norm
    # of every residual block) at different +-1e-20, which flips ReLU gates that sit exactly at
    # 0: the gradient is compared at generic weights, the same in every layout.
    assert method.old_network is not None
    for seed, network in enumerate((method.network, method.old_network)):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    torch.manual_seed(0)  # the new head's initial weights
    method.begin_session(context)
    runtime.synchronize_parameters(method.network)
    train = trainer.config.train.model_copy(update={"grad_accumulation": accumulation})
    layout = BatchLayout.of(train, runtime.world_size)
    optimization = method.configure_optimization(train, session, 10)
    with training_network(method, runtime):
        method.network.train()
        freeze_batch_norm(method.network)
        loader = runtime.loader(train_set, layout.micro_batch, True, seed=123)
        micro = next(optimizer_steps(loader, layout.accumulation))
        batches = [Batch(images, targets) for images, targets in micro]
        train_step(method, batches, optimization, runtime.grad_scaler(), context)
    gradients = {
        name: p.grad.detach().numpy().copy()
        for name, p in method.network.named_parameters()
        if p.requires_grad and p.grad is not None
    }
    return {"gradients": gradients, "threshold": method.state_dict()["pseudo_label_threshold"]}


def run_two_sessions(run_dir: Path) -> tuple[Trainer, dict[str, Any]]:
    observer = FrozenBatchNorm()
    trainer = trainer_of(run_config(run_dir), observers=[observer])
    observer.trainer = trainer
    trainer.run(max_sessions=2)
    assert trainer.state is not None
    summary = {
        "results": trainer.state.results,
        "memory": trainer.state.memory.to_dict(),
        "rank": trainer.runtime.rank,
        "world_size": trainer.runtime.world_size,
    }
    return trainer, summary


def _process_main(rank: int, port: int, run_dir: str, out_dir: str) -> None:
    join_as_torchrun(rank, _WORLD, port)
    context = DistributedContext.from_environment("cpu", datetime.timedelta(seconds=60))
    try:
        trainer, summary = run_two_sessions(Path(run_dir))
        step = first_step_gradients(trainer, accumulation=1)
        summary["threshold_next"] = step["threshold"]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(summary))
        np.savez(Path(out_dir, f"rank{rank}.npz"), **step["gradients"])
        context.barrier()
    finally:
        context.shutdown()


def _run_two_processes(run_dir: Path, out_dir: Path) -> None:
    processes = mp.start_processes(
        _process_main,
        args=(free_port(), str(run_dir), str(out_dir)),
        nprocs=_WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + _DEADLINE_S
    while not processes.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail(f"the 2-process run did not finish within {_DEADLINE_S} s")


def _close(a: Any, b: Any, path: str = "") -> None:
    """Recursive comparison: floats to 1e-4 (maps in percent), everything else equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-4), path
    else:
        assert a == b, path


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    _run_two_processes(tmp_path / "two", tmp_path)
    single, reference = run_two_sessions(tmp_path / "one")
    saved = copy.deepcopy(single.state)
    one_by_16 = first_step_gradients(single, accumulation=1)
    single.state = saved
    accumulated = first_step_gradients(single, accumulation=2)

    summaries = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(_WORLD)]
    assert [(s["rank"], s["world_size"]) for s in summaries] == [(0, 2), (1, 2)]
    for summary in summaries:
        # Equal evaluation (every map and AP), equal DPL threshold, equal memory.
        for mine, theirs in zip(summary["results"], reference["results"], strict=True):
            timing = {"train_time_s"}
            _close(
                {k: v for k, v in mine.items() if k not in timing},
                {k: v for k, v in theirs.items() if k not in timing},
            )
        assert summary["memory"] == reference["memory"]
        assert summary["threshold_next"] == pytest.approx(one_by_16["threshold"], abs=1e-6)
    assert reference["results"][1]["method_state"]["pseudo_label_threshold"] is not None

    # Equal first-step gradients: 2 processes x 8 and 1 process x 2 x 8 against 1 x 16.
    with np.load(tmp_path / "rank0.npz") as data:
        two_by_8 = dict(data)
    expected = one_by_16["gradients"]
    assert sorted(two_by_8) == sorted(expected) == sorted(accumulated["gradients"])
    assert len(expected) > 10
    layouts = {"2 x 8": two_by_8, "1 x 2 x 8": accumulated["gradients"]}
    differing = [
        (layout, name)
        for layout, gradients in layouts.items()
        for name in expected
        if not np.allclose(
            gradients[name], expected[name], rtol=1e-4, atol=1e-5 * np.abs(expected[name]).max()
        )
    ]
    assert differing == [], differing

    # A mid-session checkpoint written by the 2 processes restores into a plain network.
    restored = restore_run(
        experiment_of(run_config(tmp_path / "two")).inputs, tmp_path / "two" / "mid_run"
    )
    assert restored.resume is not None and restored.resume.position == FitPosition(1, 0)
    assert restored.next_session == 1 and restored.method.old_network is not None
    assert restored.resume.layout == [2, 1, 16]

    # Files are written by rank 0 only: one checkpoint per session, one log, one config.
    checkpoints = sorted(p.name for p in (tmp_path / "two" / "run" / "checkpoints").iterdir())
    assert checkpoints == ["latest", "session_00", "session_01"]


class SigtermAtLastStep(Observer):
    """Sends this process SIGTERM during the last step of session 0's last epoch."""

    def step_finished(
        self, session: Session, epoch: int, step: int, parts: dict[str, float], steps: int
    ) -> None:
        if session.index == 0 and epoch == 1 and step == steps - 1:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_at_a_sessions_last_step_resumes_without_losing_it(tmp_path: Path) -> None:
    config = run_config(tmp_path / "straight")
    straight = trainer_of(config)
    straight.run(max_sessions=2)
    stopped = trainer_of(run_config(tmp_path / "stopped"), observers=[SigtermAtLastStep()])
    assert stopped.run(max_sessions=2) is None
    assert stopped.stopped is not None and "SIGTERM in session 0, epoch 2" in stopped.stopped
    folder = latest_checkpoint(stopped.run_dir)
    assert folder is not None and folder.name == "session_00_epoch_002_step_000000"
    resumed = trainer_of(run_config(tmp_path / "stopped"), resume=True)
    resumed.run(max_sessions=2)
    assert straight.state is not None and resumed.state is not None

    def untimed(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "train_time_s"} for r in results]

    assert untimed(resumed.state.results) == untimed(straight.state.results)

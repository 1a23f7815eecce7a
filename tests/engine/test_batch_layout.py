"""How a global batch splits into processes and accumulation steps, and which checkpoints a
layout may resume."""

from __future__ import annotations

import pytest

from mlcil.config.schema import TrainConfig
from mlcil.engine.fit import (
    BatchLayout,
    FitPosition,
    FitResume,
    check_resume_layout,
    optimizer_steps,
)
from mlcil.errors import ConfigError


def test_layout_micro_batch_and_steps() -> None:
    layout = BatchLayout.of(TrainConfig(batch_size=128, grad_accumulation=2), world_size=2)
    assert layout.micro_batch == 32
    # 1000 images: 500 per process, 16 micro-batches of 32 (the last partial), 8 steps.
    assert layout.steps(1000) == 8
    assert BatchLayout.of(TrainConfig(batch_size=16), 1).steps(850) == 54
    with pytest.raises(ConfigError, match="multiple of 3 processes"):
        BatchLayout.of(TrainConfig(batch_size=16, grad_accumulation=2), world_size=3)


def test_optimizer_steps_group_micro_batches() -> None:
    assert list(optimizer_steps(range(5), 2)) == [[0, 1], [2, 3], [4]]
    assert list(optimizer_steps(range(4), 1)) == [[0], [1], [2], [3]]


def test_a_mid_epoch_checkpoint_needs_its_own_layout() -> None:
    layout = BatchLayout(16, 1, 1)
    resume = FitResume(FitPosition(1, 3), {}, {}, {}, layout=[2, 1, 16])
    with pytest.raises(ConfigError, match="same layout"):
        check_resume_layout(resume, layout)
    resume.position = FitPosition(1, 0)  # an epoch boundary resumes on any layout
    check_resume_layout(resume, layout)

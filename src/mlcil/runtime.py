"""Where and how computation runs: device, precision, process rank, seeding, data loaders.

Everything that would change under ``torchrun`` (rank, world size, samplers, which process writes
files) goes through ``Runtime``, so data-parallel training can be added here without touching the
loop or the methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mlcil.config.schema import TrainConfig
from mlcil.errors import ConfigError


def derive_seed(seed: int, *parts: int) -> int:
    """A 31-bit seed for ``parts`` (e.g. session, epoch) derived from the run seed.

    Seeding every epoch from ``(seed, session, epoch)`` makes each epoch reproducible on its own,
    independent of what ran before it, which is what exact resume needs.
    """
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclasses.dataclass
class Runtime:
    """Device, precision and process layout of a run."""

    device: torch.device
    precision: str  # "fp32", "fp16" or "bf16"
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0

    @classmethod
    def from_config(cls, train: TrainConfig, num_workers: int) -> Runtime:
        if train.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            try:
                device = torch.device(train.device)
            except RuntimeError as error:
                raise ConfigError(f"train.device: {train.device!r} is not a device") from error
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError(f"train.device={train.device} but CUDA is not available")
        precision = train.precision
        if precision == "auto":
            precision = "fp16" if device.type == "cuda" else "fp32"
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device; use fp32 or bf16")
        return cls(device=device, precision=precision, num_workers=num_workers)

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and logs progress."""
        return self.rank == 0

    def autocast(self) -> AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, active only for fp16 (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def loader(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        seed: int | None = None,
    ) -> DataLoader:
        """A data loader whose shuffle order depends only on ``seed``."""
        generator = None
        if seed is not None:
            generator = torch.Generator()
            generator.manual_seed(seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            worker_init_fn=_seed_worker if self.num_workers else None,
        )


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it so that
    # augmentations stay reproducible with workers.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)

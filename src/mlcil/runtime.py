"""Where and how computation runs: device, precision, process rank, seeding, data loaders.

Everything that would change under ``torchrun`` (rank, world size, samplers, which process writes
files) goes through ``Runtime``, so data-parallel training can be added here without touching the
loop or the methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from mlcil import distributed
from mlcil.config.schema import TrainConfig
from mlcil.errors import ConfigError

_T = TypeVar("_T")


def stream_key(name: str) -> int:
    """The stable number of a named random stream: the first 8 bytes of the SHA-256 of its name
    (so no two names coincide in practice, and none with an epoch, session or rank number)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 31-bit seed for ``parts`` (e.g. session, epoch) derived from the run seed.

    Seeding every epoch from ``(seed, session, epoch)`` makes each epoch reproducible on its own,
    independent of what ran before it, which is what exact resume needs. A pass that is not an
    epoch names its stream (``derive_seed(seed, session, "agcn/statistics")``): a text part
    enters as :func:`stream_key` of it. Modules keep their stream names in ``*_STREAM``
    constants (tests/unit/test_architecture.py checks that no two coincide).
    """
    keys = [stream_key(part) if isinstance(part, str) else part for part in parts]
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0] & 0x7FFFFFFF)


def environment_rank() -> int:
    """This process's rank as torchrun sets it (0 without torchrun), before any runtime exists."""
    return distributed.env_int("RANK", 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The random states of python, numpy and torch (CPU and CUDA) as plain JSON data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = cast(tuple, np.random.get_state(legacy=True))
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


# cuBLAS needs a fixed workspace for repeatable results; the value PyTorch's reproducibility
# notes give (":16:8" uses less memory and may be slower).
CUBLAS_WORKSPACE = ":4096:8"


def configure_determinism(deterministic: bool) -> None:
    """Switch PyTorch's deterministic mode for this process (``train.deterministic``).

    On: ``torch.use_deterministic_algorithms(True)`` (an operation without a deterministic kernel
    raises a ``RuntimeError`` naming it instead of running), cuDNN deterministic and without
    autotuning, and ``CUBLAS_WORKSPACE_CONFIG`` set unless the environment sets it already (it
    must be in place before the first cuBLAS call: the runtime is made before any training).
    Off: PyTorch's defaults, so an earlier deterministic run in the same process (a notebook)
    does not carry over; ``cudnn.benchmark`` is then the runtime's choice.
    """
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


@dataclasses.dataclass
class Runtime:
    """Device, precision and process layout of a run."""

    device: torch.device
    precision: str  # "fp32", "fp16" or "bf16"
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    local_rank: int = 0
    channels_last: bool = False  # images and convolution weights in NHWC (fast on CUDA)
    compile: bool = False  # torch.compile the trained network
    teacher_fp32: bool = False  # the frozen teacher runs without autocast
    # Read loss values and the finite-loss flag every ``log_every_steps`` steps instead of every
    # step (CUDA: each read waits for the GPU; on the CPU a read costs nothing).
    deferred_reads: bool = False
    log_every_steps: int = 1
    # Training loaders built once per session with persistent workers (CUDA with workers:
    # restarting the workers every epoch would leave the GPU idle).
    persistent_loaders: bool = False

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
        context = distributed.DistributedContext.from_environment(device.type)
        if device.type == "cuda" and context.is_distributed:
            device = torch.device("cuda", context.local_rank)  # one process per GPU (torchrun)
        precision = train.precision
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device; use fp32 or bf16")
        cuda = device.type == "cuda"
        configure_determinism(train.deterministic)
        if cuda and not train.deterministic:
            torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels
        channels_last = cuda if train.channels_last == "auto" else bool(train.channels_last)
        return cls(
            device=device,
            precision=precision,
            rank=context.rank,
            world_size=context.world_size,
            num_workers=num_workers,
            local_rank=context.local_rank,
            channels_last=channels_last,
            compile=train.compile,
            teacher_fp32=train.teacher_precision == "fp32",
            deferred_reads=cuda,
            log_every_steps=train.log_every_steps if cuda else 1,
            persistent_loaders=cuda and num_workers > 0,
        )

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and logs progress."""
        return self.rank == 0

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of images on the run's device, in the run's memory format."""
        if self.channels_last and images.dim() == 4:
            return images.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        return images.to(self.device, non_blocking=True)

    def teacher_autocast(self) -> AbstractContextManager:
        """The precision of the frozen teacher's forward passes: the run's autocast, or full
        precision (``train.teacher_precision: fp32``, as the released code)."""
        if self.teacher_fp32 and self.precision != "fp32":
            return torch.autocast(device_type=self.device.type, enabled=False)
        return self.autocast()

    def prepare_for_training(self, module: nn.Module) -> nn.Module:
        """The one seam between a network and how it runs: channels-last weights, the
        data-parallel wrapper, ``torch.compile``. :func:`unwrap` gives the plain network back
        (checkpoints always hold its weights)."""
        if self.channels_last:
            module.to(memory_format=torch.channels_last)  # in place: the same parameters
        prepared = self.data_parallel(module)
        if self.compile:
            prepared = CompiledModule(prepared)
        return prepared

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
        start_index: int = 0,
    ) -> DataLoader:
        """A loader over this process's shard whose order depends only on ``seed``.

        With one process the order is exactly ``DataLoader(shuffle=shuffle,
        generator=Generator().manual_seed(seed))``'s; with several, every rank reads its
        :class:`~mlcil.distributed.ShardSampler` share of the same global order.
        ``start_index`` skips this rank's first positions (a mid-epoch resume).
        """
        generator = None
        if seed is not None:
            # The loader draws its workers' base seed from this generator, not the global RNG.
            generator = torch.Generator()
            generator.manual_seed(seed)
        sampler = distributed.ShardSampler(
            len(dataset),  # type: ignore[arg-type]
            self.rank,
            self.world_size,
            shuffle=shuffle,
            seed=seed or 0,
            start_index=start_index,
        )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            worker_init_fn=_seed_worker if self.num_workers else None,
        )

    # --- data parallelism: every call is a no-op with one process ----------------------------

    def session_loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        """A shuffled training loader built once for a session's epochs (used when
        :attr:`persistent_loaders`): workers stay alive, memory is pinned, batches are fetched
        ahead. Before each epoch call ``loader.sampler.set_seed(epoch_seed, start_index)``;
        every worker re-seeds its random generators from the epoch seed and its worker id at
        the epoch's first item, so an epoch's augmentations do not depend on earlier epochs."""
        sampler = EpochSeededSampler(len(dataset), self.rank, self.world_size)  # type: ignore[arg-type]
        return DataLoader(
            EpochSeededDataset(dataset),
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=True,
            prefetch_factor=4,
        )

    def seed_process(self, seed: int) -> None:
        """Seed python, numpy and torch for a phase: ``seed`` itself on rank 0 (a single-process
        run is unchanged), a value derived from it and the rank elsewhere, so ranks draw
        different augmentations."""
        seed_everything(seed if self.rank == 0 else derive_seed(seed, self.rank))

    def gather_rows(self, rows: np.ndarray | torch.Tensor) -> np.ndarray:
        """Every rank's rows concatenated in rank order (e.g. a method's scores of one pass)."""
        return distributed.all_gather_rows(rows)

    def gather_loader_rows(self, loader: DataLoader, rows: np.ndarray) -> np.ndarray:
        """Rows computed over an unshuffled :meth:`loader`, gathered from every rank into
        dataset order (the sampler's padding dropped): what one process would have computed."""
        sampler = loader.sampler
        if self.world_size == 1 or not isinstance(sampler, distributed.ShardSampler):
            return rows  # one process, or an unsharded loader: this process has every row
        return distributed.gather_in_order(rows, sampler.positions(), sampler.num_items)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's plain-data ``obj`` on every rank."""
        return distributed.broadcast_object(obj)

    def synchronize_parameters(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank's ``module``."""
        distributed.broadcast_parameters(module)

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on at least one rank."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        return bool(distributed.all_reduce_mean(value).item() > 0)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's plain-data ``obj``, in rank order."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def synchronize(self) -> None:
        """Wait for the device's queued work (a no-op on the CPU): for timing phases."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def main_writes(self, write: Callable[[], _T]) -> _T | None:
        """Run ``write`` (the run's files) on the main process only, then wait for every process,
        so that no rank goes on to read a file the main one has not finished. Returns what
        ``write`` returned on the main process, None on the others."""
        result = write() if self.is_main else None
        self.barrier()
        return result

    def barrier(self) -> None:
        """Wait for every process (e.g. until rank 0 has written a checkpoint)."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            if self.device.type == "cuda":  # naming the device spares NCCL a guess
                torch.distributed.barrier(device_ids=[self.device.index or 0])
            else:
                torch.distributed.barrier()

    def data_parallel(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped for synchronised gradients (DDP), or itself with one process."""
        if self.world_size == 1:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DataParallelModule(module, device_ids=device_ids)

    @staticmethod
    def no_sync(module: nn.Module) -> AbstractContextManager:
        """Skip gradient synchronisation in a backward pass (all but the last accumulation
        micro-batch)."""
        if isinstance(module, CompiledModule):
            module = module.module
        if isinstance(module, DistributedDataParallel):
            return module.no_sync()
        return contextlib.nullcontext()


def unwrap(module: nn.Module) -> nn.Module:
    """The plain network inside the wrappers of :meth:`Runtime.prepare_for_training`."""
    while isinstance(module, DistributedDataParallel | CompiledModule):
        module = module.module
    return module


class CompiledModule(nn.Module):
    """``torch.compile(module)`` that keeps ``module`` reachable: its attributes (e.g. a
    network's ``retained_embedding``) are forwarded, and :func:`unwrap` returns it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        # Kept outside the registered submodules so the parameters are listed once.
        object.__setattr__(self, "compiled", torch.compile(module))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class DataParallelModule(DistributedDataParallel):
    """DDP that forwards unknown attributes to the wrapped module, so a method can keep calling
    ``self.network.retained_embedding(...)`` while its ``self.network`` is the wrapper."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


@contextlib.contextmanager
def swapped_attribute(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Temporarily set ``owner.<name> = value``."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


class EpochSeededSampler(distributed.ShardSampler):
    """A :class:`~mlcil.distributed.ShardSampler` whose items carry the epoch's seed:
    ``(seed, index)``, for :class:`EpochSeededDataset`."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        for index in self.positions()[self.start_index :].tolist():
            yield self.seed, index


class EpochSeededDataset(Dataset):
    """Reads ``(seed, index)`` items: at the first item of a new seed in this process (a new
    epoch in a persistent worker) python, numpy and torch are re-seeded from the seed and the
    worker id, as a fresh worker of that epoch would be."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.seed: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        seed, index = item
        if seed != self.seed:
            info = torch.utils.data.get_worker_info()
            worker_seed = derive_seed(seed, info.id if info is not None else 0)
            seed_everything(worker_seed)
            self.seed = seed
        return self.dataset[index]


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it so that
    # augmentations stay reproducible with workers.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)

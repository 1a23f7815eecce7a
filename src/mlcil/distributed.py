"""Primitives for data-parallel training with ``torch.distributed``, launched by ``torchrun``.

Each piece is small and testable alone; the engine combines them:

- :class:`DistributedContext` reads torchrun's environment and owns the process group.
- :func:`shard_indices` / :class:`ShardSampler` decide which dataset positions a rank reads in
  one epoch. With one process the order is exactly the one ``DataLoader(shuffle=True,
  generator=torch.Generator().manual_seed(seed))`` yields today, so single-process runs do not
  change.
- :func:`loss_scale` is the factor that makes the optimised objective independent of how a
  global batch is split over processes and accumulation steps.
- The collectives (:func:`all_gather_rows`, :func:`gather_in_order`, :func:`broadcast_object`,
  :func:`broadcast_parameters`, :func:`all_reduce_mean`) use the default process group and are
  no-ops when there is no group or its world size is 1, so the engine can call them
  unconditionally.

With the NCCL backend every tensor that takes part in a collective must live on the current
CUDA device; :meth:`DistributedContext.from_environment` makes ``LOCAL_RANK`` that device and the
collectives here move tensors there and back themselves.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from mlcil.errors import ConfigError, MlcilError

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedContext",
    "ShardSampler",
    "all_gather_rows",
    "all_reduce_mean",
    "broadcast_object",
    "broadcast_parameters",
    "gather_in_order",
    "loss_scale",
    "order_rows",
    "shard_indices",
    "shard_size",
]

_BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


# ----------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------


def env_int(name: str, default: int) -> int:
    """Read an integer environment variable set by torchrun, or ``default`` when unset."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError as error:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from error


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a data-parallel run.

    Attributes:
        rank: global rank of this process, ``0 <= rank < world_size``.
        world_size: number of processes; 1 means no process group.
        local_rank: rank within the machine (the CUDA device index under NCCL).
        backend: ``"nccl"``, ``"gloo"`` or ``None`` when there is no process group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @classmethod
    def from_environment(
        cls, device_type: str, timeout: datetime.timedelta | None = None
    ) -> DistributedContext:
        """Build the context from torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.

        Without these variables (or with ``WORLD_SIZE=1``) no process group is created. Otherwise
        the default group is initialised from ``MASTER_ADDR``/``MASTER_PORT`` with NCCL for
        ``device_type="cuda"`` (after making ``LOCAL_RANK`` the current CUDA device) and gloo for
        ``"cpu"``. Calling it again when the group already exists returns a matching context
        without initialising twice.

        Args:
            device_type: ``"cuda"`` or ``"cpu"``, the type of the training device.
            timeout: how long a collective may wait before failing; ``None`` keeps torch's
                default. A finite timeout turns a hung peer into an error instead of a hang.

        Returns:
            The context of this process.

        Raises:
            ConfigError: on malformed or inconsistent environment variables, a device type
                other than cuda/cpu, a missing ``MASTER_ADDR``/``MASTER_PORT``, or a process
                group that already exists with another rank, size or backend.
        """
        world_size = env_int("WORLD_SIZE", 1)
        rank = env_int("RANK", 0)
        local_rank = env_int("LOCAL_RANK", 0)
        if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
            raise ConfigError(
                f"torchrun environment is inconsistent: RANK={rank}, WORLD_SIZE={world_size}, "
                f"LOCAL_RANK={local_rank} (need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0)"
            )
        if world_size == 1:
            return cls(rank=0, world_size=1, local_rank=local_rank, backend=None)
        backend = _BACKENDS.get(device_type)
        if backend is None:
            raise ConfigError(
                f"train.device: data-parallel training supports cuda and cpu devices, "
                f"got device type {device_type!r}"
            )
        if dist.is_initialized():
            return cls._from_existing_group(rank, world_size, local_rank, backend)
        if backend == "nccl":
            _select_cuda_device(local_rank)
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ConfigError(
                    f"environment variable {name} is not set; launch data-parallel runs with "
                    f"torchrun, which sets it"
                )
        kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size, **kwargs)
        logger.info("process group %s: rank %d of %d", backend, rank, world_size)
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)

    @classmethod
    def _from_existing_group(
        cls, rank: int, world_size: int, local_rank: int, backend: str
    ) -> DistributedContext:
        """The context of an already initialised default group, checked against the env."""
        actual = (dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))
        if actual != (rank, world_size, backend):
            raise ConfigError(
                f"a process group already exists with (rank, world size, backend) = {actual}, "
                f"but the environment asks for {(rank, world_size, backend)}"
            )
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files and logs progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """Whether there is more than one process (and hence a process group)."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every process reaches this point; nothing to wait for with one process."""
        if not (self.is_distributed and dist.is_initialized()):
            return
        if self.backend == "nccl":
            # Naming the device avoids NCCL guessing it (and warning) from the rank.
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def shutdown(self) -> None:
        """Destroy the default process group if one exists (safe to call more than once)."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _select_cuda_device(local_rank: int) -> None:
    """Make ``local_rank`` the current CUDA device, as NCCL collectives require."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank >= available:
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but only {available} CUDA device(s) are visible; "
            f"start at most one process per GPU"
        )
    torch.cuda.set_device(local_rank)


# ----------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------


def _check_layout(num_items: int, rank: int, world_size: int) -> None:
    if num_items < 0:
        raise MlcilError(f"num_items must be >= 0, got {num_items}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise MlcilError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def shard_size(num_items: int, world_size: int) -> int:
    """How many positions every rank reads per epoch: ``ceil(num_items / world_size)``."""
    return -(-num_items // world_size)


def shard_indices(
    num_items: int, rank: int, world_size: int, shuffle: bool, seed: int = 0
) -> np.ndarray:
    """The dataset positions rank ``rank`` reads in one epoch, in reading order.

    Every rank builds the same global order: ``0..num_items-1``, or with ``shuffle`` a
    permutation drawn from a torch generator seeded with ``seed``. The order is padded by wrapping
    around to its start until its length is a multiple of ``world_size`` (so every rank gets the
    same count and no collective waits on a rank with fewer batches), and rank ``r`` takes every
    ``world_size``-th position starting at ``r``. Without the padding the ranks' positions
    partition the dataset; the padded positions repeat the first ``pad`` positions of the order.

    With one process the shuffled order equals what ``DataLoader(dataset, shuffle=True,
    generator=torch.Generator().manual_seed(seed))`` yields. That loader draws one 64-bit number
    from its generator (the base seed of its workers) before the sampler draws its permutation,
    so the same draw is made and discarded here.

    Args:
        num_items: dataset length, >= 0.
        rank: this process's rank.
        world_size: number of processes, >= 1.
        shuffle: permute (training) or keep dataset order (evaluation).
        seed: seed of the permutation; the engine passes the epoch's derived seed, the same on
            every rank.

    Returns:
        int64 array of ``ceil(num_items / world_size)`` dataset positions.

    Raises:
        MlcilError: on a negative ``num_items`` or a rank outside ``[0, world_size)``.
    """
    _check_layout(num_items, rank, world_size)
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed)
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the loader's base seed
        order = torch.randperm(num_items, generator=generator).numpy()
    else:
        order = np.arange(num_items)
    # np.resize repeats the array cyclically, which is the wrap-around padding (even when the
    # padding is longer than the dataset, i.e. fewer items than ranks).
    padded = np.resize(order, shard_size(num_items, world_size) * world_size)
    return padded[rank::world_size].astype(np.int64)


class ShardSampler(Sampler[int]):
    """A sampler yielding :func:`shard_indices`, optionally skipping the first positions.

    Use one per loader; call :meth:`set_seed` before each epoch (the analogue of
    ``DistributedSampler.set_epoch``). For an exact mid-epoch resume, pass ``start_index`` = the
    number of positions this rank already consumed in the interrupted epoch (batches done x local
    batch size): the remaining batches are then the ones the uninterrupted run would have read.

    Args:
        num_items: dataset length.
        rank: this process's rank.
        world_size: number of processes.
        shuffle: permute the order (training) or not (evaluation).
        seed: seed of the first iteration's order.
        start_index: positions of this rank's order to skip in the first iteration.

    Raises:
        MlcilError: on an invalid layout or a ``start_index`` outside ``[0, positions per rank]``.
    """

    def __init__(
        self,
        num_items: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        start_index: int = 0,
    ) -> None:
        super().__init__()
        _check_layout(num_items, rank, world_size)
        self.num_items = num_items
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.start_index = 0
        self.set_seed(seed, start_index)

    def set_seed(self, seed: int, start_index: int = 0) -> None:
        """Seed the next iteration's order and choose how many of its positions to skip."""
        per_rank = shard_size(self.num_items, self.world_size)
        if not 0 <= start_index <= per_rank:
            raise MlcilError(
                f"start_index must be in [0, {per_rank}] (positions per rank), got {start_index}"
            )
        self.seed = seed
        self.start_index = start_index

    def positions(self) -> np.ndarray:
        """Every position of this rank's order for the current seed, skipped ones included."""
        return shard_indices(self.num_items, self.rank, self.world_size, self.shuffle, self.seed)

    def __iter__(self) -> Iterator[int]:
        yield from self.positions()[self.start_index :].tolist()

    def __len__(self) -> int:
        return shard_size(self.num_items, self.world_size) - self.start_index


# ----------------------------------------------------------------------------------------------
# Loss scale
# ----------------------------------------------------------------------------------------------


def loss_scale(local_batch: int, global_batch: int, world_size: int) -> float:
    """Factor by which one process multiplies the SUM of its images' losses in one step.

    The objective optimised is the mean over the global batch (all processes, all accumulation
    steps of one optimizer step) of a per-image loss ``L_i``. Each process backpropagates
    ``loss_scale * sum_{i in its micro-batch} L_i``; gradients add up over accumulation steps and
    DDP averages them over processes (divides by ``world_size``), so the applied gradient is
    ``(1 / global_batch) * sum over the global batch of grad L_i`` whatever the layout: 1 x 128,
    2 x 64, or 1 x 2 steps of 64 give the same update. The factor is therefore
    ``world_size / global_batch``; ``local_batch`` does not enter (every micro-batch's images
    weigh the same) and is only checked.

    KRT (docs/distributed.md): the release sums ASL over each GPU's 64 images, adds
    ``lambda x`` the mean token loss and lets DDP average over 2 GPUs, i.e. it optimises
    ``ASL_sum(128) / 2 + lambda x token_mean(128)``. The per-image loss
    ``L_i = R x ASL_i + lambda x token_i`` with ``R = 64`` (the release's per-GPU batch) has
    global mean ``(64 / 128) ASL_sum + lambda token_mean``: exactly the released objective, and
    weight decay acts against the same scale. With this factor a process computes
    ``loss_scale(...) * (R * asl_sum_local + lambda * token_mean_local * local_batch)``.

    Args:
        local_batch: images in this process's micro-batch, ``1 <= local_batch <= global_batch``.
        global_batch: images in one optimizer step over all processes and accumulation steps.
        world_size: number of processes, >= 1.

    Returns:
        ``world_size / global_batch``.

    Raises:
        MlcilError: on non-positive sizes or ``local_batch > global_batch``.
    """
    if world_size < 1 or global_batch < 1 or not 1 <= local_batch <= global_batch:
        raise MlcilError(
            f"need world_size >= 1 and 1 <= local_batch <= global_batch, got "
            f"local_batch={local_batch}, global_batch={global_batch}, world_size={world_size}"
        )
    return world_size / global_batch


# ----------------------------------------------------------------------------------------------
# Collectives
# ----------------------------------------------------------------------------------------------


def _world_size() -> int:
    """World size of the default group, 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _comm_device() -> torch.device:
    """The device collectives need: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    # NumPy has no bfloat16; float32 holds every bfloat16 value exactly.
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def _check_same_across_ranks(what: str, local: Any) -> None:
    """Raise when ``local`` (shape/dtype metadata) differs between ranks.

    A mismatch would otherwise make a tensor collective hang or mix up bytes.
    """
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if any(item != gathered[0] for item in gathered):
        described = ", ".join(f"rank {r}: {item}" for r, item in enumerate(gathered))
        raise MlcilError(f"{what} differs between ranks: {described}")


def all_gather_rows(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """Concatenate every rank's row block, in rank order.

    Blocks may have different lengths (first dimension) but must agree on the other dimensions
    and the dtype. With one process this returns ``array`` as a NumPy array.

    Args:
        array: this rank's rows, at least 1-D (NumPy array or tensor on any device).

    Returns:
        ``concatenate([rows of rank 0, rows of rank 1, ...])`` as a NumPy array on every rank.

    Raises:
        MlcilError: on a 0-d input, or trailing shapes/dtypes that differ between ranks.
    """
    if isinstance(array, np.ndarray):
        # torch cannot wrap negatively strided views (e.g. ``a[::-1]``).
        array = np.ascontiguousarray(array)
    tensor = torch.as_tensor(array).detach()
    if tensor.ndim == 0:
        raise MlcilError("all_gather_rows needs an array with a row dimension, got a 0-d value")
    world_size = _world_size()
    if world_size == 1:
        return to_numpy(tensor)
    _check_same_across_ranks("row shape/dtype", (tuple(tensor.shape[1:]), str(tensor.dtype)))
    device = _comm_device()
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    dist.all_gather(lengths, torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device))
    counts = [int(n.item()) for n in lengths]
    # Collectives move equal-sized buffers, so every block is padded to the longest one. Bool is
    # sent as uint8 because not every backend reduces or gathers bool.
    wire_dtype = torch.uint8 if tensor.dtype == torch.bool else tensor.dtype
    padded = torch.zeros((max(counts), *tensor.shape[1:]), dtype=wire_dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device=device, dtype=wire_dtype)
    blocks = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(blocks, padded)
    rows = torch.cat([block[:count] for block, count in zip(blocks, counts, strict=True)])
    return to_numpy(rows.to(tensor.dtype))


def order_rows(rows: np.ndarray, positions: np.ndarray, total: int) -> np.ndarray:
    """Put rows computed at dataset ``positions`` back into dataset order ``0..total-1``.

    Positions repeated by the sampler's padding keep their first row; the others are dropped.

    Args:
        rows: ``(N, ...)`` rows, e.g. evaluation scores gathered from every rank.
        positions: ``(N,)`` dataset position of each row.
        total: dataset length; every position in ``[0, total)`` must occur.

    Returns:
        ``(total, ...)`` rows, row ``k`` being the one computed for position ``k``.

    Raises:
        MlcilError: on a length mismatch, a position outside ``[0, total)`` or a missing one.
    """
    rows = np.asarray(rows)
    positions = np.asarray(positions).reshape(-1)
    if rows.shape[0] != positions.shape[0]:
        raise MlcilError(f"got {rows.shape[0]} rows but {positions.shape[0]} positions")
    # np.unique sorts the positions and gives the index of each one's first occurrence.
    unique, first = np.unique(positions, return_index=True)
    if unique.size != total or (total and (unique[0] != 0 or unique[-1] != total - 1)):
        missing = sorted(set(range(total)) - set(unique.tolist()))[:10]
        extra = sorted(set(unique.tolist()) - set(range(total)))[:10]
        raise MlcilError(
            f"positions do not cover 0..{total - 1} exactly: missing {missing}, outside {extra} "
            f"(first 10 shown)"
        )
    return rows[first]


def gather_in_order(
    rows: np.ndarray | torch.Tensor, positions: np.ndarray | torch.Tensor, total: int
) -> np.ndarray:
    """Gather every rank's evaluation rows and return them in dataset order, padding dropped.

    Each rank passes the rows it computed and the dataset positions they belong to (for a
    :class:`ShardSampler` with ``shuffle=False``, its :meth:`~ShardSampler.positions`).

    Args:
        rows: this rank's ``(n_rank, ...)`` rows.
        positions: this rank's ``(n_rank,)`` dataset positions.
        total: dataset length.

    Returns:
        ``(total, ...)`` rows in dataset order, identical on every rank.

    Raises:
        MlcilError: when the gathered positions do not cover the dataset exactly once (see
            :func:`order_rows`).
    """
    all_rows = all_gather_rows(rows)
    all_positions = all_gather_rows(torch.as_tensor(np.asarray(positions), dtype=torch.int64))
    return order_rows(all_rows, all_positions, total)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (e.g. the DPL threshold, the exemplar memory).

    The object is pickled, so it should be plain data; other ranks' ``obj`` is ignored. With one
    process ``obj`` is returned unchanged.
    """
    if _world_size() == 1:
        return obj
    holder = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src, device=_comm_device())
    return holder[0]


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s values, in place.

    DDP only synchronises parameters when it wraps a module; parameters added afterwards (each
    session's new head and KR token) start different on every rank unless synchronised here.

    Raises:
        MlcilError: when the ranks' modules do not have the same named tensors and shapes.
    """
    if _world_size() == 1:
        return
    named = list(itertools.chain(module.named_parameters(), module.named_buffers()))
    signature = [(name, tuple(t.shape), str(t.dtype)) for name, t in named]
    _check_same_across_ranks("module parameters/buffers", signature)
    device = _comm_device()
    with torch.no_grad():
        for _, tensor in named:
            if tensor.device == device:
                dist.broadcast(tensor.data, src=src)
            else:
                staged = tensor.detach().to(device)
                dist.broadcast(staged, src=src)
                tensor.copy_(staged)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks, as a new tensor on ``tensor``'s device.

    The input is not modified. With one process ``tensor`` itself is returned.

    Raises:
        MlcilError: for a non-floating-point tensor (an integer mean would truncate).
    """
    if not tensor.is_floating_point():
        raise MlcilError(f"all_reduce_mean needs a floating-point tensor, got {tensor.dtype}")
    world_size = _world_size()
    if world_size == 1:
        return tensor
    total = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total / world_size).to(tensor.device)

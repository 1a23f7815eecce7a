"""Tests of mlcil.distributed: pure sharding/ordering/scale helpers, then real 2-process gloo runs.

The multi-process tests start two CPU processes with ``torch.multiprocessing`` (spawn), each
calling ``DistributedContext.from_environment("cpu")`` with torchrun's variables set by hand and a
60 s collective timeout. Each scenario writes its results to files in ``tmp_path``; the test
process compares them with a single-process reference computation.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mlcil import distributed as D
from mlcil.errors import ConfigError, MlcilError
from mlcil.losses import asymmetric_loss, token_distillation
from spawn import free_port, join_as_torchrun

# ----------------------------------------------------------------------------------------------
# Pure: shard_indices / ShardSampler
# ----------------------------------------------------------------------------------------------


def _interleave(shards: list[np.ndarray]) -> np.ndarray:
    """Rebuild the padded global order from per-rank shards (position k lives on rank k % W)."""
    world_size = len(shards)
    per_rank = len(shards[0])
    return np.array([shards[k % world_size][k // world_size] for k in range(per_rank * world_size)])


@pytest.mark.parametrize(
    ("num_items", "world_size", "expected"),
    [
        (5, 2, [[0, 2, 4], [1, 3, 0]]),
        (5, 4, [[0, 4], [1, 0], [2, 1], [3, 2]]),
        (2, 3, [[0], [1], [0]]),  # fewer items than ranks: the wrap-around repeats item 0
        (4, 2, [[0, 2], [1, 3]]),  # divisible: no padding
        (0, 3, [[], [], []]),
    ],
)
def test_unshuffled_shards_hand_computed(
    num_items: int, world_size: int, expected: list[list[int]]
) -> None:
    shards = [D.shard_indices(num_items, r, world_size, shuffle=False) for r in range(world_size)]
    assert [s.tolist() for s in shards] == expected
    assert all(s.dtype == np.int64 for s in shards)


@pytest.mark.parametrize("num_items", [1, 5, 16, 17, 50])
@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_shards_cover_each_item_once_plus_wrapped_padding(num_items: int, world_size: int) -> None:
    shards = [D.shard_indices(num_items, r, world_size, True, seed=11) for r in range(world_size)]
    per_rank = -(-num_items // world_size)
    assert [len(s) for s in shards] == [per_rank] * world_size
    assert D.shard_size(num_items, world_size) == per_rank
    order = _interleave(shards)
    # Without padding the ranks' positions are every item exactly once...
    assert sorted(order[:num_items].tolist()) == list(range(num_items))
    # ...and the padding wraps around to the start of the same order.
    pad = per_rank * world_size - num_items
    assert order[num_items:].tolist() == np.resize(order[:num_items], pad).tolist()


def test_ranks_together_read_the_single_process_order() -> None:
    single = D.shard_indices(23, 0, 1, shuffle=True, seed=5)
    for world_size in (2, 4, 5):
        shards = [D.shard_indices(23, r, world_size, True, seed=5) for r in range(world_size)]
        assert _interleave(shards)[:23].tolist() == single.tolist()


def test_shard_order_is_deterministic_and_depends_on_seed() -> None:
    first = D.shard_indices(50, 1, 3, shuffle=True, seed=7)
    assert D.shard_indices(50, 1, 3, shuffle=True, seed=7).tolist() == first.tolist()
    assert D.shard_indices(50, 1, 3, shuffle=True, seed=8).tolist() != first.tolist()


def _loader_order(num_items: int, batch_size: int, seed: int, **kwargs: object) -> list[int]:
    """Positions in the order today's ``Runtime.loader(shuffle=True, seed=seed)`` yields them."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(
        list(range(num_items)), batch_size=batch_size, generator=generator, **kwargs
    )
    return [int(i) for batch in loader for i in batch]


@pytest.mark.parametrize(
    ("num_items", "batch_size", "seed"), [(1, 1, 0), (10, 3, 5), (37, 8, 3407)]
)
def test_single_process_equals_todays_dataloader_order(
    num_items: int, batch_size: int, seed: int
) -> None:
    expected = _loader_order(num_items, batch_size, seed, shuffle=True)
    assert D.shard_indices(num_items, 0, 1, shuffle=True, seed=seed).tolist() == expected
    # The sampler inside a loader built like today's (generator included, for worker seeds).
    sampler = D.ShardSampler(num_items, shuffle=True, seed=seed)
    assert _loader_order(num_items, batch_size, seed, sampler=sampler) == expected


def test_start_index_resumes_mid_epoch_with_the_remaining_batches() -> None:
    batch = 4
    full = D.ShardSampler(30, rank=1, world_size=2, seed=9)
    expected = list(full)
    resumed = D.ShardSampler(30, rank=1, world_size=2, seed=9, start_index=2 * batch)
    assert list(resumed) == expected[2 * batch :]
    assert len(resumed) == len(expected) - 2 * batch == 15 - 8
    # The next epoch starts from its first position again.
    resumed.set_seed(10)
    assert list(resumed) == D.shard_indices(30, 1, 2, True, seed=10).tolist()
    assert len(resumed) == 15


def test_invalid_layouts_and_start_index_are_errors() -> None:
    with pytest.raises(MlcilError, match="rank=2, world_size=2"):
        D.shard_indices(10, 2, 2, shuffle=False)
    with pytest.raises(MlcilError, match="num_items"):
        D.shard_indices(-1, 0, 1, shuffle=False)
    with pytest.raises(MlcilError, match=r"start_index must be in \[0, 5\].*got 6"):
        D.ShardSampler(10, rank=0, world_size=2, start_index=6)


# ----------------------------------------------------------------------------------------------
# Pure: loss_scale, order_rows, single-process collectives, environment
# ----------------------------------------------------------------------------------------------


def test_loss_scale_values_and_errors() -> None:
    assert D.loss_scale(16, 16, 1) == 1 / 16
    assert D.loss_scale(8, 16, 2) == 0.125
    assert D.loss_scale(64, 128, 2) == 1 / 64
    with pytest.raises(MlcilError, match="local_batch=17, global_batch=16"):
        D.loss_scale(17, 16, 1)


def test_order_rows_drops_padding_and_restores_dataset_order() -> None:
    # Rank 0 read positions [2, 0, 1], rank 1 read [3, 2] (2 is the wrap-around padding).
    positions = np.array([2, 0, 1, 3, 2])
    rows = np.array([[20.0], [0.0], [10.0], [30.0], [99.0]])
    assert D.order_rows(rows, positions, 4).tolist() == [[0.0], [10.0], [20.0], [30.0]]
    with pytest.raises(MlcilError, match=r"missing \[1\]"):
        D.order_rows(rows[[0, 1, 3]], positions[[0, 1, 3]], 4)
    with pytest.raises(MlcilError, match=r"outside \[7\]"):
        D.order_rows(rows[:4], np.array([0, 1, 2, 7]), 3)


def test_collectives_are_noops_in_a_single_process() -> None:
    assert not torch.distributed.is_initialized()
    rows = np.arange(6.0).reshape(3, 2)
    assert D.all_gather_rows(torch.from_numpy(rows)).tolist() == rows.tolist()
    assert D.gather_in_order(rows, np.array([2, 0, 1]), 3).tolist() == rows[[1, 2, 0]].tolist()
    payload = {"threshold": 0.5}
    assert D.broadcast_object(payload) is payload
    value = torch.tensor([1.5, 2.5])
    assert D.all_reduce_mean(value) is value
    layer = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    D.broadcast_parameters(layer)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))


def test_context_without_torchrun_has_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = D.DistributedContext.from_environment("cpu")
    assert context == D.DistributedContext(rank=0, world_size=1, local_rank=0, backend=None)
    assert context.is_main and not context.is_distributed
    context.barrier()  # nothing to wait for
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    ("env", "device_type", "message"),
    [
        ({"WORLD_SIZE": "2", "RANK": "2"}, "cpu", "RANK=2, WORLD_SIZE=2"),
        ({"WORLD_SIZE": "two"}, "cpu", "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "mps", "got device type 'mps'"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "cpu", "MASTER_ADDR is not set"),
    ],
)
def test_bad_environment_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], device_type: str, message: str
) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        D.DistributedContext.from_environment(device_type)


# ----------------------------------------------------------------------------------------------
# Two real processes (gloo on the CPU)
# ----------------------------------------------------------------------------------------------

_WORLD = 2
_SPAWN_DEADLINE_S = 180.0  # generous: importing torch twice on a loaded 2-core machine


def _process_main(rank: int, scenario: Callable, port: int, out_dir: str) -> None:
    """Entry point of a spawned process: join the group as torchrun would, run the scenario."""
    join_as_torchrun(rank, _WORLD, port)
    context = D.DistributedContext.from_environment("cpu", datetime.timedelta(seconds=60))
    try:
        assert (context.rank, context.world_size, context.backend) == (rank, _WORLD, "gloo")
        scenario(context, Path(out_dir))
        context.barrier()
    finally:
        context.shutdown()


def _run_processes(scenario: Callable, out_dir: Path) -> None:
    """Run ``scenario(context, out_dir)`` on 2 spawned ranks; fail (not hang) past the deadline."""
    processes = mp.start_processes(
        _process_main,
        args=(scenario, free_port(), str(out_dir)),
        nprocs=_WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + _SPAWN_DEADLINE_S
    while not processes.join(timeout=1.0):  # re-raises a child's exception with its traceback
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail(f"{scenario.__name__} did not finish within {_SPAWN_DEADLINE_S} s")


def _load(out_dir: Path, rank: int) -> dict[str, np.ndarray]:
    with np.load(out_dir / f"rank{rank}.npz") as data:
        return dict(data)


def _blocks(rank: int) -> dict[str, np.ndarray]:
    """Per-rank inputs of unequal lengths (rank 0: 3 rows, rank 1: 1 row / 0 rows)."""
    rows = 3 if rank == 0 else 1
    return {
        "floats": (100.0 * rank + np.arange(2 * rows, dtype=np.float32)).reshape(rows, 2),
        "flags": np.arange(rows) % 2 == rank,
        "ints": np.arange(4, dtype=np.int64) + 10 if rank == 0 else np.zeros(0, dtype=np.int64),
    }


def _scenario_all_gather(context: D.DistributedContext, out_dir: Path) -> None:
    gathered = {name: D.all_gather_rows(value) for name, value in _blocks(context.rank).items()}
    gathered["from_tensor"] = D.all_gather_rows(torch.from_numpy(_blocks(context.rank)["floats"]))
    np.savez(out_dir / f"rank{context.rank}.npz", **gathered)


def test_all_gather_rows_concatenates_unequal_blocks_in_rank_order(tmp_path: Path) -> None:
    _run_processes(_scenario_all_gather, tmp_path)
    blocks = [_blocks(0), _blocks(1)]
    for rank in range(_WORLD):
        result = _load(tmp_path, rank)
        for name in ("floats", "flags", "ints"):
            expected = np.concatenate([blocks[0][name], blocks[1][name]])
            assert result[name].dtype == expected.dtype
            assert result[name].tolist() == expected.tolist()
        assert result["from_tensor"].tolist() == result["floats"].tolist()


_EVAL_ITEMS = 7


def _eval_rows(positions: np.ndarray) -> np.ndarray:
    """Stand-in for a model's scores: a deterministic function of the dataset position."""
    return np.stack([positions * 1.5, np.sin(positions)], axis=1).astype(np.float32)


def _scenario_gather_in_order(context: D.DistributedContext, out_dir: Path) -> None:
    results = {}
    for shuffle in (False, True):
        sampler = D.ShardSampler(_EVAL_ITEMS, context.rank, context.world_size, shuffle, seed=4)
        positions = np.array(list(sampler))  # what an evaluation loader would read
        rows = _eval_rows(positions)
        results[f"shuffle_{shuffle}"] = D.gather_in_order(rows, positions, _EVAL_ITEMS)
    np.savez(out_dir / f"rank{context.rank}.npz", **results)


def test_gather_in_order_equals_the_single_process_order(tmp_path: Path) -> None:
    _run_processes(_scenario_gather_in_order, tmp_path)
    expected = _eval_rows(np.arange(_EVAL_ITEMS))  # one process, dataset order, no padding
    for rank in range(_WORLD):
        result = _load(tmp_path, rank)
        assert result["shuffle_False"].tolist() == expected.tolist()
        assert result["shuffle_True"].tolist() == expected.tolist()


_MEMORY = {"threshold": 0.7321, "memory": {"images": ["a.jpg", "b.jpg"], "labels": [[0, 1]]}}


def _scenario_broadcast_and_mean(context: D.DistributedContext, out_dir: Path) -> None:
    mine = _MEMORY if context.rank == 0 else {"threshold": -1.0}
    received = D.broadcast_object(mine, src=0)
    mean = D.all_reduce_mean(torch.tensor([1.0, 2.0]) * (context.rank + 1))
    (out_dir / f"rank{context.rank}.json").write_text(
        json.dumps({"received": received, "mean": mean.tolist()})
    )


def test_broadcast_object_and_all_reduce_mean(tmp_path: Path) -> None:
    _run_processes(_scenario_broadcast_and_mean, tmp_path)
    for rank in range(_WORLD):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["received"] == _MEMORY
        assert result["mean"] == [1.5, 3.0]  # mean of [1, 2] and [2, 4]


def _module_for_rank(rank: int) -> torch.nn.Module:
    """A Linear + BatchNorm whose weights and running statistics differ between ranks."""
    torch.manual_seed(100 + rank)
    module = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3))
    module[1].running_mean.uniform_()
    return module


def _state_arrays(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: value.detach().numpy().copy() for name, value in module.state_dict().items()}


def _scenario_broadcast_parameters(context: D.DistributedContext, out_dir: Path) -> None:
    module = _module_for_rank(context.rank)
    D.broadcast_parameters(module, src=0)
    np.savez(out_dir / f"rank{context.rank}.npz", **_state_arrays(module))


def test_broadcast_parameters_copies_rank0_weights_and_buffers(tmp_path: Path) -> None:
    _run_processes(_scenario_broadcast_parameters, tmp_path)
    rank0 = _state_arrays(_module_for_rank(0))
    rank1_before = _state_arrays(_module_for_rank(1))
    assert not np.array_equal(rank0["0.weight"], rank1_before["0.weight"])
    for rank in range(_WORLD):
        result = _load(tmp_path, rank)
        assert result.keys() == rank0.keys()
        for name, value in rank0.items():
            assert np.array_equal(result[name], value), (rank, name)


# --- DDP gradient: the per-image objective is independent of the batch layout ------------------

_GLOBAL_BATCH = 16
_R = 8.0  # ASL weight R: the per-process batch of the "release" layout below (2 x 8)
_LAMBDA = 3.0


def _problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """16 images: features, 0/1 targets, and frozen "old" tokens for the token loss."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(_GLOBAL_BATCH, 6, generator=generator)
    targets = (torch.rand(_GLOBAL_BATCH, 4, generator=generator) < 0.4).float()
    old_tokens = torch.randn(_GLOBAL_BATCH, 4, generator=generator)
    return features, targets, old_tokens


def _model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(6, 4)


def _scaled_loss(model: torch.nn.Module, rows: torch.Tensor, world_size: int) -> torch.Tensor:
    """``loss_scale`` x sum over this micro-batch of ``R * ASL_i + lambda * token_i``."""
    features, targets, old_tokens = (t[rows] for t in _problem())
    logits = model(features)
    local = len(rows)
    image_sum = _R * asymmetric_loss(logits, targets) + _LAMBDA * local * token_distillation(
        old_tokens, logits
    )
    return D.loss_scale(local, _GLOBAL_BATCH, world_size) * image_sum


def _gradients(model: torch.nn.Module) -> np.ndarray:
    return np.concatenate([p.grad.detach().numpy().ravel() for p in model.parameters()])


def _reference_gradient() -> np.ndarray:
    """Gradient of the mean over the 16 images of the per-image loss, one image at a time."""
    model = _model()
    features, targets, old_tokens = _problem()
    losses = []
    for i in range(_GLOBAL_BATCH):
        logits = model(features[i : i + 1])
        losses.append(
            _R * asymmetric_loss(logits, targets[i : i + 1])
            + _LAMBDA * token_distillation(old_tokens[i : i + 1], logits)
        )
    torch.stack(losses).mean().backward()
    return _gradients(model)


def _scenario_ddp(context: D.DistributedContext, out_dir: Path) -> None:
    rows = torch.from_numpy(D.shard_indices(_GLOBAL_BATCH, context.rank, _WORLD, True, seed=3))
    ddp = DistributedDataParallel(_model())
    _scaled_loss(ddp, rows, _WORLD).backward()
    scaled = _gradients(ddp.module)
    # The release's layout: ASL summed over the process's images + lambda x the mean token
    # loss, gradients averaged by DDP. Its objective is ASL_sum(16)/2 + lambda x token_mean.
    ddp.zero_grad(set_to_none=True)
    features, targets, old_tokens = (t[rows] for t in _problem())
    logits = ddp(features)
    released = asymmetric_loss(logits, targets) + _LAMBDA * token_distillation(old_tokens, logits)
    released.backward()
    np.savez(
        out_dir / f"rank{context.rank}.npz",
        rows=rows.numpy(),
        scaled=scaled,
        released=_gradients(ddp.module),
    )


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    # float32 sums in another order: equal to 1e-6 of the gradient's largest entry (a wrong
    # scale would be off by a factor of 2 or more).
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_one_batch_of_16_gives_the_same_gradient_in_every_layout(tmp_path: Path) -> None:
    reference = _reference_gradient()
    assert np.abs(reference).max() > 1e-2  # a real gradient, not zeros

    whole = _model()  # 1 process x 16 images
    _scaled_loss(whole, torch.arange(16), world_size=1).backward()
    _assert_close(_gradients(whole), reference)

    accumulated = _model()  # 1 process x 2 accumulation steps of 8 (grads add up)
    _scaled_loss(accumulated, torch.arange(0, 8), world_size=1).backward()
    _scaled_loss(accumulated, torch.arange(8, 16), world_size=1).backward()
    _assert_close(_gradients(accumulated), reference)

    _run_processes(_scenario_ddp, tmp_path)  # 2 processes x 8 images under DDP
    results = [_load(tmp_path, rank) for rank in range(_WORLD)]
    assert sorted(np.concatenate([r["rows"] for r in results]).tolist()) == list(range(16))
    for result in results:
        _assert_close(result["scaled"], reference)
        # With R = the per-process batch, the per-image objective IS the release's objective.
        _assert_close(result["released"], reference)

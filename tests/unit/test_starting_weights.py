"""Pretrained weights of a run are made once per machine: local rank 0 makes them under the
weights cache's lock while the other ranks wait, then they find them made."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import torch

from mlcil.config.schema import ModelConfig


def _rank(rank: int, cache: str, init: str, out: str) -> None:
    os.environ["MLCIL_CACHE"] = cache
    os.environ["OMP_NUM_THREADS"] = "1"
    import mlcil.imagenet
    from mlcil.runs import resolve_starting_weights
    from mlcil.runtime import Runtime

    real_store = mlcil.imagenet.store

    def slow_store(*args: object, **kwargs: object) -> Path:
        with open(Path(out) / "stores", "a") as log:
            log.write(f"{rank}\n")
        time.sleep(1.0)  # long enough for a rank that did not wait to start its own
        return real_store(*args, **kwargs)  # type: ignore[arg-type]

    mlcil.imagenet.store = slow_store  # type: ignore[assignment]
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=2
    )
    try:
        runtime = Runtime(torch.device("cpu"), "fp32", rank=rank, world_size=2, local_rank=rank)
        model = ModelConfig(
            backbone="efficientnet_lite0", feature_stage=3, pretrained="imagenet:efficientnet_lite0"
        )
        resolved = resolve_starting_weights(model, 64, runtime)
        (Path(out) / f"rank{rank}").write_text(str(resolved.pretrained))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_starting_with_an_empty_cache_make_the_weights_once(tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    context = multiprocessing.get_context("spawn")
    ranks = [
        context.Process(target=_rank, args=(rank, str(cache), str(tmp_path / "init"), str(out)))
        for rank in (1, 0)  # rank 1 starts first: it must still wait for rank 0
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(300)
    assert [process.exitcode for process in ranks] == [0, 0]
    assert (out / "stores").read_text().split() == ["0"]  # made once, by local rank 0
    paths = {(out / f"rank{rank}").read_text() for rank in (0, 1)}
    assert len(paths) == 1
    made = Path(paths.pop())
    assert made.parent == cache / "weights" and made.is_file()
    assert (cache / "weights" / "build.lock").exists()  # taken through the cache's lock

"""The shared cache helpers: root, provenance key, build lock and atomic array writes."""

from __future__ import annotations

import hashlib
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest

from mlcil import cache
from mlcil.errors import MlcilError


def test_cache_root_follows_the_environment_as_it_is_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLCIL_CACHE", str(tmp_path / "here"))
    assert cache.cache_root() == tmp_path / "here"
    monkeypatch.delenv("MLCIL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "mlcil"


def test_provenance_key_ignores_key_order_and_tuples_but_not_values() -> None:
    key = cache.provenance_key({"a": 1, "b": [1, 2]})
    assert key == cache.provenance_key({"b": (1, 2), "a": 1})
    assert len(key) == cache.KEY_LENGTH
    assert key != cache.provenance_key({"a": 1.0, "b": [1, 2]})  # 1 and 1.0 differ as JSON
    # The first 16 hex characters of the SHA-256 of '{"a":1,"b":[1,2]}'.
    assert key == hashlib.sha256(b'{"a":1,"b":[1,2]}').hexdigest()[:16]


def test_a_value_that_is_not_json_is_named() -> None:
    with pytest.raises(MlcilError, match="provenance must be JSON-serialisable"):
        cache.provenance_key({"x": float("nan")}, "provenance")


def test_stamped_adds_bookkeeping_without_overriding_it() -> None:
    record = cache.stamped({"source": "s", "created": "then"})
    assert record["created"] == "then" and record["mlcil_version"]
    assert "created" in cache.stamped({})


def test_atomic_array_writes_leave_no_temporary_file(tmp_path: Path) -> None:
    cache.save_array_atomic(tmp_path / "a.npy", np.arange(3))
    cache.save_arrays_atomic(tmp_path / "b.npz", {"x": np.ones(2, dtype=np.uint8)})
    assert np.load(tmp_path / "a.npy").tolist() == [0, 1, 2]
    with np.load(tmp_path / "b.npz") as arrays:
        assert arrays["x"].tolist() == [1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npz"]


def _hold_then_append(lock: str, log: str, hold: float) -> None:
    with cache.exclusive(lock):
        with open(log, "a") as handle:
            handle.write("start\n")
        time.sleep(hold)
        with open(log, "a") as handle:
            handle.write("end\n")


def test_the_build_lock_serialises_two_processes(tmp_path: Path) -> None:
    lock, log = str(tmp_path / "sub" / "build.lock"), str(tmp_path / "log")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_hold_then_append, args=(lock, log, 0.3)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    # Never two "start" in a row: the second holder waited for the first to finish.
    assert Path(log).read_text().split() == ["start", "end", "start", "end"]

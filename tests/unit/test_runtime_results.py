"""Runtime (device, precision, seeding) and the assembly of metrics.json."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mlcil.config import TrainConfig
from mlcil.errors import ConfigError
from mlcil.results import summarize, write_results
from mlcil.runtime import Runtime, derive_seed, seed_everything, stream_key


def test_derived_seeds_are_stable_distinct_and_31_bit() -> None:
    seeds = {derive_seed(3407, session, epoch) for session in range(8) for epoch in range(20)}
    assert len(seeds) == 160
    assert all(0 <= s < 2**31 for s in seeds)
    assert derive_seed(3407, 2, 5) == derive_seed(3407, 2, 5) != derive_seed(3408, 2, 5)


def test_a_named_stream_enters_as_its_stable_hash() -> None:
    # The key is the first 8 bytes of the name's SHA-256, big-endian.
    digest = hashlib.sha256(b"engine/growth").digest()
    assert stream_key("engine/growth") == int.from_bytes(digest[:8], "big")
    named = derive_seed(3407, 2, "engine/growth")
    assert named == derive_seed(3407, 2, stream_key("engine/growth"))
    assert named != derive_seed(3407, 2, "engine/memory") and 0 <= named < 2**31


def test_seed_everything_makes_torch_and_numpy_repeat() -> None:
    seed_everything(11)
    first = (torch.rand(3), np.random.rand(3))
    seed_everything(11)
    second = (torch.rand(3), np.random.rand(3))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])


def test_runtime_resolves_device_and_precision() -> None:
    runtime = Runtime.from_config(TrainConfig(device="cpu"), num_workers=0)
    assert runtime.device.type == "cpu" and runtime.precision == "fp32" and runtime.is_main
    assert not runtime.grad_scaler().is_enabled()
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        Runtime.from_config(TrainConfig(device="cpu", precision="fp16"), num_workers=0)
    bf16 = Runtime.from_config(TrainConfig(device="cpu", precision="bf16"), num_workers=0)
    with bf16.autocast():
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="not a device"):
        Runtime.from_config(TrainConfig(device="toaster"), num_workers=0)


def test_loader_shuffle_depends_only_on_its_seed() -> None:
    runtime = Runtime.from_config(TrainConfig(device="cpu"), num_workers=0)
    data = torch.utils.data.TensorDataset(torch.arange(50))
    first = [b[0].tolist() for b in runtime.loader(data, 10, shuffle=True, seed=5)]
    torch.manual_seed(999)  # global state must not matter
    second = [b[0].tolist() for b in runtime.loader(data, 10, shuffle=True, seed=5)]
    third = [b[0].tolist() for b in runtime.loader(data, 10, shuffle=True, seed=6)]
    assert first == second != third


def _session(index: int, seen: int, maps: float, ap: list[float]) -> dict:
    return {
        "index": index,
        "classes": [str(c) for c in range(seen - 2, seen)],
        "num_seen": seen,
        "seen_map": maps,
        "base_map": maps,
        "new_map": None if index == 0 else maps,
        "ap": {str(c): value for c, value in enumerate(ap)},
    }


def test_summarize_and_write_results(tmp_path: Path) -> None:
    sessions = [
        _session(0, 2, 80.0, [80.0, 80.0]),
        _session(1, 4, 60.0, [50.0, 70.0, 60.0, 60.0]),
    ]
    scores = np.array([[0.9, 0.1, 0.85, 0.2], [0.7, 0.95, 0.1, 0.9]])
    targets = np.array([[1, 0, 1, 0], [0, 1, 0, 1]])
    header = {"method": "krt", "dataset": "digits", "protocol": "B0-C2", "seed": 0}
    metrics = summarize(sessions, scores, targets, 0.8, header, 12.5)
    assert metrics.avg_map == 70.0 and metrics.last_map == 60.0
    # Forgetting: class 0 80 -> 50 (30), class 1 80 -> 70 (10): mean 20 points.
    assert math.isclose(metrics.forgetting or 0.0, 20.0)
    # At 0.8: predicted positives (0,0), (0,2), (1,1), (1,3) are all correct, (1,0) at 0.7 not.
    assert metrics.final.op == 100.0 and metrics.final.overall_recall == 100.0
    assert metrics.final.threshold == 0.8 and metrics.method == "krt"
    assert metrics.finished and metrics.planned_sessions == 2 and metrics.version == 2
    metrics.final.cp = float("nan")  # JSON has no NaN: written as null
    write_results(tmp_path, metrics)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["final"]["cp"] is None and saved["sessions"][0]["new_map"] is None
    assert saved["final"]["or"] == 100.0  # the file's key, a Python keyword
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("session,classes,num_seen,seen_map") and len(lines) == 3
    assert lines[1].split(",")[5] == ""  # no new_map in the first session
    assert (tmp_path / "map_per_session.png").stat().st_size > 1000


def test_the_record_round_trips_through_its_file_and_marks_a_run_in_progress(
    tmp_path: Path,
) -> None:
    from mlcil.results import read_metrics, run_finished

    sessions = [_session(0, 2, 80.0, [80.0, 80.0])]
    sessions[0]["diagnostics"] = {"restore": None, "embedding_drift": None, "logit_drift": None}
    sessions[0]["method_state"] = {"threshold": 0.5}
    scores, targets = np.array([[0.9, 0.1]]), np.array([[1, 0]])
    header = {"method": "krt", "dataset": "digits", "protocol": "B0-C2", "seed": 3, "extra": [1]}
    metrics = summarize(sessions, scores, targets, 0.8, header, 1.0, planned_sessions=5)
    assert not metrics.finished and metrics.planned_sessions == 5
    assert not run_finished(tmp_path)  # no file yet
    write_results(tmp_path, metrics)
    again = read_metrics(tmp_path)
    assert again == metrics and again.plain() == metrics.plain()
    assert not run_finished(tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert list(saved)[:4] == ["format", "version", "finished", "planned_sessions"]
    assert saved["finished"] is False and saved["extra"] == [1]  # unknown keys are kept
    assert saved["sessions"][0]["method_state"] == {"threshold": 0.5}
    assert read_metrics(tmp_path / "elsewhere") is None


def test_a_version_1_file_reads_as_a_finished_run_and_is_kept_as_written(tmp_path: Path) -> None:
    from mlcil.record import RunMetrics
    from mlcil.results import read_metrics, run_finished

    # What the first mlcil wrote at the end of a run: no format, version or finished flag.
    old = {
        "method": "krt", "label": "krt", "dataset": "digits", "protocol": "B0-C2",
        "class_order": None, "seed": 0, "device": "cpu", "pretrained": {"source": "glyphs-v1"},
        "sessions": [_session(0, 2, 80.0, [80.0, 80.0])], "avg_map": 80.0, "last_map": 80.0,
        "final": {"cp": 1.0, "cr": 2.0, "cf1": 3.0, "op": 4.0, "or": 5.0, "of1": 6.0,
                  "mean_class_f1": 7.0, "threshold": 0.8},
        "forgetting": None, "wall_time_s": 3.0,
    }  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps(old))
    record = read_metrics(tmp_path)
    assert record is not None and record.finished and record.version == 1
    assert record.pretrained is not None and record.pretrained.source == "glyphs-v1"
    assert run_finished(tmp_path)
    assert json.loads(record.to_json()) == old  # rewritten, it is still the same file
    assert RunMetrics.from_json(record.to_json(), "x") == record


def test_deterministic_mode_is_switched_on_and_back_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # put back as it was after
    try:
        Runtime.from_config(TrainConfig(device="cpu", deterministic=True), num_workers=0)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        # A later run in the same process (a notebook) gets the defaults back.
        Runtime.from_config(TrainConfig(device="cpu"), num_workers=0)
        assert not torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_the_header_records_versions_device_threads_and_determinism() -> None:
    import timm

    from mlcil import __version__
    from mlcil.config import RunConfig
    from mlcil.results import run_header

    header = run_header(RunConfig(), torch.device("cpu"))
    assert header["torch_version"] == torch.__version__
    assert header["timm_version"] == timm.__version__ and header["mlcil_version"] == __version__
    assert header["device"] == "cpu" and isinstance(header["device_name"], str)
    assert header["device_name"]
    assert header["threads"] == torch.get_num_threads()
    assert header["deterministic"] is torch.are_deterministic_algorithms_enabled() is False
    # The identifying fields come first, as before.
    assert list(header)[:3] == ["method", "label", "dataset"]


def test_run_files_are_written_by_the_main_process_and_every_process_then_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every process calls main_writes; only rank 0 writes, and every rank then meets at the
    # barrier (so no rank reads a checkpoint or metrics.json before it is complete).
    events: list[tuple[int, str]] = []
    monkeypatch.setattr(Runtime, "barrier", lambda self: events.append((self.rank, "barrier")))
    results = []
    for rank in (0, 1):
        runtime = Runtime(torch.device("cpu"), "fp32", rank=rank, world_size=2)
        results.append(runtime.main_writes(lambda rank=rank: events.append((rank, "write")) or 7))
    assert events == [(0, "write"), (0, "barrier"), (1, "barrier")]
    assert results == [7, None]

"""benchmarks/scale.py and benchmarks/gpu.py: a tiny measured run through every phase on the CPU
(records that match the run's own sessions), the projection's arithmetic, and gpu.py's pieces
(the engine's train_step in a second session, the loader's throughput, the busy fractions)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mlcil.diagnostics import PROBE_IMAGES, RESTORE_IMAGES
from mlcil.experiment import load_config
from mlcil.protocol import Session
from tiny import CONFIGS, REPO, experiment_of

# The benchmarks are scripts, not a package: import them from their folder as gpu.py does.
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))
scale = importlib.import_module("scale")
gpu = importlib.import_module("gpu")

TINY_ARGS = [
    "--test-images", "60", "--jpeg-size", "160", "120", "--epochs", "1", "--max-sessions", "2",
    "--backbone", "resnet18", "--model-image-size", "32", "--num-workers", "0",
    "--batch-size", "32", "--plan-images", "200", "--device", "cpu",
    "--set", "model.embed_dim=32", "--set", "model.num_heads=4", "--set", "train.progress=false",
    "--set", "train.tensorboard=false",
]  # fmt: skip
TRAIN_IMAGES = 120


def tiny_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    scale.add_arguments(parser)
    return parser.parse_args([*TINY_ARGS, *extra])


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One tiny COCO B0-C10 scale run (2 sessions, 1 epoch each) and its JSON document."""
    workdir = tmp_path_factory.mktemp("scale")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLCIL_CACHE", str(workdir / "cache"))  # the annotation cache stays here
        result = scale.run_scale(tiny_args(), TRAIN_IMAGES, workdir)
        yield result, json.loads(json.dumps(result.to_json({}), default=str)), workdir


def records_of(document: dict[str, Any], phase: str) -> dict[int, list[dict[str, Any]]]:
    found: dict[int, list[dict[str, Any]]] = {}
    for record in document["phases"]:
        if record["phase"] == phase:
            found.setdefault(record["session"], []).append(record)
    return found


def test_every_phase_is_timed(measured: Any) -> None:
    result, document, _ = measured
    shape = scale.run_shape(result.measurement.config)
    kinds = {scale.phase_kind(record, shape) for record in document["phases"]}
    assert set(scale.ONCE_KINDS) | set(scale.SESSION_KINDS) <= kinds
    for record in document["phases"]:
        if record["session"] == 0 and record["phase"] in ("begin_session", "after_evaluation"):
            # Growth alone, and no diagnostics before there are old classes: may round to 0.
            assert record["seconds"] >= 0
        else:
            assert record["seconds"] > 0, record
    begin = records_of(document, "begin_session")
    assert sorted(begin) == [0, 1]  # the DPL pass is session 1's begin_session
    # The tree is reported apart, with the images asked for.
    assert document["tree"]["images"] == TRAIN_IMAGES + 60
    assert document["tree"]["seconds"] > 0


def test_image_counts_match_the_run(measured: Any) -> None:
    result, document, _ = measured
    plan = {row["session"]: row for row in document["plan"]}
    assert len(plan) == 8  # the whole B0-C10 plan, though 2 sessions were trained
    sessions = {row["index"]: row for row in document["sessions"]}
    assert sorted(sessions) == [0, 1]
    evaluation, epochs = records_of(document, "evaluation"), records_of(document, "epoch")
    herding = records_of(document, "herding")
    for index, load in sessions.items():
        assert load["train_images"] == plan[index]["train_images"] > 0
        [evaluated] = evaluation[index]
        assert evaluated["images"] == load["test_images"] == plan[index]["test_images"]
        [epoch] = epochs[index]  # one epoch per session
        assert epoch["images"] == load["train_images"] + load["memory_images"]
        [herded] = herding[index]
        assert herded["images"] == load["train_images"]
    assert sessions[0]["memory_images"] == 0 < sessions[1]["memory_images"]
    parse = records_of(document, "parse")[None][0]
    assert parse["images"] == TRAIN_IMAGES + 60  # one row per image of both splits
    # The teacher pass read session 1's training set, exemplars included.
    shape = scale.run_shape(result.measurement.config)
    work = scale.session_work(result.measurement.loads[1], shape)
    assert work["teacher_pass"] == sessions[1]["train_images"] + sessions[1]["memory_images"]
    assert document["unit_costs"]["teacher_pass"]["work"] == work["teacher_pass"]


def test_projection_of_both_datasets(measured: Any) -> None:
    _, document, _ = measured
    rows = {row["target"]: row for row in document["projections"]}
    coco, voc = rows["COCO 2014 B0-C10"], rows["VOC 2007 B0-C4"]
    assert len(coco["sessions"]) == 8 and len(voc["sessions"]) == 5
    for row in (coco, voc):
        assert row["not_measured"] == []
        assert row["total_s"] == pytest.approx(sum(row["seconds"].values()))
        assert all(seconds > 0 for seconds in row["seconds"].values())
        assert "extrapolation from 180 measured images" in row["note"]
        assert [s["epochs"] for s in row["sessions"]] == [20] * len(row["sessions"])
    # COCO's session sizes are the measured tree's, times 82,783 / 120 (and 40,504 / 60).
    plan = {row["session"]: row for row in document["plan"]}
    for session in coco["sessions"]:
        sizes = plan[session["index"]]
        assert session["train_images"] == round(sizes["train_images"] * 82_783 / TRAIN_IMAGES)
        assert session["test_images"] == round(sizes["test_images"] * 40_504 / 60)
        assert session["memory_images"] == 20 * 10 * session["index"]  # 20 per old class
    # The full-size COCO run reads far more than VOC's; so it takes longer.
    assert coco["total_s"] > voc["total_s"]


def test_tables_print(measured: Any) -> None:
    result, _, _ = measured
    table = scale.phase_table(result.measurement.records)
    assert table.count("\n") == len(result.measurement.records)  # a header and one line each
    assert "training epochs" in scale.projection_table(result.projections)


# --- the projection's arithmetic ---------------------------------------------------------------

KRT_SHAPE = scale.RunShape(teacher_pass=True, diagnostics=True, memory=True)
COSTS = {
    "parse": 1e-4,
    "sessions": 1e-5,
    "run_start": 2e-4,
    "growth": 0.5,
    "teacher_pass": 0.002,
    "epoch": 0.01,
    "evaluation": 0.003,
    "diagnostics": 0.004,
    "herding": 0.0025,
    "checkpoint": 1.5,
}


def loads(scale_by: int, memory: int = 0) -> list[Any]:
    return [
        scale.SessionLoad(i, 100 * (i + 1) * scale_by, 50 * scale_by, memory * i, 3)
        for i in range(3)
    ]


def test_doubling_the_images_doubles_the_per_image_phases() -> None:
    once = scale.project(COSTS, loads(1), KRT_SHAPE, 1000)
    twice = scale.project(COSTS, loads(2), KRT_SHAPE, 2000)
    for kind in ("epoch", "teacher_pass", "evaluation", "herding", *scale.ONCE_KINDS):
        assert twice["seconds"][kind] == pytest.approx(2 * once["seconds"][kind], rel=1e-12)
    for kind in ("growth", "checkpoint"):  # per session: unchanged
        assert twice["seconds"][kind] == once["seconds"][kind]
    # 3 epochs of (100 + 200 + 300) images at 0.01 s each.
    assert once["seconds"]["epoch"] == pytest.approx(3 * 600 * 0.01)
    assert once["seconds"]["growth"] == 0.5  # only the first session grows without a pass
    assert once["seconds"]["checkpoint"] == 3 * 1.5


def test_session_work_counts_what_each_phase_reads() -> None:
    first, later = scale.SessionLoad(0, 5000, 900, 0, 2), scale.SessionLoad(1, 5000, 900, 40, 2)
    assert scale.session_work(first, KRT_SHAPE) == {
        "epoch": 10_000, "evaluation": 900, "checkpoint": 1, "growth": 1, "herding": 5000,
    }  # fmt: skip
    work = scale.session_work(later, KRT_SHAPE)
    assert work["teacher_pass"] == 5040 and work["epoch"] == 2 * 5040 and "growth" not in work
    assert work["diagnostics"] == PROBE_IMAGES + RESTORE_IMAGES  # at most RESTORE_IMAGES own
    plain = scale.RunShape(teacher_pass=False, diagnostics=False, memory=False)
    assert scale.session_work(later, plain) == {
        "epoch": 2 * 5040, "evaluation": 900, "checkpoint": 1, "growth": 1,
    }  # fmt: skip


def test_unit_costs_pool_every_record_of_a_kind() -> None:
    run = [scale.SessionLoad(0, 100, 40, 0, 2), scale.SessionLoad(1, 200, 60, 20, 2)]
    records = [
        {"session": None, "phase": "parse", "seconds": 0.5, "images": 1000},
        {"session": 0, "phase": "begin_session", "seconds": 0.2, "images": 0},
        {"session": 0, "phase": "epoch", "seconds": 10.0, "images": 100},
        {"session": 0, "phase": "epoch", "seconds": 30.0, "images": 100},
        {"session": 1, "phase": "begin_session", "seconds": 4.4, "images": 0},
        {"session": 0, "phase": "checkpoint", "seconds": 1.0, "images": 0},
        {"session": 1, "phase": "checkpoint", "seconds": 3.0, "images": 0},
    ]
    costs = scale.unit_costs(records, run, KRT_SHAPE)
    assert costs["epoch"]["cost"] == pytest.approx(40.0 / 200)
    assert costs["teacher_pass"]["cost"] == pytest.approx(4.4 / 220)  # 200 own + 20 exemplars
    assert costs["growth"]["cost"] == pytest.approx(0.2)
    assert costs["checkpoint"]["cost"] == pytest.approx(2.0)  # per session
    assert costs["parse"]["cost"] == pytest.approx(0.5 / 1000)


def test_scaled_loads_use_the_target_config() -> None:
    config = load_config(CONFIGS / "coco_b0_c10.yaml", ["model.pretrained=null"])
    sizes = [
        {"session": 0, "train_images": 30, "test_images": 10},
        {"session": 1, "train_images": 50, "test_images": 25},
    ]
    full = scale.scaled_loads(sizes, [0, 10], (120, 60), (1200, 600), config)
    assert [dataclasses.astuple(load) for load in full] == [
        (0, 300, 100, 0, 20),
        (1, 500, 250, 200, 20),  # memory: 20 exemplars x 10 old classes
    ]


def test_run_shape_follows_the_method() -> None:
    krt = load_config(CONFIGS / "coco_b0_c10.yaml", ["model.pretrained=null"])
    assert scale.run_shape(krt) == scale.RunShape(True, True, True)
    no_dpl = load_config(
        CONFIGS / "coco_b0_c10.yaml", ["model.pretrained=null", "method.old_classes=negative"]
    )
    assert not scale.run_shape(no_dpl).teacher_pass
    files = [CONFIGS / "coco_b0_c10.yaml", CONFIGS / "methods" / "finetune.yaml"]
    finetune = load_config(files, ["model.pretrained=null"])
    assert scale.run_shape(finetune) == scale.RunShape(False, True, False)


# --- gpu.py's pieces ---------------------------------------------------------------------------


def tiny_config(workdir: Path, *files: Path) -> Any:
    root = workdir / "tree"
    overrides = scale.measurement_overrides(tiny_args(), root)
    if files:  # the linear network of fine-tuning takes no ICA keys
        overrides = [o for o in overrides if not o.startswith(("model.embed_dim", "model.num_h"))]
    return load_config([CONFIGS / "coco_b0_c10.yaml", *files], overrides)


@pytest.mark.parametrize("method", ["finetune", "krt"])
def test_engine_step_in_the_second_session(measured: Any, method: str) -> None:
    _, _, workdir = measured
    extra = [CONFIGS / "methods" / "finetune.yaml"] if method == "finetune" else []
    config = tiny_config(workdir, *extra)
    setup = gpu.prepare_second_session(config, scale.parse_splits(config), teacher_images=16)
    assert setup.context.session.index == 1
    assert setup.method.network.num_sessions == 2
    if method == "krt":  # the step distils from a teacher and uses a DPL threshold
        assert setup.method.old_network is not None
        assert setup.method.pseudo_label_threshold is not None
    before = [p.detach().clone() for p in setup.method.network.parameters() if p.requires_grad]
    row = gpu.time_steps(setup, batch_size=4, steps=2, warmup=1, sampler=None)
    assert row["step_ms"] > 0 and row["images_per_s"] > 0
    assert row["peak_gpu_mb"] is None and row["gpu_busy"] is None
    after = [p for p in setup.method.network.parameters() if p.requires_grad]
    assert any(not a.equal(b) for a, b in zip(after, before, strict=True))  # steps were taken


def test_loader_throughput_counts_the_batches_after_the_first(measured: Any) -> None:
    _, _, workdir = measured
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLCIL_CACHE", str(workdir / "cache"))
        row = gpu.loading_throughput(experiment_of(tiny_config(workdir)), batches=2)
    assert row["batch_size"] == 32 and row["num_workers"] == 0
    assert row["images"] == 2 * 32  # batches 1 and 2 (the first one timed apart)
    assert row["first_batch_s"] > 0 and row["images_per_s"] > 0


def test_busy_fractions() -> None:
    samples = [(1.0, 10.0), (2.0, 30.0), (3.0, 80.0)]
    assert gpu.mean_between(samples, 0.5, 2.5) == pytest.approx(20.0)
    assert gpu.mean_between(samples, 3.5, 4.0) is None
    sampler = gpu.UtilizationSampler(torch.device("cpu"))
    assert sampler.start() is False  # nothing to sample on the CPU: no thread started
    assert sampler.busy(0.0, 1e9) is None
    # A phase's busy fraction is the mean of the samples taken while it ran (it ended now).
    now = time.perf_counter()
    sampler.samples = [(now - 5.0, 10.0), (now - 1.5, 30.0), (now - 0.5, 50.0)]
    observer = gpu.BusyObserver(sampler)
    observer.phase_finished(Session(0, [0], [0]), "epoch", 2.0, 10)
    observer.phase_finished(Session(0, [0], [0]), "checkpoint", 0.1, 0)
    assert observer.busy == [pytest.approx(0.4), None]

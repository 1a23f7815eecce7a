"""Scale benchmark: a published protocol on a synthetic tree, timed phase by phase, and the wall
time of the full-size run projected from it.

Usage::

    python benchmarks/scale.py                                   # COCO B0-C10 as published
    python benchmarks/scale.py --backbone resnet18 --model-image-size 64 --epochs 1 \\
        --max-sessions 2 --num-workers 2                         # the same code path on a CPU
    python benchmarks/scale.py --config configs/voc_b0_c4.yaml   # a VOC-layout tree instead
    python benchmarks/scale.py --nproc 2 ...                     # 2 processes (torchrun)

What is timed, in order: writing the synthetic tree (reported apart: a real run has its images
already), parsing both splits' annotations (``load_coco``/``load_voc``, no annotation cache),
building the sessions (``RunPlan`` and ``Experiment``), starting the run (``start_run``: the
config's experiment again, the pre-flight check of every image file, the network), then every
phase the engine reports to :class:`mlcil.engine.observers.PhaseTimer`: ``begin_session``
(growth; from the second session on, KRT's teacher pass that picks the DPL threshold), each
``epoch``, ``evaluation``, ``after_evaluation`` (diagnostics), ``herding`` and ``checkpoint``.

The projection multiplies each phase kind's measured cost per image read (per session for
growth and checkpoints) by what the full-size run reads: the published dataset's image counts
spread over the sessions as the synthetic tree spreads its own (the synthetic labels follow the
real class frequencies), the target config's epochs and exemplar memory. It is an extrapolation
from the images measured here, for the network, input size, batch, precision and loader workers
measured (a ResNet-18 at 64 px projects a ResNet-18 at 64 px, not the published TResNet-M), on
this machine; fixed costs that do not grow with the images (worker start-up) are spread over
them, so a small measurement overestimates them.

Processes: ``--nproc N`` writes the tree here, then runs this script again under
``python -m torch.distributed.run --standalone --nproc_per_node N`` (one machine); rank 0 reports.
Running it under ``torchrun`` directly works too, with ``--root`` naming a tree written before.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mlcil.config.schema import RunConfig
from mlcil.data.base import ImageSource
from mlcil.data.synthetic import (
    COCO_TRAIN_IMAGES,
    COCO_VAL_IMAGES,
    VOC_TEST_IMAGES,
    VOC_TRAINVAL_IMAGES,
    write_synthetic_coco,
    write_synthetic_voc,
)
from mlcil.diagnostics import PROBE_IMAGES, RESTORE_IMAGES
from mlcil.engine.observers import Observer, PhaseTimer
from mlcil.experiment import Experiment, RunPlan, load_config
from mlcil.old_classes import RULES_WITH_THRESHOLD
from mlcil.runs import make_runtime, start_run
from mlcil.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Phase kinds, in the order a run meets them. "Once" kinds happen once per run and cost in
# proportion to all the images of both splits; the others happen in every session.
ONCE_KINDS = ("parse", "sessions", "run_start")
SESSION_KINDS = (
    "growth",  # begin_session without a pass over images (the first session, or no DPL)
    "teacher_pass",  # begin_session of a later KRT session: growth + the DPL threshold pass
    "epoch",
    "evaluation",
    "diagnostics",  # the engine's after_evaluation phase
    "herding",
    "checkpoint",
)
PER_SESSION_KINDS = frozenset({"growth", "checkpoint"})  # priced per session, not per image
KIND_LABELS = {
    "parse": "annotation parsing (both splits)",
    "sessions": "session building (plan, experiment)",
    "run_start": "run start (experiment, pre-flight of every image, network)",
    "growth": "begin_session: growth",
    "teacher_pass": "begin_session: growth + teacher/DPL pass",
    "epoch": "training epochs",
    "evaluation": "evaluation",
    "diagnostics": "after_evaluation: diagnostics",
    "herding": "herding",
    "checkpoint": "checkpoint writing",
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A full-size run to project: a published config and its dataset's real image counts."""

    name: str
    config: Path
    train_images: int
    test_images: int


TARGETS: dict[str, Target] = {
    "coco": Target(
        "COCO 2014 B0-C10", CONFIGS / "coco_b0_c10.yaml", COCO_TRAIN_IMAGES, COCO_VAL_IMAGES
    ),
    "voc": Target(
        "VOC 2007 B0-C4", CONFIGS / "voc_b0_c4.yaml", VOC_TRAINVAL_IMAGES, VOC_TEST_IMAGES
    ),
}


@dataclasses.dataclass(frozen=True)
class SessionLoad:
    """What one session reads: its own training images, the exemplars replayed with them, the
    test images of the classes seen after it, and its epochs."""

    index: int
    train_images: int
    test_images: int
    memory_images: int
    epochs: int


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What decides which phases a run has besides its sessions' sizes."""

    teacher_pass: bool  # later sessions begin with a pass of the teacher over their images
    diagnostics: bool  # train.diagnostics
    memory: bool  # exemplar memory (herding after every session)


def session_work(load: SessionLoad, shape: RunShape) -> dict[str, int]:
    """Work of each phase kind in one session: images read, or 1 for per-session kinds.

    The engine reports image counts for epochs, evaluation and herding; this function also gives
    those of the phases it does not count (the teacher pass reads the session's training set,
    exemplars included; the diagnostics read the probe and at most ``RESTORE_IMAGES`` of the
    session's own images), so measured and projected work are counted the same way.
    """
    train_set = load.train_images + load.memory_images
    work = {
        "epoch": load.epochs * train_set,
        "evaluation": load.test_images,
        "checkpoint": 1,
    }
    if load.index > 0 and shape.teacher_pass:
        work["teacher_pass"] = train_set
    else:
        work["growth"] = 1
    if shape.diagnostics and load.index > 0:
        work["diagnostics"] = PROBE_IMAGES + min(RESTORE_IMAGES, load.train_images)
    if shape.memory:
        work["herding"] = load.train_images
    return work


def phase_kind(record: dict[str, Any], shape: RunShape) -> str:
    """The projection's kind of one PhaseTimer record."""
    phase = record["phase"]
    if phase == "begin_session":
        return "teacher_pass" if record["session"] > 0 and shape.teacher_pass else "growth"
    if phase == "after_evaluation":
        return "diagnostics"
    return str(phase)


def unit_costs(
    records: Sequence[dict[str, Any]], loads: Sequence[SessionLoad], shape: RunShape
) -> dict[str, dict[str, float]]:
    """Seconds per unit of work of every phase kind measured: per image, or per session for
    growth and checkpoints; pooled over all the kind's records (total seconds / total work).

    ``records`` are PhaseTimer records plus the once-per-run phases (``session`` None) whose
    ``images`` are the images of both splits.
    """
    by_index = {load.index: load for load in loads}
    totals: dict[str, list[float]] = {}
    for record in records:
        kind = phase_kind(record, shape)
        if kind in ONCE_KINDS:
            work = float(record["images"])
        elif kind in PER_SESSION_KINDS:
            work = 1.0
        elif kind == "epoch":
            work = float(record["images"])  # one record per epoch
        else:
            work = float(session_work(by_index[record["session"]], shape).get(kind, 0))
        seconds_and_work = totals.setdefault(kind, [0.0, 0.0])
        seconds_and_work[0] += record["seconds"]
        seconds_and_work[1] += work
    return {
        kind: {"seconds": seconds, "work": work, "cost": seconds / work}
        for kind, (seconds, work) in totals.items()
        if work > 0
    }


def project(
    costs: dict[str, float], loads: Sequence[SessionLoad], shape: RunShape, total_images: int
) -> dict[str, Any]:
    """Projected seconds of each phase kind and in total for a run of ``loads``.

    Args:
        costs: seconds per unit of work of each kind (:func:`unit_costs`' ``cost``).
        loads: the projected run's sessions.
        shape: which phases it has.
        total_images: images of both its splits (the once-per-run phases read them all).

    Returns:
        ``{"seconds": {kind: s}, "total_s", "not_measured": [kinds the run has but no cost]}``.
    """
    seconds: dict[str, float] = {}
    missing: set[str] = set()

    def add(kind: str, work: float) -> None:
        if kind not in costs:
            missing.add(kind)
            return
        seconds[kind] = seconds.get(kind, 0.0) + work * costs[kind]

    for kind in ONCE_KINDS:
        add(kind, total_images)
    for load in loads:
        for kind, work in session_work(load, shape).items():
            add(kind, work)
    ordered = {kind: seconds[kind] for kind in (*ONCE_KINDS, *SESSION_KINDS) if kind in seconds}
    return {
        "seconds": ordered,
        "total_s": sum(ordered.values()),
        "not_measured": sorted(missing),
    }


def run_shape(config: RunConfig) -> RunShape:
    """The phases ``config``'s run has (a teacher pass: an old-class rule with pseudo-labels)."""
    rule = getattr(config.method.params, "old_classes", None)
    return RunShape(
        teacher_pass=rule in RULES_WITH_THRESHOLD,
        diagnostics=config.train.diagnostics,
        memory=config.memory.enabled,
    )


def memory_images(config: RunConfig, num_old_classes: int) -> int:
    """Exemplars replayed in a session with ``num_old_classes`` old classes at full size: the
    quota of every old class (an upper bound: an image picked for two classes is kept once)."""
    memory = config.memory
    if memory.total is not None:
        return memory.total if num_old_classes else 0
    return memory.per_class * num_old_classes


def scaled_loads(
    plan_sizes: Sequence[dict[str, int]],
    num_old: Sequence[int],
    plan_images: tuple[int, int],
    full_images: tuple[int, int],
    config: RunConfig,
) -> list[SessionLoad]:
    """Full-size sessions: a plan's own session sizes times ``full / plan`` images per split,
    with ``config``'s epochs and exemplar memory.

    Args:
        plan_sizes: ``Experiment.session_sizes()`` of a (small) tree.
        num_old: old classes at each session.
        plan_images: (train, test) images of the tree's splits.
        full_images: (train, test) images of the full dataset.
        config: the projected run's config (epochs, memory).
    """
    train_scale = full_images[0] / plan_images[0]
    test_scale = full_images[1] / plan_images[1]
    return [
        SessionLoad(
            index=sizes["session"],
            train_images=round(sizes["train_images"] * train_scale),
            test_images=round(sizes["test_images"] * test_scale),
            memory_images=memory_images(config, old),
            epochs=config.train.epochs_for(sizes["session"]),
        )
        for sizes, old in zip(plan_sizes, num_old, strict=True)
    ]


# --- measuring ------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (``ru_maxrss`` is in KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_gpu_mb() -> float | None:
    """Peak CUDA memory allocated since the last reset (None without CUDA); resets it."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    peak = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    torch.cuda.reset_peak_memory_stats()
    return peak


def timed_record(phase: str, function: Callable[[], Any], images: int = 0) -> tuple[Any, dict]:
    """Run ``function``; return its value and a record shaped like PhaseTimer's (session None:
    a once-per-run phase)."""
    peak_gpu_mb()  # resets the peak: the record holds this phase's own
    started = time.perf_counter()
    value = function()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return value, {
        "session": None,
        "phase": phase,
        "seconds": round(seconds, 4),
        "images": images,
        "images_per_s": round(images / seconds, 1) if images and seconds > 0 else None,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": peak_gpu_mb(),
    }


def write_tree(
    dataset: str,
    root: Path,
    train_images: int,
    test_images: int,
    image_size: tuple[int, int],
    seed: int = 0,
    jobs: int = 1,
) -> dict[str, Any]:
    """Write a synthetic ``coco`` or ``voc`` tree; its summary (``seconds``, ``images`` ...)."""
    writers = {"coco": write_synthetic_coco, "voc": write_synthetic_voc}
    if dataset not in writers:
        raise SystemExit(f"scale.py: no synthetic tree for dataset {dataset!r} (coco or voc)")
    return writers[dataset](root, train_images, test_images, seed, image_size, jobs)


def parse_splits(config: RunConfig) -> tuple[ImageSource, ImageSource]:
    """Both splits of ``config``'s dataset parsed from their annotation files (no annotation
    cache), in the config's class order as ``build_sources`` gives them."""
    from mlcil.data.coco import load_coco
    from mlcil.data.voc import load_voc

    loaders = {"coco": load_coco, "voc": load_voc}
    root = config.data.root
    assert root is not None
    train, test = (loaders[config.data.dataset](root, split) for split in ("train", "test"))
    if config.data.class_order is not None:
        for source in (train, test):
            source.reorder_classes(config.data.class_order)
    return train, test


def build_experiment(
    config: RunConfig, sources: tuple[ImageSource, ImageSource], runtime: Runtime
) -> tuple[Experiment, list[dict[str, int]]]:
    """The run's plan and experiment on parsed ``sources``, and its session sizes."""
    plan = RunPlan.from_config(config, sources)
    experiment = Experiment(config, runtime=runtime, plan=plan)
    return experiment, experiment.session_sizes()


def measurement_overrides(args: argparse.Namespace, root: Path) -> list[str]:
    """The ``key=value`` overrides of the measured run."""
    overrides = [f"data.root={root}", "model.pretrained=null"]  # nothing can be downloaded
    if args.epochs is not None:
        overrides += [f"train.epochs={args.epochs}", f"train.base_epochs={args.epochs}"]
    for key, value in (
        ("model.backbone", args.backbone),
        ("data.image_size", args.model_image_size),
        ("data.num_workers", args.num_workers),
        ("train.device", args.device),
        ("train.batch_size", args.batch_size),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    return [*overrides, *args.set]


@dataclasses.dataclass
class Measurement:
    """A measured run: its config, phase records, sessions and what the tree was."""

    config: RunConfig
    records: list[dict[str, Any]]  # once-per-run phases first, then the engine's
    loads: list[SessionLoad]  # the sessions trained
    plan_sizes: list[dict[str, int]]  # every session of the plan (trained or not)
    num_old: list[int]
    source_images: tuple[int, int]
    sources: tuple[ImageSource, ImageSource]
    runtime: Runtime


def measure_run(
    config: RunConfig,
    run_dir: Path,
    max_sessions: int | None = None,
    observers: Sequence[Observer] = (),
) -> Measurement:
    """Parse, plan, start and train ``config`` (at most ``max_sessions`` sessions), timing
    every phase."""
    runtime = make_runtime(config)
    sources, parse = timed_record("parse", lambda: parse_splits(config))
    total = len(sources[0]) + len(sources[1])
    parse.update(images=total, images_per_s=round(total / max(parse["seconds"], 1e-9), 1))
    (experiment, plan_sizes), building = timed_record(
        "sessions", lambda: build_experiment(config, sources, runtime), total
    )
    timer = PhaseTimer()
    launch, starting = timed_record(
        "run_start",
        lambda: start_run(config, run_dir, runtime=runtime, observers=[timer, *observers]),
        total,
    )
    launch.run(max_sessions=max_sessions)
    state = launch.trainer.state
    assert state is not None
    sessions = experiment.sessions
    loads = [
        SessionLoad(
            index=result["index"],
            train_images=result["train_images"],
            test_images=result["test_images"],
            memory_images=result["memory_images"],
            epochs=config.train.epochs_for(result["index"]),
        )
        for result in state.results
    ]
    return Measurement(
        config=config,
        records=[parse, building, starting, *timer.records],
        loads=loads,
        plan_sizes=plan_sizes,
        num_old=[session.num_old for session in sessions],
        source_images=(len(sources[0]), len(sources[1])),
        sources=sources,
        runtime=runtime,
    )


def target_plan(
    target: Target, measurement: Measurement, plan_root: Callable[[str], Path]
) -> tuple[RunConfig, list[dict[str, int]], list[int], tuple[int, int]]:
    """The target config and its plan's session sizes, old classes and split sizes: on the
    measured tree when it is of the target's dataset, else on ``plan_root(dataset)`` (a small
    tree written only for its labels)."""
    dataset = load_config(target.config, ["model.pretrained=null"]).data.dataset
    if dataset == measurement.config.data.dataset:
        root, sources = measurement.config.data.root, measurement.sources
    else:
        root = str(plan_root(dataset))
        sources = None
    config = load_config(target.config, [f"data.root={root}", "model.pretrained=null"])
    if sources is None:
        sources = parse_splits(config)
    cpu = Runtime(device=torch.device("cpu"), precision="fp32")
    experiment, sizes = build_experiment(config, sources, cpu)
    num_old = [session.num_old for session in experiment.sessions]
    return config, sizes, num_old, (len(sources[0]), len(sources[1]))


def projections(
    measurement: Measurement,
    targets: Sequence[Target],
    plan_root: Callable[[str], Path],
) -> list[dict[str, Any]]:
    """The projected wall time of each target's full-size run from ``measurement``."""
    shape = run_shape(measurement.config)
    costs = unit_costs(measurement.records, measurement.loads, shape)
    rows = []
    for target in targets:
        config, sizes, num_old, plan_images = target_plan(target, measurement, plan_root)
        full = (target.train_images, target.test_images)
        loads = scaled_loads(sizes, num_old, plan_images, full, config)
        projected = project(
            {kind: entry["cost"] for kind, entry in costs.items()},
            loads,
            run_shape(config),
            sum(full),
        )
        rows.append(
            {
                "target": target.name,
                "config": str(target.config.relative_to(REPO)),
                "train_images": full[0],
                "test_images": full[1],
                "sessions": [dataclasses.asdict(load) for load in loads],
                **projected,
                "note": (
                    f"an extrapolation from {sum(measurement.source_images):,} measured images "
                    f"({measurement.source_images[0]:,} train + {measurement.source_images[1]:,} "
                    f"test, {len(measurement.loads)} of {len(measurement.plan_sizes)} sessions "
                    f"trained) for the measured network and settings "
                    f"({measurement.config.model.backbone} at {measurement.config.data.image_size}"
                    f" px, batch {measurement.config.train.batch_size}, "
                    f"{measurement.runtime.precision}, {measurement.config.data.num_workers} "
                    f"loader workers, {measurement.runtime.world_size} process(es)) on this "
                    "machine; session sizes scaled from a synthetic "
                    f"tree of {plan_images[0]:,} + {plan_images[1]:,} images"
                ),
            }
        )
    return rows


# --- reporting ------------------------------------------------------------------------------


def machine_description(device: torch.device | str) -> dict[str, Any]:
    """Where the figures were measured (as benchmarks/speed.py records it, plus the load)."""
    device = torch.device(device)
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain text table, numbers right-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    lines = [
        "  ".join(
            h.rjust(w) if i else h.ljust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    for row in cells:
        lines.append(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def phase_table(records: Sequence[dict[str, Any]], extra: Sequence[str] = ()) -> str:
    """One line per timed phase (``extra``: more record keys as columns)."""
    header = ["phase", "session", "seconds", "images", "images/s", "peak RSS MB", "peak GPU MB"]
    rows = [
        [
            record["phase"],
            record["session"],
            f"{record['seconds']:.3f}",
            record["images"] or None,
            record["images_per_s"],
            record["peak_rss_mb"],
            record["peak_gpu_mb"],
            *(record.get(key) for key in extra),
        ]
        for record in records
    ]
    return format_table(rows, [*header, *extra])


def projection_table(rows: Sequence[dict[str, Any]]) -> str:
    """Projected seconds per phase kind (lines) and target (columns), then the total."""
    kinds = [k for k in (*ONCE_KINDS, *SESSION_KINDS) if any(k in r["seconds"] for r in rows)]
    table = [[KIND_LABELS[kind], *(row["seconds"].get(kind) for row in rows)] for kind in kinds]
    table.append(["total (s)", *(row["total_s"] for row in rows)])
    table.append(["total (h)", *(row["total_s"] / 3600 for row in rows)])
    return format_table(table, ["projected phase (s)", *(row["target"] for row in rows)])


# --- the script -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options scale.py and gpu.py share (the measured run)."""
    parser.add_argument("--config", default=str(CONFIGS / "coco_b0_c10.yaml"), help="config")
    parser.add_argument("--root", help="tree folder: reused when it holds one, else written")
    parser.add_argument("--test-images", type=int, default=1000, help="test images (1,000)")
    parser.add_argument(
        "--jpeg-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"),
        help="size of the tree's JPEGs (640 480)",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="processes writing the tree")
    parser.add_argument("--epochs", type=int, help="epochs per session (default: the config's)")
    parser.add_argument("--max-sessions", type=int, help="stop after this many sessions")
    parser.add_argument("--backbone", help="model.backbone (e.g. resnet18)")
    parser.add_argument("--model-image-size", type=int, help="data.image_size (network input)")
    parser.add_argument("--batch-size", type=int, help="train.batch_size")
    parser.add_argument("--num-workers", type=int, help="data.num_workers")
    parser.add_argument("--device", help="train.device (default: the config's, auto)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other override"
    )
    parser.add_argument(
        "--targets", nargs="*", choices=sorted(TARGETS), default=sorted(TARGETS),
        help="full-size runs to project (coco voc)",
    )  # fmt: skip
    parser.add_argument(
        "--plan-images", type=int, default=2000,
        help="images per split of the small tree written for a projected dataset's session "
        "sizes when it is not the measured one (2,000)",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="the run's log lines")


@dataclasses.dataclass
class ScaleResult:
    """Everything a scale run measured, as written to JSON."""

    tree: dict[str, Any] | None
    measurement: Measurement
    projections: list[dict[str, Any]]

    def to_json(self, settings: dict[str, Any]) -> dict[str, Any]:
        shape = run_shape(self.measurement.config)
        costs = unit_costs(self.measurement.records, self.measurement.loads, shape)
        return {
            "machine": machine_description(self.measurement.runtime.device),
            "settings": settings,
            "tree": self.tree,
            "phases": self.measurement.records,
            "sessions": [dataclasses.asdict(load) for load in self.measurement.loads],
            "plan": self.measurement.plan_sizes,
            "unit_costs": costs,
            "projections": self.projections,
        }


def ensure_tree(
    dataset: str, root: Path, args: argparse.Namespace, train_images: int
) -> dict[str, Any] | None:
    """Write the tree into ``root`` unless it holds one; the writer's summary or None."""
    if root.is_dir() and any(root.iterdir()):
        return None
    tree = write_tree(
        dataset, root, train_images, args.test_images, tuple(args.jpeg_size), jobs=args.jobs
    )
    tree.pop("splits", None)  # per-split label statistics: not timing
    return tree


def run_scale(
    args: argparse.Namespace,
    train_images: int,
    workdir: Path,
    observers: Sequence[Observer] = (),
    tree: dict[str, Any] | None = None,
) -> ScaleResult:
    """Write (or reuse) the tree, measure the run, project the targets; files under
    ``workdir``."""
    base = load_config(args.config, ["model.pretrained=null"])
    root = Path(args.root) if args.root else workdir / "tree"
    if tree is None and _rank() == 0:
        tree = ensure_tree(base.data.dataset, root, args, train_images)
    config = load_config(args.config, measurement_overrides(args, root))
    measurement = measure_run(config, workdir / "run", args.max_sessions, observers)
    if _rank() != 0:
        return ScaleResult(tree, measurement, [])

    def plan_root(dataset: str) -> Path:
        folder = workdir / f"plan_{dataset}"
        if not folder.exists():
            size = args.plan_images
            write_tree(dataset, folder, size, size, (32, 32), jobs=args.jobs)
        return folder

    targets = [TARGETS[name] for name in args.targets]
    return ScaleResult(tree, measurement, projections(measurement, targets, plan_root))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def configure_logging(verbose: bool) -> None:
    """Warnings only (or every log line with ``verbose``) on stderr: the level is set on the
    handler because each run raises the ``mlcil`` logger to INFO for its log file."""
    handler = logging.StreamHandler()
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def report(result: ScaleResult) -> None:
    """Print the phase table and the projections."""
    tree = result.tree
    if tree is not None:
        print(
            f"synthetic tree (not part of a run): {tree['images']:,} JPEGs of "
            f"{tree['image_size'][0]}x{tree['image_size'][1]} written in {tree['seconds']:.1f} s "
            f"({tree['images_per_second']:.0f} images/s, {tree['megabytes']:.0f} MB)"
        )
    print(phase_table(result.measurement.records))
    for row in result.projections:
        print(f"{row['target']}: {row['note']}")
    if result.projections:
        print(projection_table(result.projections))


def _relaunch(args: argparse.Namespace, workdir: Path, tree: dict[str, Any] | None) -> int:
    """Run this script again in ``args.nproc`` processes on the tree written here."""
    tree_file = workdir / "tree.json"
    tree_file.write_text(json.dumps(tree))
    # Every option but --nproc goes on (the launcher would take "--nproc" for its own
    # --nproc-per-node; the processes know they are not to launch again from WORLD_SIZE).
    argv, skip = [], False
    for argument in sys.argv[1:]:
        if skip or argument == "--nproc" or argument.startswith("--nproc="):
            skip = argument == "--nproc"
            continue
        argv.append(argument)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={args.nproc}", str(Path(__file__).resolve()), *argv,
        "--root", str(Path(args.root or workdir / "tree").resolve()),
        "--workdir", str(workdir.resolve()), "--tree-json", str(tree_file),
    ]  # fmt: skip
    return subprocess.run(command, check=False).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--train-images", type=int, default=2000, help="train images (2,000)")
    parser.add_argument("--output", default="benchmarks/results/scale.json")
    parser.add_argument("--nproc", type=int, default=1, help="processes (torchrun, one machine)")
    parser.add_argument("--workdir", help="folder for the tree and the run (default: temporary)")
    parser.add_argument("--tree-json", help=argparse.SUPPRESS)  # set by --nproc's relaunch
    args = parser.parse_args()
    load_at_start = [round(x, 2) for x in os.getloadavg()]  # others may share the machine
    configure_logging(args.verbose)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not (args.root and args.workdir):
        raise SystemExit("scale.py under torchrun: pass --root (a written tree) and --workdir")
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlcil-scale-")))
        tree = json.loads(Path(args.tree_json).read_text()) if args.tree_json else None
        if args.nproc > 1 and not distributed:
            dataset = load_config(args.config, ["model.pretrained=null"]).data.dataset
            root = Path(args.root) if args.root else workdir / "tree"
            tree = ensure_tree(dataset, root, args, args.train_images)
            raise SystemExit(_relaunch(args, workdir, tree))
        result = run_scale(args, args.train_images, workdir, tree=tree)
        if _rank() != 0:
            return
        report(result)
        settings = {
            key: value for key, value in vars(args).items() if key not in ("tree_json", "verbose")
        }
        settings["overrides"] = measurement_overrides(args, Path(args.root or workdir / "tree"))
        settings["world_size"] = result.measurement.runtime.world_size
        settings["load_average_at_start"] = load_at_start
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result.to_json(settings), indent=1, default=str))
        print(f"written: {output}")


if __name__ == "__main__":
    main()

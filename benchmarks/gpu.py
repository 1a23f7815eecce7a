"""GPU benchmark: data loading, fine-tuning and KRT training steps, GPU busy time and the phase
table of a short COCO B0-C10 run with the projected full-size wall time, on one CUDA GPU with no
network.

Usage::

    python benchmarks/gpu.py                          # CUDA: 20,000-image tree, TResNet-M 224
    python benchmarks/gpu.py --root /scratch/coco20k  # reuse (or keep) the tree
    python benchmarks/gpu.py --cache                  # also data loading from the image cache
    python benchmarks/gpu.py --device cpu --train-images 200 --backbone resnet18 \\
        --image-size 64 --steps 3                     # the CPU check of the same code

What it measures, in order:

1. The synthetic COCO tree (``--train-images``, default 20,000, JPEGs of 640x480), written with
   one process per core unless ``--root`` holds one already.
2. Data loading alone: the training transform over the training split through the engine's
   DataLoader (``Runtime.loader``, ``data.num_workers`` workers, the config's batch), decoding
   the JPEGs, and with ``--cache`` reading ``data.image_cache`` instead (its build timed apart).
3. One optimiser step of fine-tuning (linear network) and of KRT in a second session (teacher
   forward, pseudo-labels, token distillation; ICA network), in each ``--precisions`` at each
   ``--batch-sizes``: the engine's own ``train_step`` (forward, backward, optimiser step, the
   batch's copy to the device) on random images, the median of ``--steps`` steps after
   ``--warmup``, each timed between device synchronisations, and the peak GPU memory.
4. The phase table of benchmarks/scale.py (``--epochs``, ``--max-sessions`` of the config) with
   the GPU busy fraction of every phase (``torch.cuda.utilization()``, else ``nvidia-smi``,
   sampled every 100 ms in a thread) and the projected full-size COCO B0-C10 and VOC B0-C4 runs.

Everything is printed as tables and written to ``--output`` (JSON) with the machine description.
Weights are random (``model.pretrained=null``): nothing is downloaded and the speed is the same.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlcil.config.schema import RunConfig
from mlcil.data.sessions import TargetedImages
from mlcil.data.synthetic import COCO_TRAIN_IMAGES, COCO_VAL_IMAGES
from mlcil.engine.fit import train_step, training_network
from mlcil.engine.observers import Observer
from mlcil.errors import ConfigError, MlcilError
from mlcil.experiment import Experiment, RunPlan, load_config
from mlcil.methods.base import Batch, Method, SessionContext
from mlcil.protocol import Session
from mlcil.runs import make_runtime
from scale import (
    CONFIGS,
    add_arguments,
    configure_logging,
    ensure_tree,
    format_table,
    machine_description,
    measurement_overrides,
    parse_splits,
    phase_table,
    projection_table,
    run_scale,
)

# COCO's published label density: random step targets carry as many positives as real ones.
LABEL_DENSITY = 2.9 / 80
ICA_KEYS = ("model.embed_dim=", "model.num_heads=", "model.mlp_ratio=", "model.ica_init=")


# --- GPU busy time --------------------------------------------------------------------------


def mean_between(samples: Sequence[tuple[float, float]], start: float, end: float) -> float | None:
    """Mean of the ``(time, value)`` samples taken in ``[start, end]`` (None: no sample)."""
    values = [value for moment, value in samples if start <= moment <= end]
    return statistics.fmean(values) if values else None


def read_utilization(device: torch.device) -> tuple[float, str] | None:
    """The GPU's busy percentage now (NVML's share of the last sample period with a kernel
    running) and what answered: ``torch.cuda.utilization`` (needs pynvml), else
    ``nvidia-smi``; None when neither does."""
    index = device.index or 0
    with contextlib.suppress(Exception):  # pynvml missing, or NVML refusing: try nvidia-smi
        return float(torch.cuda.utilization(index)), "torch.cuda.utilization"
    query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
    try:
        output = subprocess.run(
            [*query, "-i", str(index)], capture_output=True, text=True, timeout=5, check=True
        ).stdout
        return float(output.strip().splitlines()[0]), "nvidia-smi"
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


class UtilizationSampler:
    """Samples the GPU's busy percentage every ``interval`` seconds in a background thread."""

    def __init__(self, device: torch.device, interval: float = 0.1) -> None:
        self.device = device
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.source: str | None = None  # what answered: "torch" or "nvidia-smi"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start sampling; False (and nothing started) when the device is not a readable GPU."""
        first = read_utilization(self.device) if self.device.type == "cuda" else None
        if first is None:
            return False
        self.source = first[1]
        self._thread = threading.Thread(target=self._run, name="gpu-utilization", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            reading = read_utilization(self.device)
            if reading is not None:
                self.samples.append((time.perf_counter(), reading[0]))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def busy(self, start: float, end: float) -> float | None:
        """Mean busy fraction (0-1) sampled in ``[start, end]``."""
        mean = mean_between(self.samples, start, end)
        return None if mean is None else round(mean / 100, 3)

    @contextlib.contextmanager
    def running(self) -> Iterator[bool]:
        started = self.start()
        try:
            yield started
        finally:
            self.stop()


class BusyObserver(Observer):
    """The GPU busy fraction of every phase the engine times, in the order it reports them."""

    def __init__(self, sampler: UtilizationSampler) -> None:
        self.sampler = sampler
        self.busy: list[float | None] = []

    def phase_finished(self, session: Session, phase: str, seconds: float, images: int) -> None:
        end = time.perf_counter()
        self.busy.append(self.sampler.busy(end - seconds, end))


# --- data loading ---------------------------------------------------------------------------


def loading_throughput(experiment: Experiment, batches: int) -> dict[str, Any]:
    """Images/s of the training DataLoader alone over the training split (the engine's loader,
    training transform, workers and batch).

    The workers start together, so the first ``num_workers`` batches (one per worker) arrive
    almost at once after the start-up; the rate is taken from the last of them to the end of the
    next ``batches`` batches (rounded up to whole rounds of one batch per worker), which is the
    steady rate. A split too small for that is timed from the start, start-up included.
    """
    source = experiment.train_source
    count = len(source)
    dataset = TargetedImages(
        source,
        np.arange(count),
        np.zeros((count, len(experiment.class_names)), dtype=np.float32),
        experiment.train_transform,
    )
    batch_size = experiment.config.train.batch_size
    workers = experiment.runtime.num_workers
    warm = max(workers, 1)
    timed_batches = -(-batches // warm) * warm
    loader = experiment.runtime.loader(dataset, batch_size, shuffle=True, seed=0)
    started = time.perf_counter()
    first = warmed = None
    total = images = 0
    for index, (pixels, _) in enumerate(loader):
        now = time.perf_counter()
        total += len(pixels)
        if first is None:
            first = now - started
        if index == warm - 1:
            warmed = now
        elif warmed is not None:
            images += len(pixels)
            if index >= warm - 1 + timed_batches:
                break
    end = time.perf_counter()
    row = {
        "batch_size": batch_size,
        "num_workers": workers,
        "first_batch_s": round(first or 0.0, 3),
    }
    if images and warmed is not None:
        return {**row, "images": images, "seconds": round(end - warmed, 3),
                "images_per_s": round(images / (end - warmed), 1)}  # fmt: skip
    note = "too few images for a batch per worker and more: timed from the start"
    return {**row, "images": total, "seconds": round(end - started, 3),
            "images_per_s": round(total / (end - started), 1), "note": note}  # fmt: skip


def cache_overrides(config_path: str, overrides: Sequence[str], folder: Path) -> list[str] | str:
    """The overrides that read the image cache (kept in ``folder`` where ``data.image_cache_dir``
    exists), or why this mlcil has no image cache."""
    for extra in (
        ["data.image_cache=true", f"data.image_cache_dir={folder}"],
        ["data.image_cache=true"],
    ):
        try:
            load_config(config_path, [*overrides, *extra])
        except ConfigError as error:
            reason = f"data.image_cache is not known to this mlcil ({error}); cache not measured"
            continue
        return [*overrides, *extra]
    return reason


def measure_loading(
    args: argparse.Namespace, overrides: list[str], workdir: Path
) -> list[dict[str, Any]]:
    """Data loading rows: decoding the JPEGs, then (``--cache``) the image cache."""
    rows = []
    config = load_config(args.config, overrides)
    rows.append(
        {
            "source": "JPEG files",
            **loading_throughput(Experiment(config, runtime=make_runtime(config)), args.batches),
        }
    )
    if not args.cache:
        return rows
    cached = cache_overrides(args.config, overrides, workdir / "image_cache")
    reason = cached if isinstance(cached, str) else None
    if isinstance(cached, list):
        try:
            started = time.perf_counter()
            cached_config = load_config(args.config, cached)
            # Building the experiment builds the cache.
            experiment = Experiment(cached_config, runtime=make_runtime(cached_config))
            build = time.perf_counter() - started
            row = loading_throughput(experiment, args.batches)
            rows.append({"source": "image cache", "cache_build_s": round(build, 2), **row})
        except (MlcilError, OSError, ImportError) as error:
            reason = f"the image cache failed: {error}"
    if reason is not None:
        print(f"note: {reason}")
        rows.append({"source": "image cache", "note": reason})
    return rows


# --- training steps -------------------------------------------------------------------------


@dataclasses.dataclass
class StepSetup:
    """A method in its second session, ready for the engine's ``train_step``."""

    method: Method
    context: SessionContext
    config: RunConfig


def prepare_second_session(
    config: RunConfig, sources: tuple[Any, Any], teacher_images: int
) -> StepSetup:
    """The configured method grown through its first session into the second (KRT: the frozen
    teacher and its DPL threshold, picked on ``teacher_images`` training images to keep this
    short; the step itself does not depend on how many)."""
    runtime = make_runtime(config)
    experiment = Experiment(config, runtime=runtime, plan=RunPlan.from_config(config, sources))
    method = experiment.build_method()
    memory = experiment.inputs.new_memory()
    context = None
    for session in experiment.sessions[:2]:
        train_set, _ = experiment.data.train_set(session, memory)
        keep = min(teacher_images, len(train_set))
        subset = TargetedImages(
            train_set.source,
            train_set.indices[:keep],
            train_set.targets[:keep],
            train_set.transform,
        )
        context = experiment.data.context(session, subset, runtime)
        method.begin_session(context)
        method.network.to(runtime.device)
        if session.index == 0:
            method.end_session(context)
    assert context is not None
    return StepSetup(method, context, config)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    setup: StepSetup,
    batch_size: int,
    steps: int,
    warmup: int,
    sampler: UtilizationSampler | None,
) -> dict[str, Any]:
    """Median seconds of the engine's ``train_step`` on random images (the batch starts on the
    CPU, pinned on CUDA, as the loader gives it), peak GPU memory and busy fraction."""
    method, context = setup.method, setup.context
    runtime = context.runtime
    device = runtime.device
    size = setup.config.data.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, size, size, generator=generator)
    classes = len(setup.context.train_source.class_names)
    targets = (torch.rand(batch_size, classes, generator=generator) < LABEL_DENSITY).float()
    if device.type == "cuda":
        images, targets = images.pin_memory(), targets.pin_memory()
    batch = Batch(images, targets)
    optimization = method.configure_optimization(
        setup.config.train, context.session, steps + warmup
    )
    scaler = runtime.grad_scaler()
    samples: list[float] = []
    with training_network(method, runtime):
        method.network.train()
        for _ in range(warmup):
            train_step(method, [batch], optimization, scaler, context, batch_size)
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        first = time.perf_counter()
        for _ in range(steps):
            started = time.perf_counter()
            train_step(method, [batch], optimization, scaler, context, batch_size)
            synchronize(device)
            samples.append(time.perf_counter() - started)
        last = time.perf_counter()
    median = statistics.median(samples)
    return {
        "step_ms": round(median * 1e3, 2),
        "min_ms": round(min(samples) * 1e3, 2),
        "images_per_s": round(batch_size / median, 1),
        "peak_gpu_mb": (
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if device.type == "cuda"
            else None
        ),
        "gpu_busy": sampler.busy(first, last) if sampler is not None else None,
    }


def measure_steps(
    args: argparse.Namespace,
    overrides: list[str],
    sources: tuple[Any, Any],
    sampler: UtilizationSampler | None,
) -> list[dict[str, Any]]:
    """A row per (method, precision, batch): fine-tuning and KRT in their second session."""
    methods = {"finetune": [str(CONFIGS / "methods" / "finetune.yaml")], "krt": []}
    rows = []
    for name, extra_files in methods.items():
        # The linear network of fine-tuning takes none of the ICA's keys.
        own = [o for o in overrides if name == "krt" or not o.startswith(ICA_KEYS)]
        for precision in args.precisions:
            for batch_size in args.batch_sizes:
                config = load_config(
                    [args.config, *extra_files],
                    [*own, f"train.precision={precision}", f"train.batch_size={batch_size}"],
                )
                setup = prepare_second_session(config, sources, args.teacher_images)
                row = {"method": name, "precision": precision, "batch": batch_size}
                try:
                    row.update(time_steps(setup, batch_size, args.steps, args.warmup, sampler))
                except torch.OutOfMemoryError:
                    row["skipped"] = "out of GPU memory"
                rows.append(row)
                print(f"step: {row}")
                del setup
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return rows


# --- the script -----------------------------------------------------------------------------


def step_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["method", "precision", "batch", "step ms", "images/s", "peak GPU MB", "GPU busy"]
    keys = ["method", "precision", "batch", "step_ms", "images_per_s", "peak_gpu_mb", "gpu_busy"]
    return format_table([[row.get(key) for key in keys] for row in rows], header)


def loading_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["source", "workers", "batch", "cache build s", "first batch s", "images"]
    header += ["images/s", "note"]
    keys = ["source", "num_workers", "batch_size", "cache_build_s", "first_batch_s", "images"]
    keys += ["images_per_s"]
    table = [[*(row.get(key) for key in keys), row.get("note")] for row in rows]
    return format_table(table, header)


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument(
        "--image-size", type=int, dest="model_image_size", help="same as --model-image-size"
    )
    parser.add_argument("--train-images", type=int, default=20_000, help="train images (20,000)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case (20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (3)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--batches", type=int, default=40, help="loader batches timed (40)")
    parser.add_argument(
        "--teacher-images", type=int, default=512,
        help="training images of KRT's DPL pass before the step timing (512)",
    )  # fmt: skip
    parser.add_argument("--cache", action="store_true", help="also load from data.image_cache")
    parser.add_argument("--skip-phases", action="store_true", help="no phase table/projection")
    parser.add_argument("--workdir", help="folder for the tree and the run (default: temporary)")
    parser.add_argument("--output", default="benchmarks/results/gpu.json")
    parser.set_defaults(
        device="cuda" if torch.cuda.is_available() else "cpu",
        test_images=None,  # COCO's ratio of val2014 to train2014 images (below)
        jobs=os.cpu_count() or 1,
        epochs=1,
        max_sessions=2,
    )
    args = parser.parse_args(argv)
    if args.test_images is None:
        args.test_images = max(round(args.train_images * COCO_VAL_IMAGES / COCO_TRAIN_IMAGES), 1)
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every measurement; the JSON document."""
    device = torch.device(args.device)
    base = load_config(args.config, ["model.pretrained=null"])
    root = Path(args.root) if args.root else workdir / "tree"
    tree = ensure_tree(base.data.dataset, root, args, args.train_images)
    if tree is not None:
        print(f"tree: {tree['images']:,} images written in {tree['seconds']:.1f} s")
    overrides = measurement_overrides(args, root)
    loading = measure_loading(args, overrides, workdir)
    print(loading_table(loading))
    sources = parse_splits(load_config(args.config, overrides))
    sampler = UtilizationSampler(device)
    result: dict[str, Any] = {"tree": tree, "loading": loading}
    with sampler.running() as sampling:
        if not sampling:
            print("note: no GPU utilisation reading (no CUDA device, or no NVML/nvidia-smi)")
        active = sampler if sampling else None
        steps = measure_steps(args, overrides, sources, active)
        print(step_table(steps))
        result["steps"] = steps
        if not args.skip_phases:
            busy = BusyObserver(sampler)
            scale = run_scale(args, args.train_images, workdir, observers=[busy], tree=tree)
            engine = scale.measurement.records[-len(busy.busy) :] if busy.busy else []
            for record, fraction in zip(engine, busy.busy, strict=True):
                record["gpu_busy"] = fraction
            print(phase_table(scale.measurement.records, extra=["gpu_busy"]))
            for row in scale.projections:
                print(f"{row['target']}: {row['note']}")
            print(projection_table(scale.projections))
            result.update(scale.to_json({}))
    result["utilization_source"] = sampler.source
    result["machine"] = machine_description(device)
    result["settings"] = {**vars(args), "overrides": overrides}
    return result


def main() -> None:
    args = parse_arguments()
    load_at_start = [round(x, 2) for x in os.getloadavg()]  # others may share the machine
    configure_logging(args.verbose)
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlcil-gpu-")))
        result = run(args, workdir)
    result["settings"]["load_average_at_start"] = load_at_start
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["machine"]))
    print(f"written: {output}")


if __name__ == "__main__":
    main()

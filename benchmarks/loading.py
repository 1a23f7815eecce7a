"""Data-loading benchmarks: print a table and write JSON.

Usage::

    python benchmarks/loading.py                       # 2,000 synthetic 640x480 COCO images
    python benchmarks/loading.py --sizes 224 448       # also at 448 px
    python benchmarks/loading.py --root datasets/coco2014 --limit 5000
    python benchmarks/loading.py --output benchmarks/results/loading.json

Two groups of figures:

- images/s of the training input pipeline (a DataLoader over the train transform, batch 64,
  ``--workers`` 0 and 2) reading the JPEG files versus reading the image cache
  (``data.image_cache``), after one warm-up epoch so that both read from the page cache; plus
  the time to build the cache;
- the start-up cost of COCO's train annotations: pycocotools parsing the instances file versus
  the cached label matrix (``data.annotation_cache``), on a tree of ``--annotation-images``
  images (tiny 64x48 JPEGs: only the JSON matters here).

Each figure is the median over ``--repeats`` runs (the minimum is kept too). Other work on the
machine changes these numbers: the load average at the start and the end is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlcil.data.base import FileImageSource, ImageSource
from mlcil.data.coco import load_coco
from mlcil.data.image_cache import ensure_image_cache
from mlcil.data.sessions import TargetedImages
from mlcil.data.synthetic import write_synthetic_coco
from mlcil.data.transforms import build_transform


def samples(function: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls (no warm-up: callers warm up what they need)."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return seconds


def row(name: str, unit: str, values: list[float], **extra: object) -> dict:
    return {
        "name": name,
        "unit": unit,
        "value": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "samples": values,
        **extra,
    }


def epoch(source: ImageSource, transform: Callable, batch: int, workers: int) -> None:
    """One shuffled pass of a DataLoader over every image of ``source``."""
    indices = np.arange(len(source))
    targets = np.asarray(source.labels, dtype=np.float32)
    dataset = TargetedImages(source, indices, targets, transform)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)
    for images, _ in loader:
        assert images.shape[0] > 0


def subset(source: FileImageSource, limit: int | None) -> FileImageSource:
    if limit is None or limit >= len(source):
        return source
    return FileImageSource(
        dataset=source.dataset,
        split=source.split,
        root=source.root,
        class_names=source.class_names,
        image_refs=source.image_refs[:limit],
        labels=source.labels[:limit],
        label_density=source.label_density,
    )


def bench_reader(
    name: str, reader: ImageSource, transform: Callable, args: argparse.Namespace, workers: int
) -> dict:
    """images/s of whole epochs over ``reader`` after one warm-up epoch (page cache, imports)."""
    epoch(reader, transform, args.batch, workers)
    seconds = samples(lambda: epoch(reader, transform, args.batch, workers), args.repeats)
    return row(name, "images/s", [len(reader) / s for s in seconds])


def bench_pipeline(source: FileImageSource, args: argparse.Namespace, cache: Path) -> list[dict]:
    rows = []
    for size in args.sizes:
        started = time.perf_counter()
        cached = ensure_image_cache(source, size, cache, workers=args.build_threads)
        build = time.perf_counter() - started
        rows.append(
            {
                "name": f"build the image cache, {len(source)} images at {size} px "
                f"({args.build_threads} threads)",
                "unit": "images/s",
                "value": len(source) / build,
                "seconds": build,
                "bytes": cached.nbytes,
            }
        )
        reopen = samples(
            lambda size=size: ensure_image_cache(source, size, cache, args.build_threads),
            args.repeats,
        )
        what = f"open the valid cache (stat {len(source)} files, map shards), {size} px"
        rows.append(row(what, "ms", [1e3 * s for s in reopen]))
        transform = build_transform(size, True)
        for workers in args.workers:
            what = f"train pipeline {size} px, batch {args.batch}, {workers} workers"
            files = bench_reader(f"{what}, JPEG files", source, transform, args, workers)
            memory = bench_reader(f"{what}, image cache", cached, transform, args, workers)
            speedup = {
                "name": f"  cache speed-up ({size} px, {workers} workers)",
                "unit": "x",
                "value": memory["value"] / files["value"],
            }
            rows += [files, memory, speedup]
    return rows


def age_annotations(root: Path) -> None:
    """Date the annotation files of a tree this script wrote 60 s back: the annotation cache
    does not trust files modified in the last seconds (their mtime may not change on edit)."""
    when = time.time() - 60
    for path in (root / "annotations").iterdir():
        os.utime(path, (when, when))


def bench_annotations(root: Path, repeats: int, cache: Path) -> list[dict]:
    images = len(load_coco(root, "train"))
    parse = samples(lambda: load_coco(root, "train"), repeats)
    first = samples(lambda: load_coco(root, "train", cache=cache), 1)  # parses and stores
    cached = samples(lambda: load_coco(root, "train", cache=cache), repeats)
    size = (root / "annotations" / "instances_train2014.json").stat().st_size
    what = f"COCO train annotations, {images} images ({size / 1e6:.0f} MB JSON)"
    milliseconds = [[1e3 * s for s in values] for values in (parse, first, cached)]
    return [
        row(f"{what}, pycocotools parse", "ms", milliseconds[0]),
        row(f"{what}, first load (parse + store)", "ms", milliseconds[1]),
        row(f"{what}, annotation cache", "ms", milliseconds[2]),
        {
            "name": "  start-up saving",
            "unit": "x",
            "value": statistics.median(parse) / statistics.median(cached),
        },
    ]


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a COCO 2014 tree (default: write one)")
    parser.add_argument("--images", type=int, default=2000, help="synthetic train images")
    parser.add_argument("--limit", type=int, help="time only the first LIMIT train images")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--annotation-images",
        type=int,
        default=20_000,
        help="train images of the tree whose annotations are timed (0: use the main tree)",
    )
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--output", default="benchmarks/results/loading.json")
    return parser.parse_args()


def run(args: argparse.Namespace, scratch: Path) -> list[dict]:
    root = args.root
    if root is None:
        root = scratch / "coco"
        write_synthetic_coco(root, args.images, 16, seed=0, image_size=(640, 480), jobs=2)
        age_annotations(root)
    rows = []
    if not args.skip_pipeline:
        source = subset(load_coco(root, "train"), args.limit)
        rows += bench_pipeline(source, args, scratch / "images")
    annotated = root
    if args.annotation_images:
        annotated = scratch / "coco-annotations"
        write_synthetic_coco(
            annotated, args.annotation_images, 16, seed=1, image_size=(64, 48), jobs=2
        )
        age_annotations(annotated)
    return rows + bench_annotations(annotated, args.repeats, scratch / "annotations")


def main() -> None:
    args = parse_args()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="mlcil-loading-") as scratch:
        rows = run(args, Path(scratch))
    machine = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    width = max(len(entry["name"]) for entry in rows)
    print(f"{'benchmark':<{width}}  {'median':>10}  {'min':>10}  unit")
    for entry in rows:
        low = f"{entry['min']:>10.2f}" if "min" in entry else " " * 10
        print(f"{entry['name']:<{width}}  {entry['value']:>10.2f}  {low}  {entry['unit']}")
    print(json.dumps(machine))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"machine": machine, "results": rows}, indent=1))
    print(f"written: {output}")


if __name__ == "__main__":
    main()

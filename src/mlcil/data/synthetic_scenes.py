"""What the synthetic COCO and VOC trees show (:mod:`mlcil.data.synthetic` writes the files):
the label statistics of each dataset, every image's planned labels and objects, and the
rendering of the images.

Label model (both datasets)
    Each class ``c`` has a target share ``t_c`` of images that carry its label. A fixed number of
    images (``round(e * n)``) carries no label at all; every other image draws each class
    independently with probability ``p_c`` and is drawn again while it comes out empty. The
    ``p_c`` are solved for (``_presence_probabilities``) so that the *marginal* share of class
    ``c`` over all images is exactly ``t_c`` in expectation; the mean number of labels per image
    is then ``sum(t_c)``. Co-occurrence between classes is not modelled (classes are independent
    given that an image is not empty).

COCO frequencies
    ``_COCO_IMAGE_COUNTS``: approximate number of images holding each category in COCO train
    (the 2017 training set of 118,287 images, which is train2014 plus most of val2014, drawn from
    the same collection), written from memory of the published per-category statistics rather
    than computed from the files. They reproduce the known summary figures: 2.90 labels per image
    on average and person in 54.2% of the images. Both splits use the same shares. About 0.85%
    of the images have no annotation at all (702 of train2014's 82,783). Instances per label
    follow a geometric law with mean 4.1 for person and 2.15 for the other classes (COCO train
    has about 7.3 annotations per image), capped at 20.

    Crowd regions (``iscrowd=1``, an uncompressed RLE rectangle, drawn as a cluster of small
    copies of the class's shape) make about 1% of the annotations: one next to the instances of
    a labelled class (7% of person labels, 0.8% of other labels) or, on 1.5% of the labelled
    images, a crowd of a class drawn from the shares. Crowds give no label (the loader's rule),
    so a crowd of a class that has no other instance in the image leaves that class unlabelled;
    the label statistics above and in the returned summary are those of the labels the loader
    produces.

VOC frequencies
    ``_VOC_IMAGE_COUNTS``: approximate per-class image counts of VOC 2007 trainval (5,011
    images), also from memory of the devkit's statistics table: 1.46 labels per image, person in
    40% of the images. Instances per label: geometric, mean 2.3 for person and 1.5 for the rest.
    ``difficult`` objects (small boxes, never a label) are added at a Poisson rate of 0.28 per
    image, about 10% of all objects; 0.5% of the images hold a single difficult object and
    nothing else, so they load as unlabelled rows.

Images
    Each class has its own (shape, colour) pair (``class_style``): eight polygon shapes times ten
    colours, so a model can learn the classes from the pixels. An image is a smooth random
    background (upsampled coarse noise) with every object's polygon filled in its bounding box
    (largest first, so small objects stay visible), a colour jitter of +-20 per object, then a
    +-12 grey grain over the whole image, saved as JPEG quality 85. The COCO polygons are the
    annotations' ``segmentation`` and their boxes are the ``bbox``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from mlcil.data.classes import class_names
from mlcil.errors import DataError

logger = logging.getLogger("mlcil.data.synthetic")  # the writers' log, as before the split

COCO_TRAIN_IMAGES = 82_783
COCO_VAL_IMAGES = 40_504
VOC_TRAINVAL_IMAGES = 5_011
VOC_TEST_IMAGES = 4_952

JPEG_QUALITY = 85

# Approximate images per category in COCO train (118,287 images); see the module docstring.
_COCO_TRAIN_SIZE = 118_287
_COCO_IMAGE_COUNTS: dict[str, int] = {
    "person": 64115, "bicycle": 3252, "car": 12251, "motorcycle": 3502, "airplane": 2986,
    "bus": 3952, "train": 3588, "truck": 6127, "boat": 3025, "traffic light": 4139,
    "fire hydrant": 1711, "stop sign": 1734, "parking meter": 705, "bench": 5570, "bird": 3237,
    "cat": 4114, "dog": 4385, "horse": 2941, "sheep": 1529, "cow": 1968, "elephant": 2143,
    "bear": 960, "zebra": 1916, "giraffe": 2546, "backpack": 5528, "umbrella": 3968,
    "handbag": 6841, "tie": 3810, "suitcase": 2402, "frisbee": 2184, "skis": 3082,
    "snowboard": 1654, "sports ball": 4262, "kite": 2261, "baseball bat": 2506,
    "baseball glove": 2629, "skateboard": 3476, "surfboard": 3486, "tennis racket": 3394,
    "bottle": 8501, "wine glass": 2533, "cup": 9189, "fork": 3555, "knife": 4326, "spoon": 3529,
    "bowl": 7111, "banana": 2243, "apple": 1586, "sandwich": 2365, "orange": 1699,
    "broccoli": 1939, "carrot": 1683, "hot dog": 1222, "pizza": 3166, "donut": 1523,
    "cake": 2925, "chair": 12774, "couch": 4423, "potted plant": 4452, "bed": 3682,
    "dining table": 11837, "toilet": 3353, "tv": 4561, "laptop": 3524, "mouse": 1876,
    "remote": 3076, "keyboard": 2115, "cell phone": 4803, "microwave": 1547, "oven": 2877,
    "toaster": 217, "sink": 4678, "refrigerator": 2360, "book": 5332, "clock": 4659,
    "vase": 3593, "scissors": 947, "teddy bear": 2140, "hair drier": 189, "toothbrush": 1007,
}  # fmt: skip

# Approximate images per class in VOC 2007 trainval (5,011 images); see the module docstring.
_VOC_IMAGE_COUNTS: dict[str, int] = {
    "aeroplane": 238, "bicycle": 243, "bird": 330, "boat": 181, "bottle": 244, "bus": 186,
    "car": 713, "cat": 337, "chair": 445, "cow": 141, "diningtable": 200, "dog": 421,
    "horse": 287, "motorbike": 245, "person": 2008, "pottedplant": 245, "sheep": 96,
    "sofa": 229, "train": 261, "tvmonitor": 256,
}  # fmt: skip

# Unit polygons in [0, 1]^2, each touching all four sides (so the polygon's box is the object's
# box) and each containing the centre (0.5, 0.5), where a viewer or a test can read its colour.
_STAR = [
    (0.5 + (0.5 if k % 2 == 0 else 0.2) * np.sin(np.pi * k / 5),
     0.5 - (0.5 if k % 2 == 0 else 0.2) * np.cos(np.pi * k / 5))
    for k in range(10)
]  # fmt: skip
_RAW_SHAPES: dict[str, list[tuple[float, float]]] = {
    "ellipse": [
        (0.5 + 0.5 * np.cos(np.pi * k / 8), 0.5 + 0.5 * np.sin(np.pi * k / 8)) for k in range(16)
    ],
    "rectangle": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "star": _STAR,
    "cross": [(1/3, 0), (2/3, 0), (2/3, 1/3), (1, 1/3), (1, 2/3), (2/3, 2/3), (2/3, 1), (1/3, 1),
              (1/3, 2/3), (0, 2/3), (0, 1/3), (1/3, 1/3)],
    "arrow": [(0, 0.35), (0.55, 0.35), (0.55, 0), (1, 0.5), (0.55, 1), (0.55, 0.65), (0, 0.65)],
    "tee": [(0, 0), (1, 0), (1, 0.35), (0.65, 0.35), (0.65, 1), (0.35, 1), (0.35, 0.35),
            (0, 0.35)],
}  # fmt: skip


def _normalised(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """``points`` stretched so that their bounding box is exactly [0, 1]^2."""
    array = np.asarray(points, dtype=np.float64)
    low, high = array.min(axis=0), array.max(axis=0)
    return tuple((float(u), float(v)) for u, v in (array - low) / (high - low))


def _unit_area(points: Sequence[tuple[float, float]]) -> float:
    """Shoelace area of a simple polygon."""
    total = 0.0
    for (x0, y0), (x1, y1) in zip(points, [*points[1:], points[0]], strict=True):
        total += x0 * y1 - x1 * y0
    return abs(total) / 2


SHAPE_NAMES: tuple[str, ...] = tuple(_RAW_SHAPES)
_SHAPES: tuple[tuple[tuple[float, float], ...], ...] = tuple(
    _normalised(points) for points in _RAW_SHAPES.values()
)
SHAPE_AREAS: tuple[float, ...] = tuple(_unit_area(points) for points in _SHAPES)

PALETTE: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40), (245, 140, 20), (240, 220, 40), (40, 170, 60), (40, 200, 210),
    (40, 70, 220), (130, 50, 190), (230, 60, 170), (245, 245, 245), (20, 20, 20),
)  # fmt: skip


def class_style(class_index: int) -> tuple[str, tuple[int, int, int]]:
    """The (shape name, base RGB colour) drawn for class ``class_index`` (alphabetical index).

    Shape ``k % 8`` and colour ``(k % 10 + k // 40) % 10`` give 80 distinct pairs for COCO's
    classes while the 20 VOC classes still use all ten colours.
    """
    shape = class_index % len(_SHAPES)
    colour = (class_index % len(PALETTE) + class_index // 40) % len(PALETTE)
    return SHAPE_NAMES[shape], PALETTE[colour]


def polygon(shape: int, x: float, y: float, w: float, h: float) -> list[tuple[float, float]]:
    """The points of shape number ``shape`` stretched over the box (x, y, w, h)."""
    return [(x + u * w, y + v * h) for u, v in _SHAPES[shape]]


# ---------------------------------------------------------------------------------------------
# Label and object planning


@dataclasses.dataclass(frozen=True)
class LabelModel:
    """The statistics one dataset's planner draws from (see the module docstring)."""

    class_names: list[str]
    image_share: np.ndarray  # per class: share of all images labelled with it
    empty_fraction: float  # images without any label
    instance_mean: np.ndarray  # per class: mean instances per label (geometric law)
    instance_cap: int
    scale: tuple[float, float]  # object side / sqrt(image area), log-uniform
    flag_scale: tuple[float, float]
    flag_with_label: np.ndarray  # per class: chance of one flagged object next to a label
    flag_extra_rate: float  # Poisson rate of flagged objects per labelled image
    flag_in_empty: bool  # unlabelled images hold one flagged object (VOC) or nothing (COCO)


def coco_model() -> LabelModel:
    names = class_names("coco")
    share = np.array([_COCO_IMAGE_COUNTS[name] for name in names]) / _COCO_TRAIN_SIZE
    person = np.array([name == "person" for name in names])
    return LabelModel(
        class_names=names,
        image_share=share,
        empty_fraction=702 / 82_783,
        instance_mean=np.where(person, 4.1, 2.15),
        instance_cap=20,
        scale=(0.04, 0.5),
        flag_scale=(0.3, 0.8),
        flag_with_label=np.where(person, 0.07, 0.008),
        flag_extra_rate=0.015,
        flag_in_empty=False,
    )


def voc_model() -> LabelModel:
    names = class_names("voc")
    share = np.array([_VOC_IMAGE_COUNTS[name] for name in names]) / VOC_TRAINVAL_IMAGES
    person = np.array([name == "person" for name in names])
    return LabelModel(
        class_names=names,
        image_share=share,
        empty_fraction=0.005,
        instance_mean=np.where(person, 2.3, 1.5),
        instance_cap=12,
        scale=(0.15, 0.8),
        flag_scale=(0.04, 0.15),
        flag_with_label=np.zeros(len(names)),
        flag_extra_rate=0.28,
        flag_in_empty=True,
    )


def _presence_probabilities(share: np.ndarray, empty_fraction: float) -> np.ndarray:
    """Per-class Bernoulli probabilities ``p`` giving marginal shares ``share``.

    A share ``empty_fraction`` of the images is left empty and the others are redrawn until
    non-empty, so class ``c`` is present in ``(1 - e) p_c / s`` of all images, where
    ``s = 1 - prod(1 - p)`` is the chance that one draw is non-empty. With ``a = share / (1 - e)``
    and ``p = a s``, ``s`` solves ``s = 1 - prod(1 - a s)``, which bisection finds: the right side
    minus ``s`` is positive just above 0 (its slope there is ``sum(a) - 1 > 0``) and negative at 1.
    """
    scaled = share / (1.0 - empty_fraction)
    if scaled.sum() <= 1.0 or scaled.max() >= 1.0:
        raise DataError(
            f"synthetic: class shares summing to {share.sum():.3f} with {empty_fraction:.3f} "
            "empty images cannot be reached (need more than one label per non-empty image and "
            "every share below 1)"
        )
    low, high = 1e-9, 1.0
    for _ in range(100):
        middle = (low + high) / 2
        if 1.0 - np.prod(1.0 - scaled * middle) > middle:
            low = middle
        else:
            high = middle
    return scaled * low


def _sample_labels(
    rng: np.random.Generator, count: int, presence: np.ndarray, empty: int
) -> np.ndarray:
    """``(count, classes)`` bool labels: ``empty`` random rows empty, the others non-empty."""
    labels = np.zeros((count, presence.size), dtype=bool)
    is_empty = np.zeros(count, dtype=bool)
    is_empty[rng.choice(count, size=empty, replace=False)] = True
    todo = np.flatnonzero(~is_empty)
    threshold = presence.astype(np.float32)
    while todo.size:
        draw = rng.random((todo.size, presence.size), dtype=np.float32) < threshold
        labels[todo] = draw
        todo = todo[~draw.any(axis=1)]
    return labels


def _sample_boxes(
    rng: np.random.Generator, count: int, size: tuple[int, int], scale: tuple[float, float]
) -> np.ndarray:
    """``(count, 4)`` integer boxes (x, y, w, h) inside an image of ``size`` = (width, height)."""
    width, height = size
    side = np.exp(rng.uniform(np.log(scale[0]), np.log(scale[1]), count)) * np.sqrt(width * height)
    aspect = np.sqrt(np.exp(rng.uniform(np.log(0.5), np.log(2.0), count)))
    w = np.clip(np.rint(side * aspect), 4, width).astype(np.int64)
    h = np.clip(np.rint(side / aspect), 4, height).astype(np.int64)
    x = np.floor(rng.random(count) * (width - w + 1)).astype(np.int64)
    y = np.floor(rng.random(count) * (height - h + 1)).astype(np.int64)
    return np.stack([x, y, w, h], axis=1)


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """Everything one split's files are written from, as NumPy columns.

    ``labels`` is the matrix the loader will produce. Objects are sorted by image row, the
    unflagged ones of an image first; ``flag`` marks COCO crowds or VOC difficult objects.
    """

    labels: np.ndarray  # (images, classes) bool
    row: np.ndarray  # (objects,) image row
    cls: np.ndarray  # (objects,) class index
    box: np.ndarray  # (objects, 4) x, y, w, h
    flag: np.ndarray  # (objects,) bool
    seed: np.ndarray  # (images,) render seed
    size: tuple[int, int]

    def starts(self) -> np.ndarray:
        """Position of each image's first object; ``starts[i]:starts[i + 1]`` are its objects."""
        return np.searchsorted(self.row, np.arange(self.labels.shape[0] + 1))


def plan_split(
    rng: np.random.Generator, count: int, model: LabelModel, size: tuple[int, int]
) -> SplitPlan:
    empty = round(model.empty_fraction * count)
    presence = _presence_probabilities(model.image_share, empty / count)
    labels = _sample_labels(rng, count, presence, empty)
    rows, cols = np.nonzero(labels)
    instances = np.minimum(rng.geometric(1.0 / model.instance_mean[cols]), model.instance_cap)
    plain_rows, plain_cls = np.repeat(rows, instances), np.repeat(cols, instances)

    beside = rng.random(rows.size) < model.flag_with_label[cols]
    labelled = np.flatnonzero(labels.any(axis=1))
    extra_rows = np.repeat(labelled, rng.poisson(model.flag_extra_rate, labelled.size))
    if model.flag_in_empty:
        extra_rows = np.concatenate([extra_rows, np.flatnonzero(~labels.any(axis=1))])
    weights = model.image_share / model.image_share.sum()
    extra_cls = rng.choice(weights.size, size=extra_rows.size, p=weights)
    flag_rows = np.concatenate([rows[beside], extra_rows])
    flag_cls = np.concatenate([cols[beside], extra_cls])
    # At most one flagged object per (image, class), as COCO has at most one crowd region each.
    _, first = np.unique(flag_rows * weights.size + flag_cls, return_index=True)
    first.sort()
    flag_rows, flag_cls = flag_rows[first], flag_cls[first]

    flag = np.concatenate([np.zeros(plain_rows.size, bool), np.ones(flag_rows.size, bool)])
    box = np.concatenate(
        [
            _sample_boxes(rng, plain_rows.size, size, model.scale),
            _sample_boxes(rng, flag_rows.size, size, model.flag_scale),
        ]
    )
    row = np.concatenate([plain_rows, flag_rows])
    order = np.lexsort((flag, row))
    return SplitPlan(
        labels=labels,
        row=row[order],
        cls=np.concatenate([plain_cls, flag_cls])[order],
        box=box[order],
        flag=flag[order],
        seed=rng.integers(0, 2**63 - 1, size=count, dtype=np.int64),
        size=size,
    )


def split_summary(plan: SplitPlan, model: LabelModel, flag_name: str) -> dict[str, Any]:
    """Statistics of the labels the loader will produce, plus object counts."""
    labels = plan.labels
    person = model.class_names.index("person")
    return {
        "images": int(labels.shape[0]),
        "labels_per_image": float(labels.sum(axis=1).mean()),
        "person_fraction": float(labels[:, person].mean()),
        "unlabelled_images": int((~labels.any(axis=1)).sum()),
        "objects": int(plan.row.size),
        flag_name: int(plan.flag.sum()),
    }


# ---------------------------------------------------------------------------------------------
# Rendering

# (path, width, height, seed, objects): objects is an (n, 9) int32 array of rows
# (shape, r, g, b, x, y, w, h, cluster).
_Task = tuple[str, int, int, int, np.ndarray]


def render_tasks(plan: SplitPlan, paths: Sequence[Path], cluster_flagged: bool) -> Iterator[_Task]:
    styles = [class_style(k) for k in range(plan.labels.shape[1])]
    shape = np.array([SHAPE_NAMES.index(name) for name, _ in styles])
    colour = np.array([rgb for _, rgb in styles])
    cluster = plan.flag & cluster_flagged
    objects = np.column_stack(
        [shape[plan.cls], colour[plan.cls], plan.box, cluster.astype(np.int64)]
    ).astype(np.int32)
    starts = plan.starts()
    width, height = plan.size
    for row, path in enumerate(paths):
        yield (
            str(path),
            width,
            height,
            int(plan.seed[row]),
            objects[starts[row] : starts[row + 1]],
        )


def _draw_cluster(
    draw: ImageDraw.ImageDraw, shape: int, colour: tuple[int, ...], box: Sequence[int]
) -> None:
    """A crowd: up to 4 x 3 small copies of the class's shape filling the box."""
    x, y, w, h = box
    columns, rows = max(1, min(4, w // 12)), max(1, min(3, h // 12))
    cell_w, cell_h = w / columns, h / rows
    for i, j in itertools.product(range(columns), range(rows)):
        left, top = x + i * cell_w + 0.1 * cell_w, y + j * cell_h + 0.1 * cell_h
        draw.polygon(polygon(shape, left, top, 0.8 * cell_w, 0.8 * cell_h), fill=colour)


_GRAIN = 12
# Random bytes to grain values 0..2 * _GRAIN (256 is not a multiple of 25: a negligible bias).
_GRAIN_LUT = [value % (2 * _GRAIN + 1) for value in range(256)]


def _render_image(task: _Task) -> int:
    """Draw and save one JPEG; returns its size in bytes. Runs in pool workers too."""
    path, width, height, seed, objects = task
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 216, size=(height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    colours = np.clip(objects[:, 1:4] + rng.integers(-20, 21, size=(len(objects), 3)), 0, 255)
    # Largest first, so that small objects are not hidden under big ones.
    for i in np.argsort(-(objects[:, 6] * objects[:, 7]), kind="stable"):
        shape, box, cluster = int(objects[i, 0]), objects[i, 4:8].tolist(), objects[i, 8]
        colour = tuple(int(v) for v in colours[i])
        if cluster:
            _draw_cluster(draw, shape, colour, box)
        else:
            draw.polygon(polygon(shape, *box), fill=colour)
    # Grey grain in -12..12 added in Pillow's C code: about 4x faster than the same in NumPy.
    grain = Image.frombytes("L", (width, height), rng.bytes(width * height)).point(_GRAIN_LUT)
    image = ImageChops.add(image, Image.merge("RGB", (grain, grain, grain)), offset=-_GRAIN)
    image.save(path, format="JPEG", quality=JPEG_QUALITY)
    return os.path.getsize(path)


class Renderer:
    """Renders tasks in this process (``jobs == 1``) or in a pool of ``jobs`` processes."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.pool: Any = None
        self.bytes = 0

    def __enter__(self) -> Renderer:
        if self.jobs > 1:
            # fork needs no importable __main__, so an unguarded script can call us.
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self.pool = context.Pool(self.jobs)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.pool is not None:
            if exc_info[0] is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()

    def render(self, tasks: Iterator[_Task], total: int, what: str) -> None:
        # Blocks bound the number of pending tasks (and their arrays) at any time.
        block = 64 * self.jobs
        done, next_report = 0, max(1, total // 10)
        while chunk := list(itertools.islice(tasks, block)):
            if self.pool is None:
                sizes = [_render_image(task) for task in chunk]
            else:
                sizes = self.pool.map(_render_image, chunk, chunksize=8)
            self.bytes += sum(sizes)
            done += len(chunk)
            if done >= next_report or done == total:
                logger.info("synthetic: %s: %d/%d images written", what, done, total)
                next_report = done + max(1, total // 10)

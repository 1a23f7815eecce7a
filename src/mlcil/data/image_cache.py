"""Caches of what a dataset's files give once decoded: resized images and parsed label matrices.

Image cache (``data.image_cache: true``)
    Training, the DPL pass, herding and evaluation all read images through an ``ImageSource``'s
    ``load_image``, and every one of them first resizes the decoded file to ``data.image_size``
    squared (``build_transform`` starts with ``Resize((S, S))``). Decoding a 640 x 480 JPEG and
    resizing it costs far more than the augmentations that follow, so the cache does those two
    steps once per split and keeps the result as uint8 arrays read through memory maps. A
    :class:`CachedImageSource` returns those arrays as PIL images; the transform's resize then
    leaves them untouched (torchvision returns an image that already has the requested size
    unchanged, and PIL's own resize to the same size is a copy), so every augmentation, seeded
    alike, yields the *same tensor* as from the file. This holds because the cache calls the
    transform's own first step, taken from ``build_transform`` and checked to be a plain resize
    to ``(S, S)``, on the same decoded RGB image (``decode_image_file``).

    One folder per split below ``data.image_cache_dir`` (default ``cache_root() / "images"``)::

        <dataset>-<split>-<S>px-<key>/
            shard-00000.npy   (n, S, S, 3) uint8, a few thousand images (512 MiB at most)
            shard-00001.npy   ...
            files.npy         (N, 2) int64: size and mtime (ns) of each image file when read
            cache.json        the provenance, written last
            build.lock        held (mlcil.cache.exclusive) while a process builds the folder

    ``key`` hashes what the images are: dataset, split, the resolved root, the class list, the
    image refs, the image size, the resize step (its repr: size, interpolation, antialias), the
    Pillow and libjpeg versions and the cache format. The image files' sizes and mtimes are not
    part of the folder name but are validated against ``files.npy`` (and its hash in
    ``cache.json``) at every start: a dataset whose files changed replaces its cache instead of
    leaving a stale copy of 12 GB (COCO train at 224 px) behind.

    Staleness: a cache that cannot be used (a file changed or is missing, a shard truncated or
    unreadable, a provenance that disagrees) is never used silently: it is rebuilt, with a
    WARNING that says why. A build decodes every image, so a missing or damaged image file then
    fails with the ``DataError`` naming it, exactly as training would. Validation checks each
    shard's header and length, not its pixels (hashing 12 GB at every start would cost more
    than the cache saves).

    Writes are atomic: each shard is written to a temporary file through a pre-allocated memory
    map (so no more than the decoding threads' images are held in memory), synced and moved into
    place with ``os.replace``; ``files.npy`` follows and ``cache.json`` comes last, after the old
    one was removed before the first shard. An interrupted build therefore leaves no
    ``cache.json`` and is never accepted. Building decodes with ``data.num_workers`` threads
    (Pillow releases the GIL while decoding and resizing).

The annotation cache (parsed label matrices) is :mod:`mlcil.data.annotation_cache`; what
every cache shares (root, provenance key, lock, atomic array writes) is :mod:`mlcil.cache`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from mlcil.cache import cache_root, exclusive, provenance_key, save_array_atomic, stamped
from mlcil.data.annotation_cache import (
    annotation_cache_root,
    cached_annotations,
    file_stats,
    read_json_object,
)
from mlcil.data.base import FileImageSource, ImageSource
from mlcil.errors import ConfigError, DataError
from mlcil.fileio import write_text_atomic, writing

if TYPE_CHECKING:  # the schema imports the catalog, which imports this module lazily
    from mlcil.config.schema import DataConfig

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when what a cache holds changes (decoding, layout): older caches are then rebuilt."""
SHARD_BYTES = 512 * 2**20
PROVENANCE = "cache.json"
FILE_STATS = "files.npy"
BUILD_LOCK = "build.lock"
_PROGRESS_SECONDS = 30.0


def image_cache_root(config: DataConfig) -> Path:
    """``data.image_cache_dir``, or ``cache_root() / "images"`` when it is not set."""
    return Path(config.image_cache_dir) if config.image_cache_dir else cache_root() / "images"


def resize_step(image_size: int) -> Callable[[Image.Image], Image.Image]:
    """The first step of the train and eval transforms, checked to be a plain ``(S, S)`` resize.

    Caching its output is lossless only because the transforms start with exactly this step
    and it leaves an image of that size unchanged; anything else must not be cached.

    Raises:
        ConfigError: when the transforms do not start with one and the same ``Resize((S, S))``.
    """
    from torchvision import transforms as T

    from mlcil.data.transforms import build_transform

    firsts: list[Any] = []
    for train in (False, True):
        steps = getattr(build_transform(image_size, train, augment=()), "transforms", None)
        firsts.append(steps[0] if steps else None)
    first = firsts[0]
    plain = (
        isinstance(first, T.Resize)
        and list(first.size) == [image_size, image_size]
        and first.max_size is None
        and repr(first) == repr(firsts[1])
    )
    if not plain:
        raise ConfigError(
            f"data.image_cache: the transforms no longer start with one Resize(({image_size}, "
            f"{image_size})) (eval: {firsts[0]!r}, train: {firsts[1]!r}); cached images would "
            "differ from decoded ones, so the image cache cannot be used"
        )
    return first


def cache_identity(source: FileImageSource, image_size: int, resize: object) -> dict[str, Any]:
    """What the cached images of ``source`` are: every field that names its folder."""
    from PIL import __version__ as pillow_version
    from PIL import features

    return {
        "format": FORMAT_VERSION,
        "dataset": source.dataset,
        "split": source.split,
        "root": str(source.root.resolve()),
        "class_names": list(source.class_names),
        "images": len(source),
        "refs_sha256": hashlib.sha256("\n".join(source.image_refs).encode("utf-8")).hexdigest(),
        "image_size": image_size,
        "resize": repr(resize),
        "decoder": "mlcil.data.base.decode_image_file",
        "pillow": pillow_version,
        "libjpeg": features.version("jpg"),
    }


def cache_folder(base: Path, identity: Mapping[str, Any]) -> Path:
    """``<base>/<dataset>-<split>-<S>px-<key>``: one folder per split and image size."""
    key = provenance_key(dict(identity))
    name = f"{identity['dataset']}-{identity['split']}-{identity['image_size']}px-{key}"
    return Path(base) / name


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"


def shard_sizes(images: int, image_size: int) -> list[int]:
    """Images per shard: as many as fit in ``SHARD_BYTES``, the last one holds the rest."""
    per_shard = max(1, SHARD_BYTES // (image_size * image_size * 3))
    return [min(per_shard, images - start) for start in range(0, images, per_shard)]


class CachedImageSource(ImageSource):
    """A file source whose images come, already resized, from an image cache folder.

    Labels, refs, class names, label density, dataset and split are the original's; only
    ``load_image`` differs: it returns the cached ``(S, S)`` image, which every transform of
    ``build_transform(S, ...)`` turns into the same tensor as the decoded file. Shards are
    memory-mapped on first use in each process (a pickled source, e.g. in a DataLoader worker,
    carries the folder, never the pixels).
    """

    def __init__(self, original: FileImageSource, folder: Path, sizes: Sequence[int]) -> None:
        self.original = original
        self.folder = Path(folder)
        self.dataset = original.dataset
        self.split = original.split
        self.class_names = list(original.class_names)
        self.image_refs = original.image_refs
        self.labels = original.labels
        self.label_density = original.label_density
        self.sizes = list(sizes)
        self.build_seconds: float | None = None  # set when this process built the cache
        self._maps: dict[int, np.ndarray] = {}
        self._check()

    def image_path(self, index: int) -> Path:
        """The image file the cached image ``index`` was decoded from."""
        return self.original.image_path(index)

    def shard(self, index: int) -> np.ndarray:
        """Shard ``index`` as a read-only memory map, opened once per process."""
        if index not in self._maps:
            self._maps[index] = np.load(
                self.folder / shard_name(index), mmap_mode="r", allow_pickle=False
            )
        return self._maps[index]

    def load_image(self, index: int) -> Image.Image:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.dataset}/{self.split}: no image {index} (of {len(self)})")
        shard, row = divmod(index, self.sizes[0])
        # A copy: the image must not be a view into the read-only map that a transform could
        # try to write through.
        return Image.fromarray(np.array(self.shard(shard)[row]))

    @property
    def nbytes(self) -> int:
        return sum(self.sizes) * int(np.prod(self.shard(0).shape[1:])) if self.sizes else 0

    def summary(self) -> dict[str, Any]:
        """``{"images", "bytes", "seconds", "path", "built"}`` of this split's cache."""
        return {
            "images": len(self),
            "bytes": self.nbytes,
            "seconds": self.build_seconds or 0.0,
            "path": str(self.folder),
            "built": self.build_seconds is not None,
        }

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}  # memory maps are reopened where the source is unpickled
        return state


def _shard_problem(folder: Path, sizes: Sequence[int], image_size: int) -> str | None:
    """Why the shards in ``folder`` do not hold ``sizes`` images of ``(S, S, 3)``, or None."""
    for index, count in enumerate(sizes):
        path = folder / shard_name(index)
        try:
            shard = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            # np.load refuses a file shorter than its header says ("mmap length is greater
            # than file size"), so a truncated shard lands here.
            return f"shard {path} is missing or unreadable ({error})"
        expected = (count, image_size, image_size, 3)
        if shard.shape != expected or shard.dtype != np.uint8:
            return f"shard {path} holds {shard.dtype} {shard.shape}, expected uint8 {expected}"
    return None


def _stats_problem(folder: Path, source: FileImageSource, record: Mapping[str, Any]) -> str | None:
    """Why ``files.npy`` does not match the image files as they are now, or None."""
    path = folder / FILE_STATS
    try:
        stored = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        return f"{path} is missing or unreadable ({error})"
    if stored.shape != (len(source), 2) or stored.dtype != np.int64:
        return f"{path} holds {stored.dtype} {stored.shape}, expected int64 ({len(source)}, 2)"
    if hashlib.sha256(stored.tobytes()).hexdigest() != record.get("files_sha256"):
        return f"{path} does not match the checksum {PROVENANCE} records"
    current = file_stats([source.image_path(i) for i in range(len(source))])
    changed = np.flatnonzero((current != stored).any(axis=1))
    if changed.size == 0:
        return None
    first = int(changed[0])
    now = "is missing" if current[first, 0] < 0 else "changed (size or modification time)"
    return (
        f"{changed.size} image file(s) changed since the cache was built, e.g. "
        f"{source.image_path(first)} {now}"
    )


def _cache_problem(
    folder: Path, source: FileImageSource, identity: Mapping[str, Any]
) -> tuple[str, list[int]] | None:
    """Why the cache in ``folder`` cannot be used (and the shard sizes it should have), or
    None when it can. A folder without ``cache.json`` gives the reason ``"missing"``."""
    sizes = shard_sizes(len(source), int(identity["image_size"]))
    path = folder / PROVENANCE
    if not path.exists():
        return "missing", sizes
    try:
        record = read_json_object(path)
    except (OSError, ValueError) as error:
        return f"its provenance {path} is unreadable ({error})", sizes
    stored = record.get("identity")
    if not isinstance(stored, dict) or stored != dict(identity):
        have = stored if isinstance(stored, dict) else {}
        differing = sorted(k for k in set(have) | set(identity) if have.get(k) != identity.get(k))
        return f"its provenance {path} disagrees on {differing}", sizes
    if record.get("shards") != sizes:
        return f"its provenance {path} lists shards {record.get('shards')}, not {sizes}", sizes
    problem = _shard_problem(folder, sizes, int(identity["image_size"]))
    problem = problem or _stats_problem(folder, source, record)
    return (problem, sizes) if problem else None


def ensure_image_cache(
    source: FileImageSource, image_size: int, base: Path, workers: int = 0
) -> CachedImageSource:
    """The cached version of ``source`` at ``image_size``, built or rebuilt when needed.

    Args:
        source: a split whose images are files.
        image_size: ``data.image_size``.
        base: the cache root (``image_cache_root(config)``).
        workers: decoding threads while building (0: one).

    Raises:
        ConfigError: when the transforms do not start with a plain resize (see ``resize_step``).
        DataError: naming the file, when an image is missing or does not decode, or when the
            disk lacks the room for the cache.
        OSError: naming the file, when a cache file cannot be written.
    """
    resize = resize_step(image_size)
    identity = cache_identity(source, image_size, resize)
    folder = cache_folder(base, identity)
    problem = _cache_problem(folder, source, identity)
    if problem is None:
        logger.info("%s/%s: reading images from the cache %s", source.dataset, source.split, folder)
        return CachedImageSource(source, folder, shard_sizes(len(source), image_size))
    with exclusive(folder / BUILD_LOCK):
        # Another process may have built it while this one waited for the lock.
        problem = _cache_problem(folder, source, identity)
        if problem is None:
            return CachedImageSource(source, folder, shard_sizes(len(source), image_size))
        reason, sizes = problem
        if reason != "missing":
            logger.warning("image cache %s cannot be used: %s; rebuilding it", folder, reason)
        seconds = _build(source, folder, identity, resize, sizes, workers)
    cached = CachedImageSource(source, folder, sizes)
    cached.build_seconds = seconds
    return cached


def _check_room(folder: Path, needed: int) -> None:
    """Refuse to start a build the disk cannot hold (counting the shards it will replace)."""
    reclaimed = sum(path.stat().st_size for path in folder.glob("shard-*.npy"))
    free = shutil.disk_usage(folder).free
    if free + reclaimed < needed:
        raise DataError(
            f"the image cache needs {needed / 1e9:.1f} GB in {folder}, but only "
            f"{(free + reclaimed) / 1e9:.1f} GB are free there (set data.image_cache_dir to a "
            "larger disk)"
        )


@dataclasses.dataclass
class _Progress:
    """Logs a build's progress at most every ``_PROGRESS_SECONDS`` and at its end."""

    what: str
    total: int
    started: float = dataclasses.field(default_factory=time.perf_counter)
    logged: float = 0.0

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if done < self.total and now - self.logged < _PROGRESS_SECONDS:
            return
        self.logged = now
        rate = done / max(now - self.started, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        logger.info(
            "%s: %d/%d images (%.0f%%), %.0f images/s, about %.0f s left",
            self.what,
            done,
            self.total,
            100.0 * done / max(self.total, 1),
            rate,
            left,
        )


def _build(
    source: FileImageSource,
    folder: Path,
    identity: Mapping[str, Any],
    resize: Callable[[Image.Image], Image.Image],
    sizes: Sequence[int],
    workers: int,
) -> float:
    """Decode, resize and write every image of ``source`` into ``folder``; the seconds taken."""
    image_size = int(identity["image_size"])
    needed = len(source) * image_size * image_size * 3
    what = f"image cache {source.dataset}/{source.split}"
    logger.info(
        "%s: decoding %d images to %d x %d into %s (%.1f GB)",
        what,
        len(source),
        image_size,
        image_size,
        folder,
        needed / 1e9,
    )
    # No old record may vouch for the shards about to be replaced, even if this build dies.
    (folder / PROVENANCE).unlink(missing_ok=True)
    _check_room(folder, needed)
    for stale in folder.glob("shard-*.npy"):
        if stale.name not in {shard_name(i) for i in range(len(sizes))}:
            stale.unlink()
    # Stat before decoding: a file rewritten during the build then fails the next validation.
    stats = file_stats([source.image_path(i) for i in range(len(source))])
    progress = _Progress(what, len(source))
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="image-cache") as pool:
        start = 0
        for index, count in enumerate(sizes):
            rows = range(start, start + count)
            _write_shard(folder / shard_name(index), source, resize, rows, pool)
            start += count
            progress.update(start)
    save_array_atomic(folder / FILE_STATS, stats)
    seconds = time.perf_counter() - progress.started
    record = {
        "identity": dict(identity),
        "shards": list(sizes),
        "bytes": needed,
        "files_sha256": hashlib.sha256(stats.tobytes()).hexdigest(),
        "build_seconds": round(seconds, 3),
    }
    text = json.dumps(stamped(record), indent=1, sort_keys=True) + "\n"
    write_text_atomic(folder / PROVENANCE, text)
    logger.info("%s: %d images written in %.1f s", what, len(source), seconds)
    return seconds


def _resized_pixels(
    source: FileImageSource, index: int, resize: Callable[[Image.Image], Image.Image]
) -> np.ndarray:
    """Image ``index`` exactly as the transforms' first step leaves it, as ``(S, S, 3)``."""
    return np.asarray(resize(source.load_image(index)), dtype=np.uint8)


def _write_shard(
    path: Path,
    source: FileImageSource,
    resize: Callable[[Image.Image], Image.Image],
    rows: range,
    pool: ThreadPoolExecutor,
) -> None:
    """Write images ``rows`` of ``source`` as one shard through a temporary file that is moved
    into place once complete and synced."""
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path):
            _fill(staging, source, resize, rows, pool)
            with open(staging, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def _fill(
    staging: Path,
    source: FileImageSource,
    resize: Callable[[Image.Image], Image.Image],
    rows: range,
    pool: ThreadPoolExecutor,
) -> None:
    """Decode ``rows`` into a pre-allocated memory map of ``staging``: only the images being
    decoded are held in memory, whatever the shard's size. The map is closed on return."""
    first = _resized_pixels(source, rows[0], resize)
    shard = np.lib.format.open_memmap(
        staging, mode="w+", dtype=np.uint8, shape=(len(rows), *first.shape)
    )
    shard[0] = first

    def decode(position: int) -> None:
        shard[position] = _resized_pixels(source, rows[position], resize)

    # Threads write disjoint rows; consuming the iterator re-raises the first decoding error.
    for _ in pool.map(decode, range(1, len(rows))):
        pass
    shard.flush()


def cached_source(source: ImageSource, config: DataConfig) -> ImageSource:
    """``source`` read through the image cache (built on first use) when it has image files;
    in-memory sources (digits, glyphs) are returned as they are: there is nothing to cache."""
    if not isinstance(source, FileImageSource):
        logger.info(
            "data.image_cache: %s/%s is held in memory; nothing to cache",
            source.dataset,
            source.split,
        )
        return source
    return ensure_image_cache(
        source, config.image_size, image_cache_root(config), config.num_workers
    )


__all__ = [  # the loaders (coco, voc) and the catalog read the annotation cache through here too
    "CachedImageSource",
    "annotation_cache_root",
    "cached_annotations",
    "cached_source",
    "ensure_image_cache",
    "image_cache_root",
]

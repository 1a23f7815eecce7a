"""What every cache of mlcil shares: where caches live, how a cache entry names what it holds,
how builders take turns, and how arrays reach the disk.

The caches (one folder each below :func:`cache_root`)::

    digits-v1-....npz       the embedded digits benchmark (mlcil.data.embedded)
    glyphs-v1-....npz       the glyph scenes (mlcil.data.glyphs)
    annotations/            parsed label matrices of COCO and VOC (mlcil.data.annotation_cache)
    images/                 resized images (mlcil.data.image_cache; ``data.image_cache_dir``)
    weights/                pretrained backbones (mlcil.weights_cache)

Provenance: an entry is named by :func:`provenance_key`, the head of the SHA-256 of the
canonical JSON (sorted keys, no spaces) of the fields that define it, and carries those fields
(plus :func:`stamped` bookkeeping) in a JSON file written after its data.

Locking: :func:`exclusive` holds a ``filelock`` lock (``fcntl`` on POSIX, ``msvcrt`` on
Windows), waiting for another holder, so two processes (two ranks, two runs) never build the
same entry at once; the second one finds it built when its turn comes.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from mlcil.errors import MlcilError
from mlcil.fileio import write_atomic, writing
from mlcil.version import __version__

logger = logging.getLogger(__name__)

ENVIRONMENT = "MLCIL_CACHE"
"""Environment variable: the cache root (else ``$XDG_CACHE_HOME/mlcil`` or ``~/.cache/mlcil``)."""
KEY_LENGTH = 16


def cache_root() -> Path:
    """The folder of mlcil's caches (``$MLCIL_CACHE``, else the user cache folder), read from
    the environment as it is now."""
    if os.environ.get(ENVIRONMENT):
        return Path(os.environ[ENVIRONMENT])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlcil"


def canonical_json(value: Any, what: str = "a cache key") -> str:
    """``value`` as canonical JSON: sorted keys, no spaces, finite numbers only.

    Raises:
        MlcilError: naming ``what`` when ``value`` is not JSON (finite numbers).
    """
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise MlcilError(f"{what} must be JSON-serialisable (finite numbers): {error}") from error


def digest(value: Any, what: str = "a cache key") -> str:
    """The SHA-256 (hex) of ``value``'s canonical JSON: the same for equal JSON values, whatever
    the key order (a tuple equals the list of its items)."""
    return hashlib.sha256(canonical_json(value, what).encode("utf-8")).hexdigest()


def provenance_key(value: Any, what: str = "a cache key") -> str:
    """The name of a cache entry defined by ``value``: the first ``KEY_LENGTH`` hex characters of
    :func:`digest`."""
    return digest(value, what)[:KEY_LENGTH]


def stamped(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` plus the bookkeeping every provenance record carries (``mlcil_version`` and
    ``created``, UTC ISO 8601), unless ``fields`` sets them already."""
    record = dict(fields)
    record.setdefault("mlcil_version", __version__)
    record.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat())
    return record


def file_sha256(path: str | Path) -> str:
    """The SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


@contextlib.contextmanager
def exclusive(path: str | Path) -> Iterator[None]:
    """Hold the lock file ``path`` (creating its folder) for the ``with`` block, waiting for
    another process that holds it; the wait is logged at INFO."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process that is building the cache (%s)", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def save_array_atomic(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary sibling, synced and moved into place (no pickle)."""
    write_atomic(Path(path), lambda handle: np.save(handle, array, allow_pickle=False))


def save_arrays_atomic(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` of ``arrays`` through a temporary sibling, synced and moved into place:
    readers never see a half-written file."""
    named: dict[str, Any] = dict(arrays)
    write_atomic(Path(path), lambda handle: np.savez(handle, **named))

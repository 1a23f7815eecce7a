"""Pre-flight check of a dataset's image files, before a run writes or deletes anything.

Training reads an image only when its batch comes up, so a damaged file at the end of a split used
to stop a run hours in, after ``--overwrite`` had already deleted the previous results.
``check_image_files`` looks at every image of a ``FileImageSource`` up front:

* the path is a regular file (a FIFO named ``x.png`` is found from its metadata, never opened);
* PIL can read its header (the pixels are not decoded);
* the file is not truncated, from its last bytes: a JPEG ends with the end-of-image marker
  ``FF D9`` (zero padding after it is allowed), a PNG with its ``IEND`` chunk, a GIF with its
  trailer byte ``3B``; a WebP file is as long as its RIFF header says. A file that fails this
  test is decoded in full before it is reported, because some cameras append data after a
  complete image;
* when all images together are smaller than ``full_decode_limit`` bytes, every image is also
  decoded in full, exactly as training will decode it.

Every image is checked (so the count of problems is complete), and the error names the first few.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageFile, UnidentifiedImageError

from mlcil.data.base import (
    FileImageSource,
    ImageSource,
    decode_image_file,
    file_problem,
    open_regular_file,
)
from mlcil.errors import DataError

logger = logging.getLogger(__name__)

FULL_DECODE_LIMIT = 64 * 2**20
"""Default byte total below which every image is decoded in full (a fraction of a second)."""

_REPORTED = 3
"""How many problems the error message spells out (all are counted)."""

_TAIL_BYTES = 4096
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and its (constant) CRC
_CHUNK = 256  # images per task given to a worker thread


def check_image_files(
    source: ImageSource,
    full_decode_limit: int = FULL_DECODE_LIMIT,
    workers: int | None = None,
) -> None:
    """Check that every image of ``source`` can be read, without decoding more than is cheap.

    Args:
        source: a dataset split; only a ``FileImageSource`` has files to check (in-memory
            sources pass at once).
        full_decode_limit: when the image files take fewer bytes than this in all, each one is
            also decoded in full; above it, only headers and trailers are read.
        workers: threads reading files (they mostly wait for the disk); default: up to 8.

    Raises:
        DataError: naming the dataset and split, how many images fail, and for the first few
            their position in the split (0-based), their path and what is wrong.
    """
    if not isinstance(source, FileImageSource):
        return
    started = time.perf_counter()
    paths = [source.image_path(index) for index in range(len(source))]
    problems, total_bytes = _check_metadata(paths)
    full = total_bytes < full_decode_limit
    regular = [index for index in range(len(paths)) if index not in problems]
    chunks = [regular[start : start + _CHUNK] for start in range(0, len(regular), _CHUNK)]
    threads = workers or min(8, (os.cpu_count() or 1) + 4)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for found in pool.map(lambda chunk: _check_contents(paths, chunk, full), chunks):
            problems.update(found)
    logger.info(
        "%s/%s: checked %d image files (%.1f MB, %s) in %.2f s: %d problems",
        source.dataset,
        source.split,
        len(paths),
        total_bytes / 1e6,
        "decoded in full" if full else "headers and trailers",
        time.perf_counter() - started,
        len(problems),
    )
    if problems:
        raise DataError(_report(source, paths, problems))


def _check_metadata(paths: Sequence[Path]) -> tuple[dict[int, str], int]:
    """Problems of the paths that are not regular files, and the byte total of the others."""
    problems: dict[int, str] = {}
    total = 0
    for index, path in enumerate(paths):
        try:
            status = os.stat(path)
        except OSError:
            status = None
        if status is not None and stat.S_ISREG(status.st_mode):
            total += status.st_size
        else:  # rare: let file_problem say what it is
            problems[index] = file_problem(path) or "it changed while being checked"
    return problems, total


def _check_contents(paths: Sequence[Path], indices: Sequence[int], full: bool) -> dict[int, str]:
    problems: dict[int, str] = {}
    for index in indices:
        problem = _check_one(paths[index], full)
        if problem is not None:
            problems[index] = problem
    return problems


def _check_one(path: Path, full: bool) -> str | None:
    """What is wrong with one image file, or None."""
    try:
        with open_regular_file(path) as stream:
            problem = _header_and_trailer(stream)
    except DataError as error:
        return str(error)
    except OSError as error:
        return f"cannot read it ({error.strerror or error})"
    if problem is None and not full:
        return None
    try:
        decode_image_file(path)
    except DataError as error:
        return problem or str(error)
    if problem is not None and ImageFile.LOAD_TRUNCATED_IMAGES:
        return problem  # the decoder was told to accept truncated files: trust the trailer
    # A complete image followed by extra bytes (some cameras append data): it decodes, so it is
    # usable.
    return None


def _header_and_trailer(stream: BinaryIO) -> str | None:
    head = stream.read(16)
    size = stream.seek(0, os.SEEK_END)
    stream.seek(max(0, size - _TAIL_BYTES))
    problem = _trailer_problem(head, stream.read().rstrip(b"\x00"), size)
    if problem is not None:
        return problem
    stream.seek(0)
    try:
        with Image.open(stream):  # reads the header only
            pass
    except UnidentifiedImageError:
        return "PIL cannot identify it as an image"
    # PIL's format plugins raise many types on damaged headers.
    except Exception as error:
        return f"PIL cannot read its header ({type(error).__name__}: {error})"
    return None


def _trailer_problem(head: bytes, tail: bytes, size: int) -> str | None:
    """Whether a file whose first bytes are ``head`` lacks the end its format requires.

    The format is told by its signature, not by PIL, so that a file cut inside its header is
    still reported as truncated. ``tail`` is the file's end with trailing zero bytes removed.
    """
    if head.startswith(b"\xff\xd8\xff") and not tail.endswith(b"\xff\xd9"):
        return "truncated JPEG: it does not end with the end-of-image marker FF D9"
    if head.startswith(b"\x89PNG\r\n\x1a\n") and not tail.endswith(_PNG_END):
        return "truncated PNG: it does not end with the IEND chunk"
    if head.startswith((b"GIF87a", b"GIF89a")) and not tail.endswith(b";"):
        return "truncated GIF: it does not end with the trailer byte 3B"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        declared = int.from_bytes(head[4:8], "little") + 8
        if size < declared:
            return f"truncated WebP: {size} bytes where its header says {declared}"
    return None


def _report(source: FileImageSource, paths: Sequence[Path], problems: dict[int, str]) -> str:
    first = sorted(problems)[:_REPORTED]
    listed = "; ".join(
        f"position {index} ({source.image_refs[index]!r}, {paths[index]}): {problems[index]}"
        for index in first
    )
    more = f"; and {len(problems) - len(first)} more" if len(problems) > len(first) else ""
    return (
        f"{source.dataset}/{source.split}: {len(problems)} of {len(paths)} image files cannot be "
        f"used: {listed}{more}. Fix or remove these images and run again"
    )

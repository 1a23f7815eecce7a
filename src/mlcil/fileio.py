"""Small file helpers shared by checkpoints and result files."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Name ``path`` in any error raised while writing it.

    A full disk or a file-size limit surfaces from deep inside a writer (safetensors, json,
    PIL) as an error that often names no file; the user must learn which file could not be
    written. The error is re-raised as an ``OSError`` carrying the path and the cause's errno.
    """
    try:
        yield
    except OSError as error:
        if error.filename:
            raise
        reason = f"cannot write {path}: {error.strerror or error}"
        raise OSError(error.errno, reason, str(path)) from error
    except Exception as error:
        if type(error).__name__ != "SafetensorError":
            raise
        code = errno.ENOSPC if "No space" in str(error) else errno.EIO
        if "too large" in str(error).lower() or "FileTooLarge" in str(error):
            code = errno.EFBIG
        raise OSError(code, f"cannot write {path}: {error}", str(path)) from error


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary sibling and ``os.replace``: readers see the old
    content or the new one, never a partial file, even if the process dies mid-write."""
    write_atomic(path, lambda handle: handle.write(text), "w")


def write_atomic(path: Path, write: Callable[[IO[Any]], object], mode: str = "wb") -> None:
    """Write ``path`` atomically: ``write(handle)`` fills a temporary sibling opened with
    ``mode``, which is synced and renamed into place (see :func:`write_text_atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        writing(path),
        tempfile.NamedTemporaryFile(mode, dir=path.parent, delete=False, suffix=".tmp") as handle,
    ):
        try:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            handle.close()
            os.unlink(handle.name)
            raise
    os.replace(handle.name, path)

"""Small file helpers shared by checkpoints and result files.

Files and folders mlcil writes get the permissions the process's umask gives a plain ``open`` or
``mkdir`` (``0o666 & ~umask``, ``0o777 & ~umask``): the temporary files and folders behind atomic
writes are created private (0600, 0700) by :mod:`tempfile`, so their final mode is set here before
they are renamed into place. Otherwise nobody else on a shared machine could read a run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    """The process's umask.

    Linux reports it in ``/proc/self/status``; elsewhere it can only be read by setting it and
    putting it back, which briefly changes it for every thread of the process.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open`` under the current umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode a new folder gets from ``mkdir`` under the current umask."""
    return 0o777 & ~current_umask()


def use_umask(path: str | Path) -> None:
    """Give a file written by a library that creates it private (safetensors writes 0600) the
    mode ``open`` would have given it."""
    os.chmod(path, file_mode())


def make_temporary_folder(parent: Path, prefix: str) -> Path:
    """A new uniquely named folder in ``parent`` (for staging a write), with the mode ``mkdir``
    would give it rather than :func:`tempfile.mkdtemp`'s 0700."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(folder, folder_mode())
    return folder


def make_temporary_file(parent: Path, suffix: str) -> Path:
    """A new, empty, uniquely named file in ``parent`` (for staging a write), with the mode
    ``open`` would give it rather than :func:`tempfile.mkstemp`'s 0600."""
    descriptor, name = tempfile.mkstemp(dir=parent, suffix=suffix)
    try:
        os.chmod(name, file_mode())
    finally:
        os.close(descriptor)
    return Path(name)


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
            os.chmod(handle.name, file_mode())  # not the temporary file's private 0600
        except BaseException:
            handle.close()
            os.unlink(handle.name)
            raise
    os.replace(handle.name, path)

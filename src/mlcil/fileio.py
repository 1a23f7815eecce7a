"""Small file helpers shared by checkpoints and result files.

Files and folders mlcil writes get the permissions the process's umask gives a plain ``open`` or
``mkdir`` (``0o666 & ~umask``, ``0o777 & ~umask``): the temporary files and folders behind atomic
writes are created private (0600, 0700) by :mod:`tempfile`, so their final mode is set here before
they are renamed into place. Otherwise nobody else on a shared machine could read a run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
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


class NestedTooDeepError(json.JSONDecodeError):
    """A JSON document nested deeper than the parser can follow: a ``JSONDecodeError`` (so a
    ``ValueError``), where ``json`` raises ``RecursionError``."""

    def __init__(self) -> None:
        message = "arrays or objects nested too deeply to read (thousands of levels)"
        super().__init__(message, "", 0)
        self.args = (message,)

    def __str__(self) -> str:
        return self.msg


def parse_json(text: str) -> Any:
    """``json.loads``, except that a document nested too deeply for the parser (a few bytes of
    ``[[[[...``) raises :class:`NestedTooDeepError`, which callers already handle as any other
    malformed JSON, instead of a ``RecursionError``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise NestedTooDeepError() from None


class NotOwnFileError(OSError):
    """A path mlcil would write through is a link, or not a regular file."""


def open_own_file(path: str | Path, flags: int) -> int:
    """A descriptor of ``path`` opened with ``flags`` (``os.O_*``; ``O_CREAT`` makes it if
    missing) that never follows a link: a symbolic link at ``path`` (which would make mlcil
    truncate or append to whatever it points to), or anything but a regular file (a FIFO
    would block), raises :class:`NotOwnFileError` naming it."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    nonblock = getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block the open itself
    try:
        descriptor = os.open(path, flags | nofollow | nonblock | os.O_CLOEXEC, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP or (nofollow == 0 and os.path.islink(path)):
            raise NotOwnFileError(
                errno.ELOOP,
                f"{path} is a symbolic link: mlcil never writes through one; delete the link",
                str(path),
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise NotOwnFileError(
            errno.EINVAL,
            f"{path} is not a regular file: mlcil writes only its own files there; delete it",
            str(path),
        )
    if nonblock:
        os.set_blocking(descriptor, True)
    return descriptor


class OwnFileHandler(logging.StreamHandler):
    """A ``logging`` handler appending to a log file opened with :func:`open_own_file` (a link
    planted at the log's name is refused, never followed)."""

    def __init__(self, path: str | Path) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        super().__init__(os.fdopen(open_own_file(path, flags), "a", encoding="utf-8"))

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.flush()
            self.stream.close()
        super().close()

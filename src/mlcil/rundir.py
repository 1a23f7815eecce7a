"""The run folder and its one owner, :class:`RunDir`.

Everything mlcil writes for a run lives in one folder, laid out here and nowhere else::

    .mlcil-run              marker: this folder is an mlcil run (JSON naming the config.yaml it
                            wrote by its SHA-256; --overwrite needs it)
    .mlcil-run.lock         exclusive lock while a process trains into the folder (pid inside)
    config.yaml             the resolved config
    metrics.json / .csv     results, written when the last session is done
    map_per_session.png     the mAP curve
    train.log               the training log
    tensorboard/            TensorBoard events
    tracking/               the csv, wandb and mlflow trackers (``train.trackers``)
    added_sessions.json     sessions added after training (``--add-session``)
    checkpoints/            one folder per finished session, mid-session folders, ``latest``
    .replaced/              an earlier run set aside by ``--overwrite`` until the new run's first
                            checkpoint exists (then deleted; put back if the new run fails), with
                            ``phase.json``: how far the set-aside, deletion or restore got

Every file and folder of that list is mlcil's own: a symbolic link at any of those names (or at
a session folder or ``latest`` inside ``checkpoints/``) is refused by name, never followed, and
the lock and the log are opened with ``O_NOFOLLOW``, so a planted link cannot make a run write,
read or score anything outside its folder. ``latest`` names a checkpoint folder *inside*
``checkpoints/``: a pointer holding a path or ``..`` is refused too.

The lock is an advisory ``flock`` held by the training process: a second ``mlcil train`` into
the same folder is refused naming the holder's pid, and a lock left by a crashed process (the
kernel drops ``flock`` locks with their process) never blocks ``--resume``. It is not taken
through ``filelock`` (as the caches' build locks are, :mod:`mlcil.cache`): ``filelock`` opens the
lock file by name itself, following a planted link and truncating what it points to, while this
lock file is opened with ``O_NOFOLLOW`` (``fileio.open_own_file``) and keeps the holder's pid.
Where ``fcntl`` is missing (Windows) the folder is not locked; a WARNING says so.

The marker alone does not make a folder a run: it must be the JSON mlcil wrote and name the
SHA-256 of the folder's ``config.yaml`` (a marker of version 1, written before the hash was
recorded, must hold all its fields next to a ``config.yaml``). Only then may ``--overwrite``
move the folder's files.

``--overwrite`` survives a kill at any point: ``.replaced/phase.json`` is written before the
first rename and before each later stage (``setting-aside``, ``aside``, ``discarding``,
``restoring``) with the names set aside, and :meth:`RunDir.recover` (run under the lock by the
next ``train`` or ``--resume``) reads it and finishes the stage: the earlier run comes back
whole, or, once the new run has written a checkpoint, the new run stays whole. That part of the
owner is :mod:`mlcil.run_overwrite`; the layout's names are in :mod:`mlcil.run_layout`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from mlcil.errors import ConfigError, WeightsError, clip, shown
from mlcil.fileio import NotOwnFileError, open_own_file, parse_json, write_text_atomic
from mlcil.run_layout import (
    ADDED_SESSIONS,
    ASIDE,
    BEFORE_FIRST_CHECKPOINT,
    CHECKPOINTS,
    CONFIG,
    LATEST,
    LOCK,
    LOG,
    MARKER,
    MARKER_FORMAT,
    MARKER_VERSION,
    METRICS_CSV,
    METRICS_JSON,
    MID_SESSION,
    OWNED,
    PHASE,
    PLOT,
    POINTER_BYTES,
    RUN_FILES,
    SESSION_END,
    TENSORBOARD,
    TRACKING,
    checkpoint_name,
    is_checkpoint_name,
    is_folder_name,
    is_plain_file,
    linked,
    mid_session_name,
    read_small,
)
from mlcil.run_overwrite import ReplaceableRun
from mlcil.version import __version__

logger = logging.getLogger(__name__)


class RunDir(ReplaceableRun):
    """One run folder: its layout, its lock, its checkpoint pointer and ``--overwrite``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_handle: IO[str] | None = None

    @classmethod
    def inside(cls, output_dir: str | Path, name: str) -> RunDir:
        """``<output_dir>/<name>``, refused unless ``name`` is one folder name that stays inside
        ``output_dir`` (``../x``, ``/etc`` and links out are errors)."""
        if not is_folder_name(name):
            raise ConfigError(
                f"run name {shown(name)} must be one folder name inside output_dir "
                f"{output_dir!s} (no '/', '\\', '..' or surrounding spaces)"
            )
        root = Path(output_dir)
        folder = root / name
        if folder.is_symlink() or (
            root.exists() and folder.exists() and folder.resolve().parent != root.resolve()
        ):
            raise ConfigError(f"run folder {folder} leads outside output_dir {root}")
        return cls(folder)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # --- layout --------------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_JSON

    @property
    def metrics_csv(self) -> Path:
        return self.path / METRICS_CSV

    @property
    def plot_file(self) -> Path:
        return self.path / PLOT

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def tracking(self) -> Path:
        return self.path / TRACKING

    @property
    def added_sessions_file(self) -> Path:
        return self.path / ADDED_SESSIONS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def checkpoint(self, name: str) -> Path:
        """``checkpoints/<name>`` for a checkpoint folder name written by mlcil."""
        if not is_checkpoint_name(name):
            raise WeightsError(f"{self.checkpoints}: {shown(name)} is not a checkpoint folder name")
        return self.checkpoints / name

    def found_run_files(self) -> list[str]:
        """The names of ``RUN_FILES`` present in the folder."""
        return [name for name in RUN_FILES if os.path.lexists(self.path / name)]

    def check_own_files(self) -> None:
        """Refuse a folder where a name of the run's layout is a symbolic link.

        Raises:
            ConfigError: naming the first link found (``checkpoints``, ``train.log``...).
        """
        for name in (*OWNED, ASIDE):
            if (self.path / name).is_symlink():
                raise linked(self.path / name, f"{name} entry")
        self.checkpoints_root()

    # --- checkpoints ---------------------------------------------------------------------

    def checkpoints_root(self) -> Path:
        """``checkpoints/``, refused when it is a link (another run's, or anywhere)."""
        if self.checkpoints.is_symlink():
            raise linked(self.checkpoints, "checkpoints folder")
        return self.checkpoints

    def own_checkpoint(self, folder: Path) -> Path:
        """``folder`` (inside ``checkpoints/``), refused when it is a link."""
        if folder.is_symlink():
            raise linked(folder, "checkpoint folder")
        return folder

    def latest(self, session_end: bool = False) -> Path | None:
        """The newest complete checkpoint folder, or None when there is none (without a
        ``latest`` pointer: the last finished session's).

        Args:
            session_end: only checkpoints written when a session was finished count (what
                ``eval``, ``predict`` and ``mlcil.load`` use: never half-trained weights).

        Raises:
            WeightsError: when ``checkpoints/latest`` names anything but a checkpoint folder of
                this run (a path, ``..``), or ``checkpoints/``, ``latest`` or a session folder
                is a symbolic link.
        """
        if session_end:
            return self._last_session_end()
        pointer = self._checkpoints_for_reading() / LATEST
        if pointer.is_symlink():
            raise WeightsError(str(linked(pointer, "checkpoint pointer")))
        if not os.path.lexists(pointer):  # killed between a checkpoint and its pointer
            return self._last_session_end()
        if not pointer.is_file():
            return None
        name = self._read_pointer(pointer)
        if not is_checkpoint_name(name):
            raise WeightsError(
                f"{pointer} names {shown(name)}, which is not a checkpoint folder of this run; "
                "it must hold the name of a folder in checkpoints/ (e.g. session_03)"
            )
        folder = self.checkpoints / name
        if folder.is_symlink():
            raise WeightsError(str(linked(folder, "checkpoint folder")))
        return folder if is_plain_file(folder / "state.json") else None

    def _checkpoints_for_reading(self) -> Path:
        try:
            return self.checkpoints_root()
        except ConfigError as error:
            raise WeightsError(str(error)) from None

    @staticmethod
    def _read_pointer(pointer: Path) -> str:
        try:
            descriptor = open_own_file(pointer, os.O_RDONLY)
            with os.fdopen(descriptor, "rb") as handle:
                data = handle.read(POINTER_BYTES + 1)
            name = data.decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise WeightsError(f"cannot read the checkpoint pointer {pointer}: {error}") from error
        if len(data) > POINTER_BYTES:
            name = name[:40]  # not a folder name mlcil writes: the check below names it
        return name

    def _last_session_end(self) -> Path | None:
        root = self._checkpoints_for_reading()
        ends = []
        for folder in root.iterdir() if root.is_dir() else []:
            match = SESSION_END.fullmatch(folder.name)
            if not match:
                continue
            if folder.is_symlink():
                raise WeightsError(str(linked(folder, "checkpoint folder")))
            if is_plain_file(folder / "state.json"):
                ends.append((int(match.group(1)), folder))
        return max(ends)[1] if ends else None

    def has_checkpoint(self) -> bool:
        """Whether any checkpoint folder (complete or being written) is in ``checkpoints/``."""
        root = self.checkpoints
        if root.is_symlink():
            return True  # not the run's own: never taken for an empty one
        if not root.is_dir():
            return False
        return any(
            is_checkpoint_name(entry.name) or entry.name == LATEST for entry in root.iterdir()
        )

    def learned_nothing(self) -> bool:
        """Whether the folder holds an mlcil run that stopped before its first checkpoint (a
        failure or a kill in its first session): its config, perhaps its logs, nothing learned.
        Such a run starts again from its first session, with ``--resume`` or the same command."""
        found = set(self.found_run_files())
        return (
            CONFIG in found
            and found <= BEFORE_FIRST_CHECKPOINT
            and not self.has_checkpoint()
            and self.is_run()
        )

    def check_fresh(
        self,
        resuming: bool = False,
        same_settings: Callable[[Path], None] | None = None,
    ) -> bool:
        """The one check before a run starts from its first session in this folder.

        A folder holding no run is fine. A run that stopped before its first checkpoint starts
        again when ``resuming``, or when ``same_settings`` is given and accepts its
        ``config.yaml`` (``same_settings`` raises, naming the difference, when the settings
        differ). Anything else is refused.

        Returns:
            Whether the folder's run starts again from its first session (False: fresh folder).

        Raises:
            ConfigError: naming what the folder holds and what to do instead.
        """
        found = self.found_run_files()
        if not found and not resuming:
            return False
        if self.learned_nothing() and (resuming or same_settings is not None):
            if same_settings is not None:
                same_settings(self.config_file)
            logger.info("%s stopped before its first checkpoint: starting it again", self.path)
            return True
        if resuming:
            raise ConfigError(f"--resume: no checkpoint found in {self.checkpoints}")
        raise ConfigError(
            f"{self.path} already holds a run ({', '.join(found)}): resume it with "
            "--resume, replace it with --overwrite, or choose another --run-dir"
        )

    def check_fresh_start(self, resuming: bool = False) -> None:
        """:meth:`check_fresh` without a settings check (what the trainer calls)."""
        self.check_fresh(resuming)

    def describe_kept(self) -> str:
        """What of the run is on disk after a failure, and what continues it (for messages)."""
        try:
            folder = self.latest()
        except WeightsError:
            folder = None
        if folder is not None:
            return (
                f"its newest checkpoint {folder} is kept: `mlcil train --resume {self.path}` "
                "continues from it"
            )
        if self.config_file.is_file() and self.is_run():
            return (
                f"no checkpoint was written yet: `mlcil train --resume {self.path}` (or the same "
                "command) starts the run again from its first session"
            )
        return f"nothing of a run is in {self.path}"

    # --- ownership -----------------------------------------------------------------------

    def is_run(self) -> bool:
        """Whether the folder is an mlcil run: its marker is the JSON mlcil wrote and names
        the folder's ``config.yaml`` (see the module docstring)."""
        return self.marker_problem() is None

    def marker_problem(self) -> str | None:
        """Why the folder is not an mlcil run by its marker (None when it is one)."""
        marker = read_small(self.marker)
        if marker is None:
            return f"no {MARKER} marker"
        try:
            content = parse_json(marker.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            content = None
        if not isinstance(content, dict) or content.get("format") != MARKER_FORMAT:
            return f"its {MARKER} is not a marker mlcil wrote"
        if not is_plain_file(self.config_file):
            return f"its {MARKER} marker has no {CONFIG} beside it"
        if content.get("version") == MARKER_VERSION:
            config = read_small(self.config_file, limit=1 << 24)
            digest = hashlib.sha256(config).hexdigest() if config is not None else None
            if content.get("config_sha256") != digest:
                return f"its {MARKER} marker does not name its {CONFIG}"
            return None
        legacy = {"version": int, "mlcil_version": str, "created": str}
        if content.get("version") == 1 and all(
            isinstance(content.get(key), kind) for key, kind in legacy.items()
        ):
            return None
        return f"its {MARKER} is not a marker mlcil wrote"

    def write_config(self, config_text: str) -> None:
        """Write the run's ``config.yaml``, its marker first (naming the config by its hash:
        a process killed between the two leaves a marker that names no config, not a config
        without a marker)."""
        self.mark(config_text)
        write_text_atomic(self.config_file, config_text)

    def mark(self, config_text: str | None = None) -> None:
        """Write the marker that makes the folder an mlcil run, naming ``config_text`` (default
        the folder's ``config.yaml`` as it is now) by its SHA-256."""
        if config_text is None:
            data = read_small(self.config_file, limit=1 << 24) or b""
        else:
            data = config_text.encode("utf-8")
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        payload = {
            "format": MARKER_FORMAT,
            "version": MARKER_VERSION,
            "mlcil_version": __version__,
            "created": created,
            "config_sha256": hashlib.sha256(data).hexdigest(),
        }
        write_text_atomic(self.marker, json.dumps(payload) + "\n")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's exclusive lock (creating the folder) for the ``with`` block.

        Raises:
            ConfigError: another live process holds the lock (its pid is named), or the lock
                file is a link or not a regular file.
        """
        self.acquire_lock()
        try:
            yield
        finally:
            self.release_lock()

    @property
    def holds_lock(self) -> bool:
        """Whether this object holds the folder's lock."""
        return self._lock_handle is not None

    def acquire_lock(self) -> None:
        """Take the folder's lock (see :meth:`locked`); a no-op when already held here."""
        if self._lock_handle is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = open_own_file(self.path / LOCK, os.O_RDWR | os.O_CREAT)
        except NotOwnFileError as error:
            raise ConfigError(error.strerror or str(error)) from None
        handle = os.fdopen(descriptor, "r+", encoding="utf-8", errors="replace")
        try:
            _flock(handle)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(32).strip() or "unknown"
            handle.close()
            raise ConfigError(
                f"{self.path} is in use by another mlcil process (pid {clip(holder, 40)}); wait "
                "for it to finish or stop it, or choose another --run-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle

    def release_lock(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()  # closing the file drops the flock
            self._lock_handle = None


def _flock(handle: IO[str]) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no advisory lock available
        logger.warning("no fcntl on this platform: the run folder is not locked")
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


__all__ = [  # the layout's names, for the modules that import them from the folder's owner
    "ADDED_SESSIONS",
    "ASIDE",
    "CHECKPOINTS",
    "CONFIG",
    "LATEST",
    "LOG",
    "MARKER",
    "METRICS_CSV",
    "METRICS_JSON",
    "MID_SESSION",
    "PHASE",
    "PLOT",
    "SESSION_END",
    "TENSORBOARD",
    "TRACKING",
    "RunDir",
    "checkpoint_name",
    "is_checkpoint_name",
    "is_folder_name",
    "mid_session_name",
]

"""The run folder and its one owner, :class:`RunDir`.

Everything mlcil writes for a run lives in one folder, laid out here and nowhere else::

    .mlcil-run              marker: this folder is an mlcil run (JSON; --overwrite needs it)
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
                            checkpoint exists (then deleted; put back if the new run fails)

``latest`` names a checkpoint folder *inside* ``checkpoints/``: a pointer holding a path, ``..`` or
a link that leaves the folder is refused, so a run can never silently load another run's model.
The lock is an advisory ``flock`` held by the training process: a second ``mlcil train`` into the
same folder is refused naming the holder's pid, and a lock left by a crashed process (the kernel
drops ``flock`` locks with their process) never blocks ``--resume``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from mlcil.errors import ConfigError, WeightsError
from mlcil.fileio import write_text_atomic
from mlcil.version import __version__

logger = logging.getLogger(__name__)

MARKER = ".mlcil-run"
LOCK = ".mlcil-run.lock"
ASIDE = ".replaced"
CONFIG = "config.yaml"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
PLOT = "map_per_session.png"
LOG = "train.log"
TENSORBOARD = "tensorboard"
TRACKING = "tracking"  # the csv, wandb and mlflow trackers' files
ADDED_SESSIONS = "added_sessions.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"

# Everything a run writes (the lock stays: it belongs to whoever holds it now).
OWNED = (MARKER, CONFIG, METRICS_JSON, METRICS_CSV, PLOT, LOG, TENSORBOARD, TRACKING,
         ADDED_SESSIONS, CHECKPOINTS)  # fmt: skip
# What makes a folder hold a run (train.log alone does not: a run that failed before its first
# session leaves only its log).
RUN_FILES = (CONFIG, METRICS_JSON, METRICS_CSV, PLOT, CHECKPOINTS, ADDED_SESSIONS)

SESSION_END = re.compile(r"session_(\d+)")
MID_SESSION = re.compile(r"session_(\d+)_epoch_\d+_step_\d+")


def checkpoint_name(session: int) -> str:
    """The folder name of the checkpoint written when session ``session`` is finished."""
    return f"session_{session:02d}"


def is_folder_name(name: str) -> bool:
    """Whether ``name`` is one plain folder name (no separator, not ``.``/``..``, printable)."""
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and name.isprintable()
        and name == name.strip()
    )


class RunDir:
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
                f"run name {name!r} must be one folder name inside output_dir {output_dir!s} "
                "(no '/', '\\', '..' or surrounding spaces)"
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
        if not (SESSION_END.fullmatch(name) or MID_SESSION.fullmatch(name)):
            raise WeightsError(f"{self.checkpoints}: {name!r} is not a checkpoint folder name")
        return self.checkpoints / name

    def found_run_files(self) -> list[str]:
        """The names of ``RUN_FILES`` present in the folder."""
        return [name for name in RUN_FILES if os.path.lexists(self.path / name)]

    # --- checkpoints ---------------------------------------------------------------------

    def latest(self, session_end: bool = False) -> Path | None:
        """The newest complete checkpoint folder, or None when there is none.

        Args:
            session_end: only checkpoints written when a session was finished count (what
                ``eval``, ``predict`` and ``mlcil.load`` use: never half-trained weights).

        Raises:
            WeightsError: when ``checkpoints/latest`` names anything but a checkpoint folder of
                this run (a path, ``..``, a link leading elsewhere).
        """
        if session_end:
            return self._last_session_end()
        pointer = self.checkpoints / LATEST
        if not pointer.is_file():
            return None
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise WeightsError(f"cannot read the checkpoint pointer {pointer}: {error}") from error
        folder = self._inside_checkpoints(name, pointer)
        return folder if (folder / "state.json").is_file() else None

    def _inside_checkpoints(self, name: str, pointer: Path) -> Path:
        valid = SESSION_END.fullmatch(name) or MID_SESSION.fullmatch(name)
        folder = self.checkpoints / name
        escapes = folder.is_symlink() or folder.resolve().parent != self.checkpoints.resolve()
        if not valid or escapes:
            raise WeightsError(
                f"{pointer} names {name!r}, which is not a checkpoint folder of this run; it "
                "must hold the name of a folder in checkpoints/ (e.g. session_03)"
            )
        return folder

    def _last_session_end(self) -> Path | None:
        root = self.checkpoints
        ends = []
        for folder in root.iterdir() if root.is_dir() else []:
            match = SESSION_END.fullmatch(folder.name)
            if match and not folder.is_symlink() and (folder / "state.json").is_file():
                ends.append((int(match.group(1)), folder))
        return max(ends)[1] if ends else None

    # --- ownership -----------------------------------------------------------------------

    def is_run(self) -> bool:
        """Whether the folder is an mlcil run: its marker, or (runs made before the marker) a
        checkpoint whose ``state.json`` says it is an mlcil checkpoint."""
        if self.marker.is_file():
            return True
        root = self.checkpoints
        for folder in root.iterdir() if root.is_dir() else []:
            try:
                state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                continue
            if isinstance(state, dict) and state.get("format") == "mlcil-checkpoint":
                return True
        return False

    def mark(self) -> None:
        """Write the marker that makes the folder an mlcil run."""
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        payload = {"format": "mlcil-run", "version": 1, "mlcil_version": __version__}
        write_text_atomic(self.marker, json.dumps({**payload, "created": created}) + "\n")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's exclusive lock (creating the folder) for the ``with`` block.

        Raises:
            ConfigError: another live process holds the lock (its pid is named).
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
        handle = open(self.path / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        try:
            _flock(handle)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ConfigError(
                f"{self.path} is in use by another mlcil process (pid {holder}); wait for it to "
                "finish or stop it, or choose another --run-dir"
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

    # --- --overwrite ---------------------------------------------------------------------

    @property
    def aside(self) -> Path:
        return self.path / ASIDE

    def check_overwritable(self) -> None:
        """Refuse ``--overwrite`` of a folder with run-like files that is not an mlcil run."""
        found = self.found_run_files()
        if found and not self.is_run():
            raise ConfigError(
                f"--overwrite: {self.path} is not an mlcil run (no {MARKER} marker) but holds "
                f"{', '.join(found)}: refusing to delete them; choose another --run-dir"
            )

    def set_aside(self) -> bool:
        """Move the current run's files into ``.replaced/`` (same file system: renames only).

        Returns:
            Whether anything was moved.
        """
        present = [name for name in OWNED if os.path.lexists(self.path / name)]
        if not present:
            return False
        if self.aside.exists():
            raise ConfigError(f"{self.aside} exists already: a run set aside earlier is in it")
        self.aside.mkdir()
        for name in present:
            os.replace(self.path / name, self.aside / name)
        logger.info("the earlier run in %s is set aside until the new one is saved", self.path)
        return True

    def discard_aside(self) -> None:
        """Delete the set-aside run (the new run has written its first checkpoint)."""
        if self.aside.exists():
            shutil.rmtree(self.aside)
            logger.info("the earlier run in %s is deleted (replaced)", self.path)

    def restore_aside(self) -> None:
        """Delete what the new run wrote and put the set-aside run back as it was."""
        if not self.aside.is_dir():
            return
        for name in OWNED:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif os.path.lexists(target):
                target.unlink()
        for entry in self.aside.iterdir():
            os.replace(entry, self.path / entry.name)
        self.aside.rmdir()
        logger.warning("the new run failed before its first checkpoint: %s is as it was", self.path)

    def recover(self) -> None:
        """Finish an ``--overwrite`` that a killed process left half done: the new run had a
        checkpoint (drop the old one) or not (put the old one back)."""
        if not self.aside.is_dir():
            return
        if self.latest() is not None:
            self.discard_aside()
        else:
            self.restore_aside()


def _flock(handle: IO[str]) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no advisory lock available
        logger.debug("no fcntl on this platform: the run folder is not locked")
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
